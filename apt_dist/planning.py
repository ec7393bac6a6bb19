"""The plan of a render: phases, sizes, schedules and UNet work, computed without any model.

The sampler builds its phases from the same functions, so the plan's counts are the
counts the executor sees (tested).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from . import schedules as S
from .config import ConfigError, RenderConfig
from .executor import make_units, makespan
from .geometry import count_local_windows, dilation_factor, phase_shapes


@dataclass(frozen=True)
class PhasePlan:
    index: int  # 1-based
    latent_height: int
    latent_width: int
    height: int  # pixels
    width: int
    dilation: int  # d: the d x d dilated sub-lattices (1 in phase 1)
    steps: int  # denoising steps run in this phase
    start_step: int  # index into the N-step schedule
    start_timestep: int | float  # what the UNet gets at start_step (fractional only for Euler + linspace)
    eta: float | None  # Scale-aware Scheduling (None: the model's own table)
    local_windows: int  # per step (phase 1: the whole latent)
    dilated_patches: int  # per step
    unit_rows: tuple[int, ...]  # the UNet batch rows of each call of a step (see executor.make_units)

    @property
    def units_per_step(self) -> int:
        return len(self.unit_rows)

    @property
    def patches_per_step(self) -> int:
        return self.local_windows + self.dilated_patches

    def step_barrier(self, workers: int) -> float:
        """One step's time on `workers` equal workers, in patch times (a patch with both guidance branches: 2 rows):
        the makespan of the step's units shared longest first (`executor.lpt_shares`, as the Ray executor shares them).

        A unit's time is taken as proportional to its rows. This is the optimum for the units auto sizing cuts from one
        patch shape (equal calls and one smaller remainder) and whenever no worker gets two units; for units of several
        sizes it may exceed the optimum, by at most a third.
        """
        return makespan(self.unit_rows, workers) / 2

    @property
    def patch_evals(self) -> int:
        return self.steps * self.patches_per_step


@dataclass(frozen=True)
class Plan:
    width: int
    height: int
    native_window: int
    vae_scale: int
    stride: int
    phases: tuple[PhasePlan, ...]
    scheduler: str = "euler"  # the step that runs: --scheduler, with auto resolved from the model's class
    scheduler_config: S.SchedulerConfig = S.SDXL_SCHEDULER  # the model's
    shortcut: float | None = None  # apt's fraction where it sets the upscaling phases' steps
    units: object = None  # devices.UnitChoice: the work units, resolved for the workers' device

    @property
    def unet_patch_evals(self) -> int:
        """UNet patch evaluations per guidance branch (each is two UNet rows with CFG)."""
        return sum(p.patch_evals for p in self.phases)

    @property
    def unet_calls(self) -> int:
        return sum(p.steps * p.units_per_step for p in self.phases)

    def timing(self, workers: int, seconds_per_patch: float) -> dict:
        """Ideal and barrier-bound wall time on `workers` equal workers, one patch (both branches) = seconds_per_patch.

        Every timestep is a barrier: a step takes the makespan of its units (`PhasePlan.step_barrier`, per phase in
        `step_patch_times`). The ratio ideal / barrier is the best efficiency a scheduler of these units can reach
        (for the units of one patch shape; see step_barrier).
        """
        ideal = self.unet_patch_evals * seconds_per_patch / workers
        per_step = [p.step_barrier(workers) for p in self.phases]
        barrier = sum(p.steps * t for p, t in zip(self.phases, per_step)) * seconds_per_patch
        return {"workers": workers, "ideal_s": ideal, "barrier_s": barrier, "bound_efficiency": ideal / barrier,
                "step_patch_times": per_step}

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "native_window": self.native_window,
            "vae_scale": self.vae_scale,
            "stride": self.stride,
            "scheduler": self.scheduler,
            "model_scheduler": self.scheduler_config.to_dict(),
            "shortcut": self.shortcut,
            "upscale_steps": self.phases[1].steps if len(self.phases) > 1 else None,
            "phases": [_without(asdict(p), "unit_rows") | {"units_per_step": p.units_per_step, "patches_per_step": p.patches_per_step,
                                                          "patch_evals": p.patch_evals} for p in self.phases],
            "unet_patch_evals": self.unet_patch_evals,
            "unet_calls": self.unet_calls,
            "units": self.units.to_dict() if self.units is not None else None,
        }


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def dilated_shapes(shape: tuple[int, int], d: int) -> list[tuple[int, int]]:
    h, w = shape
    return [(-(-(h - a) // d), -(-(w - b) // d)) for a in range(d) for b in range(d)]


def phase_schedule(config: RenderConfig, scheduler: S.SchedulerConfig, eta: float | None = None) -> S.NoiseSchedule:
    """The tables of a phase: the step `config.scheduler` resolves to, over the model's own config (eta: SaS)."""
    try:
        kind = S.resolve_kind(config.scheduler, scheduler)
    except S.UnsupportedScheduler as e:
        raise ConfigError("--scheduler", str(e)) from None
    if config.steps > scheduler.num_train_timesteps:
        raise ConfigError("--steps", f"must be at most the model's num_train_timesteps={scheduler.num_train_timesteps}, got {config.steps}")
    return S.make_schedule(kind, config.steps, scheduler, eta)


# Size bounds, checked arithmetically before a plan is built (a plan's cost grows with its patches).
MAX_PHASES = 64  # SDXL: 65536 px on the long side; the paper's largest posters are 16 phases
MAX_PATCHES_PER_STEP = 65536  # local windows + dilated sub-lattices of one step
DRIVER_LATENT_COPIES = 16  # latent-sized float32 buffers the driver holds in the last phase (x, padded, noise, ...)


