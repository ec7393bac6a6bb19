"""The plan of a render: phases, sizes, schedules and UNet work, computed without any model.

The sampler builds its phases from the same functions, so the plan's counts are the
counts the executor sees (tested).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import RenderConfig
from .executor import make_units
from .geometry import count_local_windows, dilation_factor, phase_shapes
from .schedules import leading_timesteps


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
    start_timestep: int
    eta: float  # Scale-aware Scheduling (0.5 = the model's own table)
    local_windows: int  # per step (phase 1: the whole latent)
    dilated_patches: int  # per step
    units_per_step: int  # UNet calls per step (see executor.make_units)

    @property
    def patches_per_step(self) -> int:
        return self.local_windows + self.dilated_patches

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

    @property
    def unet_patch_evals(self) -> int:
        """UNet patch evaluations per guidance branch (each is two UNet rows with CFG)."""
        return sum(p.patch_evals for p in self.phases)

    @property
    def unet_calls(self) -> int:
        return sum(p.steps * p.units_per_step for p in self.phases)

    def timing(self, workers: int, seconds_per_patch: float) -> dict:
        """Ideal and barrier-bound wall time on `workers` equal workers, one patch (both branches) = seconds_per_patch.

        Every timestep is a barrier: a step takes ceil(units / workers) unit-times. The
        ratio ideal / barrier is the best efficiency any scheduler of these units can reach.
        """
        ideal = self.unet_patch_evals * seconds_per_patch / workers
        barrier = 0.0
        for p in self.phases:
            unit_s = seconds_per_patch * p.patches_per_step / p.units_per_step
            barrier += p.steps * math.ceil(p.units_per_step / workers) * unit_s
        return {"workers": workers, "ideal_s": ideal, "barrier_s": barrier, "bound_efficiency": ideal / barrier}

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "native_window": self.native_window,
            "vae_scale": self.vae_scale,
            "stride": self.stride,
            "phases": [asdict(p) | {"patches_per_step": p.patches_per_step, "patch_evals": p.patch_evals} for p in self.phases],
            "unet_patch_evals": self.unet_patch_evals,
            "unet_calls": self.unet_calls,
        }


def dilated_shapes(shape: tuple[int, int], d: int) -> list[tuple[int, int]]:
    h, w = shape
    return [(-(-(h - a) // d), -(-(w - b) // d)) for a in range(d) for b in range(d)]


def build_plan(config: RenderConfig, native: int, vae_scale: int, num_train_timesteps: int = 1000) -> Plan:
    config.validate_for_model(native)
    stride = config.stride or native // 2
    shapes = phase_shapes(config.height // vae_scale, config.width // vae_scale, native)
    timesteps = leading_timesteps(config.steps, num_train_timesteps)
    phases = []
    for index, (h, w) in enumerate(shapes, start=1):
        if index == 1:
            d, steps, local, dil = 1, config.steps, 1, 0
            units = len(make_units([(h, w)], config.view_batch_size, config.split_guidance))
        else:
            d = dilation_factor((h, w), native)
            steps = config.upscale_steps
            local = count_local_windows(h, w, native, stride)
            dshapes = dilated_shapes((h, w), d)
            dil = len(dshapes)
            lshape = (min(native, h), min(native, w))
            # One predict() per step: local windows first, then the sub-lattices (as the sampler sends them).
            units = len(make_units([lshape] * local + dshapes, config.view_batch_size, config.split_guidance))
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
                start_timestep=int(timesteps[start]),
                eta=config.eta_for(index),
                local_windows=local,
                dilated_patches=dil,
                units_per_step=units,
            )
        )
    return Plan(config.width, config.height, native, vae_scale, stride, tuple(phases))


def plan(config: RenderConfig) -> Plan:
    """The plan of `config`: reads the model's configuration only, loads no weights."""
    from .models import ModelSpec, model_info

    config.validate()
    info = model_info(ModelSpec(config.model, config.dtype, config.device))
    return build_plan(config, info.native_window, info.vae_scale, info.num_train_timesteps)
