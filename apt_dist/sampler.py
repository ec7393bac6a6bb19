"""The APT sampler: DemoFusion's progressive upscaling with APT's three changes.

Read top to bottom, `render` is the paper:

  phase 1      plain SDXL text-to-image at the native size -> reference latent z1
               (upscale: an existing picture's latent, as it is or img2img'd)
  phase s >= 2 bicubic upsample
               Statistical Matching of the dilated sub-lattices to z1        (APT)
               Scale-aware Scheduling: this phase's own beta table (eta_s)  (APT)
               one noise draw; start at step N - T0 (the shortcut)          (APT)
               every step: skip residual, jittered local windows, blurred
               dilated sub-lattices, cosine-weighted fusion
               renormalise to z1's global statistics
  decode       tiled VAE decode

The UNet is reached only through an `Executor` (one `predict` call per timestep).
All randomness comes from one generator seeded with the render's seed, drawn in a
fixed order on the driver, so the image depends on neither the number of workers nor
the order their answers arrive in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import schedules as S
from .config import RenderConfig
from .executor import Executor, InProcessExecutor, RenderContext
from .fusion import DilatedViews, LocalViews
from .geometry import jitter_range, local_windows
from .matching import ReferenceStats, standardize_to, statistical_matching
from .outputs import to_pil
from .planning import PhasePlan, Plan, build_plan, phase_schedule
from .tiling import decode_tiled, encode_tiled


class RenderError(RuntimeError):
    """A render that cannot go on (non-finite latents, no workers left, ...)."""


@dataclass
class PhaseStats:
    index: int
    width: int
    height: int
    steps: int
    seconds: float
    executor_seconds: float  # inside executor.predict (UNet calls, and transport for remote executors)
    patch_evals: int

    @property
    def driver_share(self) -> float:
        """Share of the phase's wall time spent outside UNet calls: cutting, stepping, fusing."""
        return max(0.0, 1.0 - self.executor_seconds / self.seconds) if self.seconds > 0 else 0.0


@dataclass
class RenderResult:
    image: object  # PIL.Image
    latent: torch.Tensor
    plan: Plan
    config: RenderConfig
    phases: list[PhaseStats]
    seconds: float
    decode_seconds: float
    patch_evals: int
    phase_images: list = field(default_factory=list)
    executor_summary: dict = field(default_factory=dict)
    resumed_phases: int = 0  # phases taken from a checkpoint instead of rendered
    phase_latents: list = field(default_factory=list)  # every phase's latent (a checkpoint of the finished render)
    generator_state: torch.Tensor | None = None  # the generator after the last phase (idem)


StepCallback = Callable[[int, int, int], None]  # (phase, step, timestep), after each step


