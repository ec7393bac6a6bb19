"""The APT sampler: DemoFusion's progressive upscaling with APT's three changes.

Read top to bottom, `render` is the paper:

  phase 1      plain SDXL text-to-image at the native size -> reference latent z1
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

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import schedules as S
from .config import RenderConfig
from .executor import DeferredPatches, Executor, InProcessExecutor, RenderContext, batch
from .fusion import Fusion, WindowAverage
from .geometry import WindowViews, crop_pixels, gaussian_blur, jitter_range, lattice_offsets, local_windows, row_bands
from .matching import ReferenceStats, standardize_to, statistical_matching
from .outputs import to_pil
from .planning import PhasePlan, Plan, build_plan
from .tiling import decode_tiled


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


StepCallback = Callable[[int, int, int], None]  # (phase, step, timestep), after each step


def render(
    config: RenderConfig,
    executor: Executor | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    checkpoint: str | None = None,
) -> RenderResult:
    """Render `config`. `executor` defaults to an in-process one on `config.device`.

    With `checkpoint` (a file path), the state after each phase is written there, and a
    render that finds a checkpoint of the same configuration resumes after its last phase.
    """
    from . import checkpoint as ckpt
    from .models import ModelSpec, encode_prompt, model_info

    config.validate()
    resume = ckpt.load(checkpoint, config) if checkpoint else None
    t_start = time.perf_counter()
    spec = ModelSpec(config.model, config.dtype, config.device)
    info = model_info(spec)
    plan = build_plan(config, info.native_window, info.vae_scale, info.num_train_timesteps)
    embeds = encode_prompt(spec, config.prompt, config.negative_prompt, seed=config.seed)

    own = executor is None
    executor = executor or InProcessExecutor()
    try:
        executor.start(
            RenderContext(spec, embeds, (config.height, config.width), config.guidance_scale, config.view_batch_size, config.split_guidance)
        )
        sampler = _Sampler(config, plan, info, executor, callback, progress, checkpoint, resume)
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
    )


def decode(latent: torch.Tensor, executor: Executor, config: RenderConfig, info) -> torch.Tensor:
    """Tiled VAE decode: every tile normalised with the whole image's GroupNorm statistics, decoded with context."""
    tile = config.decode_tile or info.native_window
    overlap = config.decode_overlap if config.decode_overlap is not None else tile // 4
    context = config.decode_context if config.decode_context is not None else max(8, tile // 8)
    stats = executor.norm_stats(latent, max(tile, 64))  # a bounded, downsampled whole-image pass
    return decode_tiled(latent, lambda tiles: executor.decode(tiles, stats), tile, overlap, info.vae_scale, context)


class _Sampler:
    def __init__(self, config: RenderConfig, plan: Plan, info, executor: Executor, callback, progress: bool,
                 checkpoint: str | None = None, resume: dict | None = None):
        self.cfg, self.plan, self.info, self.ex = config, plan, info, executor
        self.callback, self.progress = callback, progress
        self.checkpoint, self.resume = checkpoint, resume
        self.gen = torch.Generator().manual_seed(config.seed)
        self.stats: list[PhaseStats] = []
        self.bar = None  # one progress bar over every step of every phase

    def schedule(self, eta: float) -> S.NoiseSchedule:
        """This phase's tables: Scale-aware Scheduling's betas (eta 0.5 = the model's own)."""
        i = self.info
        return S.make_schedule(self.cfg.scheduler, self.cfg.steps, S.sas_betas(i.num_train_timesteps, i.beta_start, i.beta_end, eta))

    def run(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.progress:
            from tqdm.auto import tqdm

            done = len(self.resume["latents"]) if self.resume else 0
            self.bar = tqdm(total=sum(p.steps for p in self.plan.phases[done:]), unit="step", dynamic_ncols=True)
        try:
            return self._run()
        finally:
            if self.bar is not None:
                self.bar.close()

    def _run(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        from . import checkpoint as ckpt

        latents: list[torch.Tensor] = []
        x = ref = None
        if self.resume:  # phases already done: their latents and the generator as it was after them
            latents = list(self.resume["latents"])
            x, ref = latents[-1], ReferenceStats.of(latents[0])
            self.gen.set_state(self.resume["generator"])
        for phase in self.plan.phases[len(latents):]:
            t0, ex0, ev0 = time.perf_counter(), self.ex.stats.seconds, self.ex.stats.patch_evals
            if phase.index == 1:
                x = self.reference_phase(phase)
                ref = ReferenceStats.of(x)
            else:
                x = self.upscale_phase(phase, x, ref)
            latents.append(x)
            if self.checkpoint:
                ckpt.save(self.checkpoint, self.cfg, latents, self.gen)
            self.stats.append(
                PhaseStats(phase.index, phase.width, phase.height, phase.steps, time.perf_counter() - t0,
                           self.ex.stats.seconds - ex0, self.ex.stats.patch_evals - ev0)
            )
        return x, latents

    # ---- phase 1: the reference latent -------------------------------------------
    def reference_phase(self, phase: PhasePlan) -> torch.Tensor:
        sched = self.schedule(0.5)
        shape = (1, self.info.latent_channels, phase.latent_height, phase.latent_width)
        x = torch.randn(shape, generator=self.gen) * S.init_noise_sigma(sched)
        for i in self._steps(phase):
            t = int(sched.timesteps[i])
            (eps,) = self.ex.predict(t, [S.scale_model_input(sched, x, i)[0]], [(0, 0)])
            x = S.step(sched, x, eps[None], i)
            self._check(x.sum(), phase, i, t)
        return x

    # ---- phases 2..S: upscale, match, re-noise, denoise with fused views ---------
    def upscale_phase(self, phase: PhasePlan, prev: torch.Tensor, ref: ReferenceStats) -> torch.Tensor:
        cfg, n = self.cfg, self.plan.native_window
        h, w, d = phase.latent_height, phase.latent_width, phase.dilation
        z = F.interpolate(prev, size=(h, w), mode="bicubic", align_corners=False)
        if cfg.sm_on:  # Statistical Matching
            z = statistical_matching(z, ref, d, cfg.sm_stats)
        sched = self.schedule(phase.eta)  # Scale-aware Scheduling
        noise = torch.randn(z.shape, generator=self.gen)  # one draw for the whole phase
        x = S.add_noise(sched, z, noise, phase.start_step)  # the shortcut: start at N - T0
        jr = jitter_range(n, self.plan.stride)
        offsets = lattice_offsets(d)
        steps = self._steps(phase)

        def ahead(i: int):  # what step i needs that its input x does not decide: its windows' draws, its noised z
            return local_windows(h, w, n, self.plan.stride, self.gen if cfg.jitter else None), S.add_noise(sched, z, noise, i)

        def weights(i: int):  # the timestep and DemoFusion's cosine weights of step i
            t = int(sched.timesteps[i])
            cf = S.cosine_factor(t, sched.num_train_timesteps)
            return t, cf**cfg.cosine_scale_1, cf**cfg.cosine_scale_2, 0.99 * cf**cfg.cosine_scale_3 + 0.01

        # Each step's input lives in a zero-bordered buffer (the jitter's padding), next to its scaled
        # copy (the model's input). Two of each: while step i's UNet calls run, the rows of its output
        # that are final already become step i + 1's input, in fixed row bands (below).
        padded = [torch.zeros(1, x.shape[1], h + 2 * jr, w + 2 * jr) for _ in range(2)]
        scaled = padded if S.input_divisor(sched, 0) is None else [torch.zeros_like(p) for p in padded]
        inner = (slice(None), slice(None), slice(jr, jr + h), slice(jr, jr + w))
        bands = row_bands(h, max(8, self.plan.stride))  # windows start a stride apart: the final rows grow by strides
        rows_of = [{r0: (p[inner][:, :, r0:r1], q[inner][:, :, r0:r1]) for r0, r1 in bands} for p, q in zip(padded, scaled)]
        lattices_of = [[p[inner][0, :, a::d, b::d] for a, b in offsets] for p in padded]  # views: 0.1 ms a step at 4096
        x_dilated = torch.empty_like(x)  # each step's stepped sub-lattices, fused before the next step writes it

        @functools.cache
        def residual(i: int):  # step i's skip-residual weight and model-input divisor, once per step, not per band
            return 1 - weights(i)[1], S.input_divisor(sched, i)

        def skip_residual(i: int, x: torch.Tensor, noised: torch.Tensor, r0: int | None = None) -> None:
            """Step i's input (or its band from row r0): the skip residual (1 - c1) x + c1 noised, one pass,
            and the model's input."""
            xi, xi_in = (padded[i % 2][inner], scaled[i % 2][inner]) if r0 is None else rows_of[i % 2][r0]
            weight, divisor = residual(i)
            torch.lerp(noised if r0 is None else noised[:, :, r0 : r0 + xi.shape[2]], x, weight, out=xi)
            if scaled is not padded:
                torch.div(xi, divisor, out=xi_in)

        upcoming = ahead(steps[0]) if steps else None
        if steps:
            skip_residual(steps[0], x, upcoming[1])
        for i in steps:
            t, _, c2, c3 = weights(i)  # c1 goes in through residual(i)
            windows, noised = upcoming
            xp, xp_in = padded[i % 2], scaled[i % 2]
            x = xp[inner]  # this step's input, after the skip residual towards the noised upsampled latent

            # Local views: jittered windows of the zero-padded latent (views made on first use).
            local_views = WindowViews(xp, windows)
            crops = [crop_pixels(win, jr, self.plan.vae_scale) for win in windows]

            # Dilated views: the UNet sees the blurred sub-lattices, re-standardised to x; each
            # UNBLURRED sub-lattice is then stepped with the prediction made from its blurred twin.
            lattices = lattices_of[i % 2]  # x's sub-lattices

            def dilated_inputs(x=x, c3=c3, i=i):
                x = x.contiguous()  # reduced in the order of a plain tensor: the image is what it was before the padded buffers
                blurred = standardize_to(gaussian_blur(x, 2 * d - 1, cfg.sigma * c3), x.mean(), x.std())
                blurred_in = S.scale_model_input(sched, blurred, i)
                return [blurred_in[0, :, a::d, b::d] for a, b in offsets]

            # Model inputs are views of the scaled buffer. The blurred ones are made when the executor
            # first needs them: the calls for the local windows are already running while the driver blurs.
            model_in = DeferredPatches(WindowViews(xp_in, windows), [lat.shape for lat in lattices], dilated_inputs)

            # Each view is stepped as soon as its prediction is back, while other UNet calls still
            # run: the windows are averaged where they overlap, the sub-lattices written in place.
            average = WindowAverage(x.shape[1], *xp.shape[-2:], windows)
            last = i + 1 == steps.stop
            out = torch.empty_like(x) if last else None  # the phase's result; else the output feeds the next input
            fused = Fusion(bands, len(offsets))
            sums: list[torch.Tensor] = []  # of the output's bands: one is NaN or inf if any value is

            def fuse(upto: int, i=i, c2=c2, average=average, out=out, sums=sums) -> None:
                """Fuse the output rows [.., upto): (1 - c2) local + c2 dilated, one pass per band; each band
                then becomes the next step's input at once, so little is left to do after the last reply."""
                for r0, r1 in fused.take(upto):
                    local = average.result(slice(jr + r0, jr + r1), slice(jr, jr + w))[None]
                    xo = torch.lerp(local, x_dilated[:, :, r0:r1], c2, out=None if out is None else out[:, :, r0:r1])
                    sums.append(xo.sum())
                    if out is None:
                        skip_residual(i + 1, xo, upcoming[1], r0)

            nw = len(windows)

            def then(ks: list[int], eps: torch.Tensor, i=i, nw=nw, local_views=local_views, lattices=lattices,
                     average=average, fused=fused, fuse=fuse) -> None:  # views of one shape
                views = [local_views[k] if k < nw else lattices[k - nw] for k in ks]
                stepped = S.step(sched, batch(views), eps, i)
                for k, s in zip(ks, stepped):
                    if k < nw:
                        average.add(k, s)
                    else:
                        a, b = offsets[k - nw]
                        x_dilated[0, :, a::d, b::d] = s
                        fused.lattice_done()
                fuse(average.final_rows() - jr)  # the rows no window still to come covers (once the sub-lattices are in)

            def meanwhile(i=i, average=average):  # while the UNet calls run: the next step's draws, this step's sums
                nonlocal upcoming
                if i + 1 < steps.stop:
                    upcoming = ahead(i + 1)  # the generator's draws stay in the same order
                average.prepare()

            self.ex.predict(t, model_in, crops + [(0, 0)] * len(offsets), then=then, meanwhile=meanwhile)
            fuse(h)  # the rows the last replies held
            self._check(torch.stack(sums).sum(), phase, i, t)
            if last:
                x = out
        if cfg.anchor_renorm:
            x = standardize_to(x, ref.mean, ref.std)
        return x

    # ---- helpers -----------------------------------------------------------------
    def _steps(self, phase: PhasePlan):
        if self.bar is not None:
            self.bar.set_description(f"phase {phase.index}/{len(self.plan.phases)} {phase.width}x{phase.height}")
        return range(phase.start_step, phase.start_step + phase.steps)

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