def driver_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _axis_count(length: int, window: int, stride: int) -> int:  # geometry._axis_positions' count, without the list
    return 1 if length <= window else int((length - window) / stride - 1e-6) + 2


def check_bounds(config: RenderConfig, native: int, vae_scale: int, latent_channels: int = 4) -> None:
    """Refuse, before any work, a size the renderer cannot serve: a side below the native window in a
    multi-phase render, too many phases or patches, or a latent that would not fit this machine's memory.
    Counts come from arithmetic alone, so this is cheap for any size."""
    h, w = config.height // vae_scale, config.width // vae_scale
    long, short = max(h, w), min(h, w)
    big, small = ("--width", "--height") if w >= h else ("--height", "--width")
    px = native * vae_scale
    if long > native and short < native:
        # Phase 1 would be narrower than the model's window (a 2048x8 poster has a 1-latent side): each side is
        # at least the window, or the whole render is one phase at its own size.
        raise ConfigError(small, f"must be at least the model's native window of {px} px when the other side is "
                                 f"larger than it (a multi-phase render), got {min(config.width, config.height)}; "
                                 f"allowed: >= {px}, or both sides <= {px} (one phase)")
    phases = 1 if long <= native else max(2, round(long / native))
    if phases > MAX_PHASES:
        raise ConfigError(big, f"{config.width}x{config.height} would take {phases} phases; at most {MAX_PHASES} "
                               f"(a long side of about {MAX_PHASES * px} px for this model)")
    stride = config.stride or native // 2
    d = max(1, round(long / native)) if phases > 1 else 0
    patches = _axis_count(h, min(native, h), stride) * _axis_count(w, min(native, w), stride) + d * d
    if patches > MAX_PATCHES_PER_STEP:
        raise ConfigError(big if config.stride is None else "--stride",
                          f"{config.width}x{config.height} with a stride of {stride} latents needs {patches} patches "
                          f"per step; at most {MAX_PATCHES_PER_STEP} (a larger --stride, or a smaller size)")
    need = DRIVER_LATENT_COPIES * latent_channels * h * w * 4
    have = driver_memory_bytes()
    if need > have:
        raise ConfigError(big, f"{config.width}x{config.height} needs about {need / 2**30:.1f} GiB of driver memory for "
                               f"its latents ({DRIVER_LATENT_COPIES} float32 copies of {latent_channels}x{h}x{w}); "
                               f"this machine has {have / 2**30:.1f} GiB")


def build_plan(config: RenderConfig, native: int, vae_scale: int, scheduler: S.SchedulerConfig | None = None,
               latent_channels: int = 4, from_image: bool | None = None, device=None) -> Plan:
    """`scheduler`: the model's scheduler config (None: SDXL base's). `from_image`: phase 1 starts from a
    picture's latent (img2img: `config.init_steps` steps; None: whether `config.init_image` is set).
    `device`: the workers' devices.DeviceProfile, which auto units are sized for (None: this process's,
    as config.device and config.gpu_memory say)."""
    from .devices import choose_units, local_device

    from_image = config.init_image is not None if from_image is None else from_image
    scheduler = scheduler or S.SDXL_SCHEDULER
    config.validate_for_model(native, scheduler.num_train_timesteps)
    check_bounds(config, native, vae_scale, latent_channels)
    units_choice = choose_units(config, native, device or local_device(config.device, config.gpu_memory))
    vbs, split = units_choice.view_batch_size, units_choice.split_guidance
    sched = phase_schedule(config, scheduler)
    stride = config.stride or native // 2
    shapes = phase_shapes(config.height // vae_scale, config.width // vae_scale, native)
    phases = []
    for index, (h, w) in enumerate(shapes, start=1):
        if index == 1:
            d, steps, local, dil = 1, config.init_steps if from_image else config.steps, 1, 0
            units = make_units([(h, w)], vbs, split)
        else:
            d = dilation_factor((h, w), native)
            steps = config.upscale_steps
            local = count_local_windows(h, w, native, stride)
            dshapes = dilated_shapes((h, w), d)
            dil = len(dshapes)
            lshape = (min(native, h), min(native, w))
            # One predict() per step: local windows first, then the sub-lattices (as the sampler sends them).
            units = make_units([lshape] * local + dshapes, vbs, split)
        start = config.steps - steps
        phases.append(
            PhasePlan(
                index=index,
                latent_height=h,
                latent_width=w,
                height=h * vae_scale,
                width=w * vae_scale,
                dilation=d,
                steps=steps,
                start_step=start,
                start_timestep=S.model_timestep(sched, start) if start < config.steps else 0,  # 0: a picture as it is
                eta=config.eta_for(index),
                local_windows=local,
                dilated_patches=dil,
                unit_rows=tuple(len(u.rows) for u in units),
            )
        )
    if config.init_image is not None:
        from .init_image import check_fit

        check_fit(config, phases[0])
    shortcut = config.shortcut if config.method == "apt" and config.shortcut_steps is None else None
    return Plan(config.width, config.height, native, vae_scale, stride, tuple(phases), sched.kind, scheduler, shortcut,
                units_choice)


def plan(config: RenderConfig) -> Plan:
    """The plan of `config`: reads the model's configuration only, loads no weights. With config.gpu_memory, for CUDA
    workers of that memory."""
    from .devices import gpu_workers
    from .loading import model_source
    from .models import model_info

    config.validate()
    info = model_info(model_source(config))
    # --gpu-memory: plan for CUDA workers of that size, whatever this machine has (unless --device cpu).
    device = gpu_workers(config.gpu_memory) if config.gpu_memory is not None and config.device != "cpu" else None
    return build_plan(config, info.native_window, info.vae_scale, info.scheduler, info.latent_channels, device=device)
