"""The reference sampler: the definition of the image.

The paper top to bottom, one short function per phase: no overlap with workers, no
reused buffers, no callbacks, no work units. It calls the pure modules (schedules,
geometry, matching) and one UNet (a `models.Denoiser`) directly, one patch at a time with
both guidance branches in one call, as diffusers does. The production sampler
(`sampler.py`, on any executor) must give the same latent to float32 rounding: the tests
in tests/test_reference.py hold it to that, and so a fast path can never change the image
unnoticed. It is slow on purpose; use it to check, not to render.

Random draws come from one generator seeded with the render's seed, in this order:
phase 1's noise; then per upscaling phase its one noise tensor, then each step's window
jitter. The production sampler draws the same numbers in the same order. Upscaling a
picture (`init_latent`), phase 1's noise re-noises its latent (img2img), and is drawn
even when it is not used (init_strength 0), so the upscaling phases draw what they draw
after text-to-image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import schedules as S
from .config import RenderConfig
from .geometry import crop_pixels, gaussian_blur, jitter_range, lattice_offsets, local_windows
from .matching import ReferenceStats, standardize_to, statistical_matching
from .planning import PhasePlan, Plan, build_plan, phase_schedule


def reference_render(config: RenderConfig, denoiser, embeds, init_latent: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every phase's final latent [1, C, h, w], the last one the image's. `denoiser`: a `models.Denoiser`.
    `init_latent`: a picture's latent at phase 1's size, which phase 1 starts from (see `reference_phase`)."""
    info = denoiser.info
    plan = build_plan(config, info.native_window, info.vae_scale, info.scheduler, from_image=init_latent is not None)
    unet = _GuidedUNet(denoiser, embeds, (config.height, config.width), config.guidance_scale)
    gen = torch.Generator().manual_seed(config.seed)
    z1 = reference_phase(config, plan.phases[0], info, unet, gen, init_latent)
    latents = [z1]
    for phase in plan.phases[1:]:
        latents.append(upscale_phase(config, plan, phase, info, unet, gen, latents[-1], ReferenceStats.of(z1)))
    return latents


def reference_phase(config: RenderConfig, phase: PhasePlan, info, unet, gen: torch.Generator,
                    init: torch.Tensor | None = None) -> torch.Tensor:
    """Phase 1: plain SDXL text-to-image at the native size. From a picture's latent `init`: diffusers'
    img2img, which noises it to the start step int(steps * init_strength) steps before the end and denoises
    from there; no steps (init_strength 0): the latent as it is."""
    sched = phase_schedule(config, info.scheduler)  # the model's own table
    noise = torch.randn(1, info.latent_channels, phase.latent_height, phase.latent_width, generator=gen)
    if init is None:
        x = noise * S.init_noise_sigma(sched)
    elif phase.steps == 0:
        x = init
    else:
        x = S.add_noise(sched, init, noise, phase.start_step)
    for i in range(phase.start_step, config.steps):
        eps = unet(S.scale_model_input(sched, x, i), S.model_timestep(sched, i), (0, 0))
        x = S.step(sched, x, eps, i)
    return x


def upscale_phase(config: RenderConfig, plan: Plan, phase: PhasePlan, info, unet, gen: torch.Generator,
                  prev: torch.Tensor, ref: ReferenceStats) -> torch.Tensor:
    """Phases 2..S: upsample, Statistical Matching, Scale-aware Scheduling, shortcut, fused local/dilated views."""
    n, stride, d = plan.native_window, plan.stride, phase.dilation
    h, w = phase.latent_height, phase.latent_width
    z = F.interpolate(prev, size=(h, w), mode="bicubic", align_corners=False)
    if config.sm_on:
        z = statistical_matching(z, ref, d, config.sm_stats)
    sched = phase_schedule(config, info.scheduler, phase.eta)  # Scale-aware Scheduling
    noise = torch.randn(z.shape, generator=gen)
    x = S.add_noise(sched, z, noise, phase.start_step)  # the shortcut: start at step N - T0
    jr = jitter_range(n, stride)
    for i in range(phase.start_step, config.steps):
        t = S.model_timestep(sched, i)
        cf = S.cosine_factor(t, sched.num_train_timesteps)
        c1, c2, c3 = cf**config.cosine_scale_1, cf**config.cosine_scale_2, 0.99 * cf**config.cosine_scale_3 + 0.01

        # Skip residual towards the noised upsampled latent.
        x = (1 - c1) * x + c1 * S.add_noise(sched, z, noise, i)

        # Local views: jittered windows of the zero-padded latent, each stepped, averaged where they overlap.
        windows = local_windows(h, w, n, stride, gen if config.jitter else None)
        padded = F.pad(x, (jr, jr, jr, jr))
        total, count = torch.zeros_like(padded), torch.zeros_like(padded[:, :1])
        for win in windows:
            ys, xs = win.slices()
            view = padded[:, :, ys, xs]
            eps = unet(S.scale_model_input(sched, view, i), t, crop_pixels(win, jr, info.vae_scale))
            total[:, :, ys, xs] += S.step(sched, view, eps, i)
            count[:, :, ys, xs] += 1
        local = (total / count.clamp(min=1))[:, :, jr : jr + h, jr : jr + w]

        # Dilated views: the UNet sees each blurred sub-lattice; the unblurred one is stepped.
        blurred = standardize_to(gaussian_blur(x, 2 * d - 1, config.sigma * c3), x.mean(), x.std())
        dilated = torch.empty_like(x)
        for a, b in lattice_offsets(d):
            eps = unet(S.scale_model_input(sched, blurred[:, :, a::d, b::d], i), t, (0, 0))
            dilated[:, :, a::d, b::d] = S.step(sched, x[:, :, a::d, b::d], eps, i)

        x = (1 - c2) * local + c2 * dilated
    if config.anchor_renorm:
        x = standardize_to(x, ref.mean, ref.std)
    return x


class _GuidedUNet:
    """One patch [1, C, h, w] -> its classifier-free-guided noise prediction, both branches in one UNet call."""

    def __init__(self, denoiser, embeds, original_size: tuple[int, int], guidance_scale: float):
        self.denoiser, self.embeds, self.original_size, self.g = denoiser, embeds, original_size, guidance_scale

    def __call__(self, x: torch.Tensor, t, crop: tuple[int, int]) -> torch.Tensor:
        rows = torch.cat([x, x]).contiguous()
        uncond, cond = self.denoiser.predict(rows, t, [crop, crop], [0, 1], self.embeds, self.original_size)
        return (uncond + self.g * (cond - uncond))[None]