def render(
    config: RenderConfig,
    executor: Executor | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    checkpoint: str | None = None,
    pipe=None,
    checkpoint_every_s: float = 60.0,
    restart: bool = False,
    init_latent: torch.Tensor | None = None,
) -> RenderResult:
    """Render `config`. `executor` defaults to an in-process one on `config.device`.

    With `checkpoint` (a file path), the render's state is written there after each phase and
    every `checkpoint_every_s` seconds of work inside a phase, and a render that finds a
    checkpoint of the same configuration resumes from it (`restart=True`: ignores it, and
    overwrites it as the render goes). `pipe`: a loaded diffusers StableDiffusionXLPipeline whose
    components are used in this process instead of loading `config.model` (see loading.from_pipeline).
    `init_latent` [1, C, h1, w1] (phase 1's latent size), or `config.init_image` (encoded here): phase 1 starts
    from that latent instead of noise (`config.init_strength`: 0 uses it as it is; see `_Sampler.reference_phase`).
    """
    from . import checkpoint as ckpt
    from .loading import from_pipeline, prepare

    config.validate()
    t_start = time.perf_counter()
    spec, info, encode, denoiser = from_pipeline(pipe, config, executor) if pipe is not None else prepare(config)
    from_image = init_latent is not None or config.init_image is not None
    plan = build_plan(config, info.native_window, info.vae_scale, info.scheduler, info.latent_channels, from_image)
    _check_init_latent(init_latent, config, plan, info, checkpoint)
    resume = ckpt.load(checkpoint, config, plan, info.latent_channels) if checkpoint and not restart else None
    pixels = None
    if config.init_image is not None and not (resume and resume["latents"]):
        from .init_image import prepare_pixels

        pixels = prepare_pixels(config, plan.phases[0])
    embeds = encode(config.prompt, config.negative_prompt, config.seed)

    own = executor is None
    executor = executor or InProcessExecutor(denoiser)
    try:
        executor.start(RenderContext(spec, embeds, (config.height, config.width), config.guidance_scale))
        # Auto units are sized for the workers' device, known once they run: the same units for every worker.
        device = executor.device_profile(config.gpu_memory)
        if device != plan.units.device:
            plan = build_plan(config, info.native_window, info.vae_scale, info.scheduler, info.latent_channels, from_image,
                              device=device)
        executor.context.view_batch_size = plan.units.view_batch_size
        executor.context.split_guidance = plan.units.split_guidance
        executor.context.patch_evals = plan.unet_patch_evals
        if pixels is not None:
            init_latent = encode_image(pixels, executor, config, info)
        sampler = _Sampler(config, plan, info, executor, callback, progress, checkpoint, resume, init_latent)
        sampler.checkpoint_every_s = checkpoint_every_s
        latent, phase_latents = sampler.run()
        t_dec = time.perf_counter()
        image = to_pil(decode(latent, executor, config, info))
        phase_images = [to_pil(decode(z, executor, config, info)) for z in phase_latents[:-1]] if config.save_phases else []
        if config.save_phases:
            phase_images.append(image)
        decode_s = time.perf_counter() - t_dec
        summary = executor.summary()
    finally:
        if own:
            executor.close()
    return RenderResult(
        image=image,
        latent=latent,
        plan=plan,
        config=config,
        phases=sampler.stats,
        seconds=time.perf_counter() - t_start,
        decode_seconds=decode_s,
        patch_evals=sum(p.patch_evals for p in sampler.stats),
        phase_images=phase_images,
        executor_summary=summary,
        resumed_phases=len(resume["latents"]) if resume else 0,
        phase_latents=phase_latents,
        generator_state=sampler.gen.get_state(),
    )


def decode(latent: torch.Tensor, executor: Executor, config: RenderConfig, info) -> torch.Tensor:
    """Tiled VAE decode: every tile normalised with the whole image's GroupNorm statistics, decoded with context."""
    tile = config.decode_tile or info.native_window
    overlap = config.decode_overlap if config.decode_overlap is not None else tile // 4
    context = config.decode_context if config.decode_context is not None else max(8, tile // 8)
    stats = executor.norm_stats(latent, max(tile, 64))  # a bounded, downsampled whole-image pass
    return decode_tiled(latent, lambda tiles: executor.decode(tiles, stats), tile, overlap, info.vae_scale, context)


def encode_image(image: torch.Tensor, executor: Executor, config: RenderConfig, info) -> torch.Tensor:
    """Tiled VAE encode of [1, 3, H, W] pixels in [-1, 1]: `decode`'s tiles, with the encoder's GroupNorm
    statistics of the whole image shared by every tile."""
    tile = config.decode_tile or info.native_window
    overlap = config.decode_overlap if config.decode_overlap is not None else tile // 4
    # The encoder reaches further than the decoder: 12 latents in the tiny VAE.
    context = config.decode_context if config.decode_context is not None else max(16, tile // 4)
    stats = executor.encoder_norm_stats(image, max(tile, 64) * info.vae_scale)
    return encode_tiled(image, lambda tiles: executor.encode(tiles, stats), tile, overlap, info.vae_scale, context)


def _check_init_latent(init_latent, config: RenderConfig, plan: Plan, info, checkpoint) -> None:
    if init_latent is None:
        return
    if config.init_image is not None:
        raise ValueError("give init_latent or config.init_image, not both")
    if checkpoint:
        raise ValueError("init_latent cannot be checked against a checkpoint; render with init_image, or without a checkpoint")
    p1 = plan.phases[0]
    want = (1, info.latent_channels, p1.latent_height, p1.latent_width)
    if not isinstance(init_latent, torch.Tensor) or tuple(init_latent.shape) != want:
        got = tuple(init_latent.shape) if isinstance(init_latent, torch.Tensor) else type(init_latent).__name__
        raise ValueError(f"init_latent must be phase 1's latent, a float tensor of shape {list(want)}, got {got}")
    if not torch.isfinite(init_latent).all():
        raise ValueError("init_latent has non-finite values (NaN or inf)")


class _Sampler:
    def __init__(self, config: RenderConfig, plan: Plan, info, executor: Executor, callback, progress: bool,
                 checkpoint: str | None = None, resume: dict | None = None, init_latent: torch.Tensor | None = None):
        from . import checkpoint as ckpt

        self.cfg, self.plan, self.info, self.ex = config, plan, info, executor
        self.callback, self.progress = callback, progress
        self.checkpoint, self.resume = checkpoint, resume
        self.init_latent = None if init_latent is None else init_latent.detach().to("cpu", torch.float32)
        self.saver = ckpt.Saver(checkpoint) if checkpoint else None
        self.checkpoint_every_s = 60.0  # in-phase checkpoints: seconds of work between two
        self.gen = torch.Generator().manual_seed(config.seed)
        self.stats: list[PhaseStats] = []
        self.bar = None  # one progress bar over every step of every phase

    def schedule(self, eta: float | None) -> S.NoiseSchedule:
        """This phase's tables: Scale-aware Scheduling's betas (eta None = the model's own)."""
        return phase_schedule(self.cfg, self.info.scheduler, eta)

    def run(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.progress:
            from tqdm.auto import tqdm

            done = len(self.resume["latents"]) if self.resume else 0
            within = self.resume.get("in_phase") if self.resume else None
            skipped = within["step"] - self.plan.phases[done].start_step if within else 0
            self.bar = tqdm(total=sum(p.steps for p in self.plan.phases[done:]) - skipped, unit="step", dynamic_ncols=True)
        try:
            return self._run()
        finally:
            if self.bar is not None:
                self.bar.close()

    def _run(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.latents: list[torch.Tensor] = []  # each finished phase's latent
        x = ref = within = None
        if self.resume:  # phases already done, the generator as it was after them, maybe a step of the next
            self.latents = list(self.resume["latents"])
            if self.latents:
                x, ref = self.latents[-1], ReferenceStats.of(self.latents[0])
            self.gen.set_state(self.resume["generator"])
            within = self.resume.get("in_phase")
        for phase in self.plan.phases[len(self.latents):]:
            t0, ex0, ev0 = time.perf_counter(), self.ex.stats.seconds, self.ex.stats.patch_evals
            self._saved_at = t0
            if phase.index == 1:
                x = self.reference_phase(phase, self.init_latent, within)
                ref = ReferenceStats.of(x)
            else:
                x = self.upscale_phase(phase, x, ref, within)
            within = None
            self.latents.append(x)
            if self.saver is not None:
                self.saver.save(self.cfg, self.latents, self.gen)
            self.stats.append(
                PhaseStats(phase.index, phase.width, phase.height, phase.steps, time.perf_counter() - t0,
                           self.ex.stats.seconds - ex0, self.ex.stats.patch_evals - ev0)
            )
        return x, self.latents

    # ---- phase 1: the reference latent -------------------------------------------
    def reference_phase(self, phase: PhasePlan, init: torch.Tensor | None = None, within: dict | None = None) -> torch.Tensor:
        """Text-to-image from noise; or from a picture's latent `init`, re-noised to the plan's start step
        (img2img) and denoised from there, or (no steps: init_strength 0) taken as it is."""
        sched = self.schedule(None)
        shape = (1, self.info.latent_channels, phase.latent_height, phase.latent_width)
        noise = torch.randn(shape, generator=self.gen)  # drawn even when unused: later draws stay text-to-image's
        if init is None:
            x = noise * S.init_noise_sigma(sched)
        else:
            x = S.add_noise(sched, init, noise, phase.start_step) if phase.steps else init.clone()
        if within:  # resumed from a checkpoint inside this phase
            x = self._resume_within(within)
        for i in self._steps(phase, within):
            self._checkpoint_within(phase, i, x)
            t = S.model_timestep(sched, i)
            (eps,) = self.ex.predict(t, [S.scale_model_input(sched, x, i)[0]], [(0, 0)])
            x = S.step(sched, x, eps[None], i)
            self._check(x.sum(), phase, i, t)
        return x

    # ---- phases 2..S: upscale, match, re-noise, denoise with fused views ---------
    def upscale_phase(self, phase: PhasePlan, prev: torch.Tensor, ref: ReferenceStats, within: dict | None = None) -> torch.Tensor:
        cfg, n, stride, vae_scale = self.cfg, self.plan.native_window, self.plan.stride, self.plan.vae_scale
        h, w, d = phase.latent_height, phase.latent_width, phase.dilation
        z = F.interpolate(prev, size=(h, w), mode="bicubic", align_corners=False)
        if cfg.sm_on:  # Statistical Matching
            z = statistical_matching(z, ref, d, cfg.sm_stats)
        sched = self.schedule(phase.eta)  # Scale-aware Scheduling
        noise = torch.randn(z.shape, generator=self.gen)  # one draw for the whole phase
        x = S.add_noise(sched, z, noise, phase.start_step)  # the shortcut: start at N - T0
        if within:  # resumed from a checkpoint inside this phase
            noise, x = within["noise"], self._resume_within(within)
        jr = jitter_range(n, stride)
        for i in self._steps(phase, within):
            self._checkpoint_within(phase, i, x, noise)
            t, c1, c2, c3 = self.weights(sched, i)
            # Skip residual towards the noised upsampled latent: (1 - c1) x + c1 zhat_i.
            x = torch.lerp(S.add_noise(sched, z, noise, i), x, 1 - c1)
            # Local views: jittered windows of the zero-padded latent.
            windows = local_windows(h, w, n, stride, self.gen if cfg.jitter else None)
            local = LocalViews(x, windows, jr, sched, i, vae_scale)
            # Dilated views: the UNet sees the blurred sub-lattices, the unblurred ones are stepped.
            dilated = DilatedViews(x, d, cfg.sigma * c3, sched, i)
            # Predictions, each view stepped as it comes back (overlapping the UNet calls still running).
            self.ex.denoise(t, [local, dilated])
            # Fusion: (1 - c2) local + c2 dilated.
            x = torch.lerp(local.result(), dilated.result(), c2)
            self._check(x.sum(), phase, i, t)
        if cfg.anchor_renorm:
            x = standardize_to(x, ref.mean, ref.std)
        return x

    def weights(self, sched: S.NoiseSchedule, i: int) -> tuple[int, float, float, float]:
        """Step i's timestep and DemoFusion's cosine weights c1 (skip residual), c2 (fusion), c3 (blur)."""
        cfg = self.cfg
        t = S.model_timestep(sched, i)
        cf = S.cosine_factor(t, sched.num_train_timesteps)
        return t, cf**cfg.cosine_scale_1, cf**cfg.cosine_scale_2, 0.99 * cf**cfg.cosine_scale_3 + 0.01

    # ---- helpers -----------------------------------------------------------------
    def _steps(self, phase: PhasePlan, within: dict | None = None):
        if self.bar is not None:
            self.bar.set_description(f"phase {phase.index}/{len(self.plan.phases)} {phase.width}x{phase.height}")
        return range(within["step"] if within else phase.start_step, phase.start_step + phase.steps)

    def _checkpoint_within(self, phase: PhasePlan, i: int, x: torch.Tensor, noise: torch.Tensor | None = None) -> None:
        """Every `checkpoint_every_s` seconds of work, the state before step i: a driver killed late in a long
        phase then loses at most that, not the phase. The generator is saved before step i's draws."""
        if self.saver is None or i == phase.start_step or time.perf_counter() - self._saved_at < self.checkpoint_every_s:
            return
        self.saver.save(self.cfg, self.latents, self.gen,
                        in_phase={"phase": phase.index, "step": i, "x": x, "noise": noise, "generator": self.gen.get_state()})
        self._saved_at = time.perf_counter()

    def _resume_within(self, within: dict) -> torch.Tensor:
        """Resume at the checkpointed step: its generator state (after the phase's own draws), and its x."""
        self.gen.set_state(within["generator"])
        return within["x"]

    def _check(self, total: torch.Tensor, phase: PhasePlan, i: int, t: int) -> None:
        """`total`: the sum of the step's output. A NaN or inf anywhere makes it one (latents never overflow it)."""
        if not torch.isfinite(total):
            raise RenderError(
                f"non-finite latent (NaN or inf) in phase {phase.index} at step {i} (timestep {t}); "
                "try --dtype float32 or another seed"
            )
        if self.bar is not None:
            self.bar.set_postfix_str(f"patches {self.ex.stats.patch_evals}/{self.plan.unet_patch_evals}", refresh=False)
            self.bar.update(1)
        if self.callback is not None:
            self.callback(phase.index, i, t)
