"""apt-dist's `--method demofusion` against the published DemoFusion pipeline's algorithm.

`demofusion_render` below is this project's own compact rewrite of what PRIS-CV/DemoFusion's
`pipeline_demofusion_sdxl.py` does (phase sizes, bicubic upsampling, one noise tensor per phase,
the skip residual with c1, local views with their stride, jitter padding and crop coordinates,
dilated sampling with the Gaussian blur and its padding, the c2 fusion as value / count, the
per-phase re-standardisation to phase 1's statistics), stepped with diffusers' own stateful
EulerDiscreteScheduler object as the pipeline uses it. It runs apt-dist's tiny UNet directly
(not through apt-dist's `Denoiser.predict`), with apt-dist's random draws injected: one generator
seeded with the render's seed gives phase 1's noise, then each phase's noise tensor (DemoFusion
draws the latter from the global torch RNG, and its jitter from Python's `random`). Jitter is off.

`Conventions` switches each point where apt-dist chooses differently from the published code.
With apt-dist's choice at every point the two agree to float32 rounding (ATOL); with DemoFusion's
choice at any one point they differ by far more, so every choice shows in the image.

Tolerance: latents (values up to about 25 here) agree to 2e-4 absolute, the tolerance of
tests/test_reference.py. The two do the same arithmetic in another form: c1/c2/c3 in float32 tensors (DemoFusion) or float64 Python floats
(apt-dist), Euler's step as x + (x - x0) / sigma * dt (diffusers) or x + dt * eps (apt-dist),
the blur as one 2-D convolution with float32 taps or two 1-D passes with float64 taps, the fusion
as value / count with count = (1 - c2) + c2 rather than a lerp. Each differs in the last bits
(~1e-7 relative), and the UNet over a few steps and phases carries that to a few 1e-5 (measured).
Each of DemoFusion's choices below moves the final latent by at least 10x the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from apt_dist.config import RenderConfig
from apt_dist.geometry import phase_shapes
from apt_dist.models import Denoiser, ModelSpec, build_tiny_pipeline, encode_prompt
from apt_dist.reference import reference_render

ATOL = 2e-4


@dataclass(frozen=True)
class Conventions:
    """Where apt-dist and the published DemoFusion code choose differently."""

    crop_coords: str  # "unpadded": window top-left in the image (apt-dist) | "padded": in the jitter-padded latent
    blur_edges: str  # "replicate" (apt-dist) | "zeros": F.conv2d's zero padding
    phase_sizes: str  # "apt": geometry.phase_shapes | "demofusion": long side = native * s, short side floored
    sub_lattices: str  # "unequal": x[a::d, b::d] of the latent (apt-dist) | "zero_padded": pad top/left to a multiple of d
    input_scaling: str  # "own_step": each patch with its step's sigma (apt-dist) | "step_counter": the scheduler's counter


APT_DIST = Conventions("unpadded", "replicate", "apt", "unequal", "own_step")
PUBLISHED = Conventions("padded", "zeros", "demofusion", "zero_padded", "step_counter")


# ---- DemoFusion's algorithm, written here from the published pipeline ----------------------------------------------


def demofusion_phase_shapes(height: int, width: int, native: int, vae_scale: int) -> list[tuple[int, int]]:
    """Latent (h, w) of DemoFusion's phases for a (height, width) image in pixels.

    scale_num = int(max side / native pixels) phases; phase 1 is the image divided by scale_num
    (pixels, floored); phase s has long side native * s and short side int(that * aspect ratio).
    """
    px = native * vae_scale
    scale_num = int(max(height / px, width / px))
    aspect = min(height, width) / max(height, width)
    shapes = [((height // scale_num) // vae_scale, (width // scale_num) // vae_scale)]
    for s in range(2, scale_num + 1):
        long, short = px * s, int(px * s * aspect)
        h, w = (long, short) if height > width else (short, long)
        shapes.append((int(h / vae_scale), int(w / vae_scale)))
    return shapes


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """DemoFusion's view positions along one axis: stride apart, the last one moved back inside."""
    if length <= window:
        return [0]
    count = int((length - window) / stride - 1e-6) + 2
    return [min(k * stride, length - window) for k in range(count)]


def _blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor, edges: str) -> torch.Tensor:
    """DemoFusion's Gaussian filter: a depthwise 2-D convolution with float32 taps."""
    channels = x.shape[1]
    taps = torch.exp(-((torch.arange(kernel_size) - (kernel_size - 1) / 2) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    kernel = (taps[:, None] * taps[None, :]).expand(channels, 1, kernel_size, kernel_size)
    p = kernel_size // 2
    if edges == "zeros":
        return F.conv2d(x, kernel, padding=p, groups=channels)
    return F.conv2d(F.pad(x, (p, p, p, p), mode="replicate"), kernel, groups=channels)


class _DemoFusionUNet:
    """Views [k, C, h, w] -> guided noise, in DemoFusion's batch layout: each view as (uncond, cond) rows."""

    def __init__(self, unet, embeds, size: tuple[int, int], guidance_scale: float):
        self.unet, self.embeds, self.size, self.g = unet, embeds, size, guidance_scale

    @torch.no_grad()
    def __call__(self, views: torch.Tensor, t: torch.Tensor, crops: list[tuple[int, int]]) -> torch.Tensor:
        k = views.shape[0]
        height, width = self.size
        time_ids = torch.tensor(
            [[height, width, top, left, height, width] for top, left in crops for _ in "uc"], dtype=torch.float32
        )
        out = self.unet(
            views.repeat_interleave(2, dim=0),
            t,
            encoder_hidden_states=self.embeds.prompt_embeds.repeat(k, 1, 1),
            added_cond_kwargs={"text_embeds": self.embeds.pooled.repeat(k, 1), "time_ids": time_ids},
            return_dict=False,
        )[0]
        uncond, cond = out[0::2], out[1::2]
        return uncond + self.g * (cond - uncond)


def demofusion_render(
    config: RenderConfig, denoiser, embeds, conventions: Conventions, view_batch_size: int = 1
) -> list[torch.Tensor]:
    """Every phase's final latent, as DemoFusion's pipeline computes them (Euler, jitter off, injected noise).

    view_batch_size > 1 needs sub-lattices of equal size (one torch.cat per batch, as in the pipeline).
    """
    from diffusers import EulerDiscreteScheduler

    info = denoiser.info
    n, f, T = info.native_window, info.vae_scale, info.num_train_timesteps
    stride = n // 2  # DemoFusion: 64 for SDXL's 128
    jr = (n - stride) // 4
    # One scheduler object for the whole render, as the pipeline has: its step counter carries across phases.
    sched = EulerDiscreteScheduler.from_config(build_tiny_pipeline().scheduler.config)
    sched.set_timesteps(config.steps)
    timesteps = sched.timesteps
    unet = _DemoFusionUNet(denoiser.unet, embeds, (config.height, config.width), config.guidance_scale)
    if conventions.phase_sizes == "demofusion":
        shapes = demofusion_phase_shapes(config.height, config.width, n, f)
    else:
        shapes = phase_shapes(config.height // f, config.width // f, n)

    def model_input(views, t):
        if conventions.input_scaling == "own_step":
            sched._init_step_index(t)
        return sched.scale_model_input(views, t)

    def step(eps, t, views):
        sched._init_step_index(t)  # DemoFusion re-seats the counter before every patch batch's step
        return sched.step(eps, t, views, return_dict=False)[0]

    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randn(1, info.latent_channels, *shapes[0], generator=gen) * sched.init_noise_sigma
    for t in timesteps:  # phase 1: plain SDXL
        x = sched.step(unet(sched.scale_model_input(x, t), t, [(0, 0)]), t, x, return_dict=False)[0]
    anchor_mean, anchor_std = x.mean(), x.std()
    latents = [x]

    for s, (h, w) in enumerate(shapes[1:], start=2):
        assert h >= n and w >= n, "DemoFusion's windows assume every side at least the native window"
        x = F.interpolate(x, size=(h, w), mode="bicubic")
        noise = torch.randn(x.shape, generator=gen)
        noised = [sched.add_noise(x, noise, t[None]) for t in timesteps]
        x = noised[0]
        for i, t in enumerate(timesteps):
            cf = 0.5 * (1 + torch.cos(torch.pi * (T - t) / T))
            c1, c2, c3 = cf**config.cosine_scale_1, cf**config.cosine_scale_2, 0.99 * cf**config.cosine_scale_3 + 1e-2
            x = x * (1 - c1) + noised[i] * c1

            # Local views (MultiDiffusion) of the zero-padded latent.
            padded = F.pad(x, (jr, jr, jr, jr))
            value_local, count_local = torch.zeros_like(padded), torch.zeros_like(padded)
            views = [(a + jr, b + jr) for a in _window_starts(h, n, stride) for b in _window_starts(w, n, stride)]
            for k in range(0, len(views), view_batch_size):
                batch = views[k : k + view_batch_size]
                patches = torch.cat([padded[:, :, a : a + n, b : b + n] for a, b in batch])
                shift = 0 if conventions.crop_coords == "padded" else jr
                eps = unet(model_input(patches, t), t, [((a - shift) * f, (b - shift) * f) for a, b in batch])
                for out, (a, b) in zip(step(eps, t, patches).chunk(len(batch)), batch):
                    value_local[:, :, a : a + n, b : b + n] += out
                    count_local[:, :, a : a + n, b : b + n] += 1
            local = (value_local / count_local)[:, :, jr : jr + h, jr : jr + w]

            # Dilated sampling: the UNet sees the blurred sub-lattice, the step moves the unblurred one. DemoFusion's
            # dilation is the phase number s; apt-dist's (geometry.dilation_factor) equals it for its own phase sizes.
            hp, wp = ((s - h % s) % s, (s - w % s) % s) if conventions.sub_lattices == "zero_padded" else (0, 0)
            padded = F.pad(x, (wp, 0, hp, 0))
            std_, mean_ = padded.std(), padded.mean()
            blurred = _blur(padded, 2 * s - 1, config.sigma * c3, conventions.blur_edges)
            blurred = (blurred - blurred.mean()) / blurred.std() * std_ + mean_
            value_global = torch.zeros_like(padded)
            offsets = [(a, b) for a in range(s) for b in range(s)]
            for k in range(0, len(offsets), view_batch_size):
                batch = offsets[k : k + view_batch_size]
                patches = torch.cat([padded[:, :, a::s, b::s] for a, b in batch])
                eps = unet(model_input(torch.cat([blurred[:, :, a::s, b::s] for a, b in batch]), t), t, [(0, 0)] * len(batch))
                for out, (a, b) in zip(step(eps, t, patches).chunk(len(batch)), batch):
                    value_global[:, :, a::s, b::s] += out
            dilated = value_global[:, :, hp:, wp:]

            value = local * (1 - c2) + dilated * c2
            count = torch.ones_like(local) * (1 - c2) + torch.ones_like(dilated) * c2
            x = value / count
        x = (x - x.mean()) / x.std() * anchor_std + anchor_mean
        latents.append(x)
    return latents


# ---- the comparison ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def denoiser():
    return Denoiser(ModelSpec("tiny"))


def _config(**kw) -> RenderConfig:
    base = {"prompt": "a red lighthouse on a cliff", "width": 256, "height": 256, "seed": 5, "steps": 4}
    return RenderConfig(**(base | {"method": "demofusion", "jitter": False} | kw))


_cache: dict = {}


def _embeds(cfg: RenderConfig):
    return encode_prompt(ModelSpec(cfg.model), cfg.prompt, cfg.negative_prompt, seed=cfg.seed)


def apt_dist_image(cfg: RenderConfig, denoiser) -> list[torch.Tensor]:
    key = ("apt-dist", repr(cfg))
    if key not in _cache:
        _cache[key] = reference_render(cfg, denoiser, _embeds(cfg))
    return _cache[key]


def demofusion_image(cfg: RenderConfig, denoiser, conventions: Conventions, view_batch_size: int = 1):
    key = ("demofusion", repr(cfg), conventions, view_batch_size)
    if key not in _cache:
        _cache[key] = demofusion_render(cfg, denoiser, _embeds(cfg), conventions, view_batch_size)
    return _cache[key]


def final_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest difference between the two images' final latents."""
    assert a[-1].shape == b[-1].shape
    return float((a[-1] - b[-1]).abs().max())


# (a) apt-dist's conventions at every point: the same image.


def _assert_every_phase_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    assert len(ours) == len(theirs)
    for phase, (a, b) in enumerate(zip(ours, theirs), start=1):
        torch.testing.assert_close(b, a, rtol=0, atol=ATOL, msg=lambda m, p=phase: f"phase {p}: {m}")


@pytest.mark.parametrize("size,phases", [(256, 2), (384, 3)], ids=["2phases", "3phases"])
def test_demofusion_with_apt_dists_conventions_equals_apt_dist_square(size, phases, denoiser):
    cfg = _config(width=size, height=size)
    ours = apt_dist_image(cfg, denoiser)
    assert len(ours) == phases
    _assert_every_phase_close(ours, demofusion_image(cfg, denoiser, APT_DIST))


def test_demofusion_with_apt_dists_conventions_equals_apt_dist_nonsquare_odd_lattice(denoiser):
    """256x168 px: DemoFusion's own phase sizes (16x10, 32x21 latents) equal apt-dist's, and the
    last phase's width 21 is not a multiple of the dilation 2."""
    cfg = _config(width=168, height=256)
    assert demofusion_phase_shapes(256, 168, 16, 8) == phase_shapes(32, 21, 16) == [(16, 10), (32, 21)]
    _assert_every_phase_close(apt_dist_image(cfg, denoiser), demofusion_image(cfg, denoiser, APT_DIST))


def test_demofusion_with_all_its_own_conventions_differs_from_apt_dist(denoiser):
    cfg = _config()
    assert final_diff(demofusion_image(cfg, denoiser, PUBLISHED), apt_dist_image(cfg, denoiser)) > 100 * ATOL


# (b) DemoFusion's own choice at one point, apt-dist's everywhere else: a different image.


def _differs_only_by(cfg: RenderConfig, denoiser, **choice) -> float:
    conventions = replace(APT_DIST, **choice)
    assert conventions != APT_DIST
    return final_diff(demofusion_image(cfg, denoiser, conventions), apt_dist_image(cfg, denoiser))


def test_padded_crop_coordinates_change_the_image(denoiser):
    """DemoFusion conditions each window on its top-left in the jitter-padded latent, which moves every
    crop by the padding ((native - stride) // 4 latents = 16 px here, 128 px for SDXL), even with no jitter."""
    assert _differs_only_by(_config(), denoiser, crop_coords="padded") > 10 * ATOL


def test_zero_padded_blur_edges_change_the_image(denoiser):
    """DemoFusion's F.conv2d zero-pads the blur, which pulls the dilated views' border towards 0."""
    assert _differs_only_by(_config(), denoiser, blur_edges="zeros") > 10 * ATOL


def test_demofusions_phase_sizes_change_the_image_for_a_non_square_size(denoiser):
    """256x184 px: DemoFusion floors phase 1 to 128x88 px (16x11 latents), apt-dist rounds the
    aspect-kept native size to 16x12. The choice applies only to non-square sizes within DemoFusion's
    reach: for a square multiple of the native size both give the same ladder (the 2- and 3-phase
    tests above). DemoFusion cannot render other sizes at all: int(max side / native) phases whose
    last has long side native * scale_num, so 2560x2560 with SDXL gives 2048x2048 (phase 1 at
    1280 px), where apt-dist ends at the requested size."""
    cfg = _config(width=184, height=256)
    assert demofusion_phase_shapes(256, 184, 16, 8) == [(16, 11), (32, 23)]
    assert phase_shapes(32, 23, 16) == [(16, 12), (32, 23)]
    assert _differs_only_by(cfg, denoiser, phase_sizes="demofusion") > 10 * ATOL


def test_zero_padded_sub_lattices_change_the_image(denoiser):
    """256x168 px (last phase 32x21 latents, dilation 2): DemoFusion pads the latent with zeros at the
    top and left to a multiple of the dilation, so its sub-lattices are equal in size but some hold
    zeros, are offset by the padding, and the blur's re-standardisation counts the zeros. In DemoFusion
    this happens only for non-square images (the short side int(native * s * aspect)); apt-dist's
    sizes can meet it for square images too (e.g. 280x280 px: 35 latents, dilation 2), which
    DemoFusion cannot render."""
    cfg = _config(width=168, height=256)
    assert _differs_only_by(cfg, denoiser, sub_lattices="zero_padded") > 10 * ATOL


def test_scaling_model_inputs_by_the_step_counter_changes_the_image(denoiser):
    """DemoFusion calls `scheduler._init_step_index(t)` before each patch batch's `step`, but after its
    `scale_model_input`, which reads the counter that the previous `step` advanced: every batch after
    a step's first is divided by the next step's sqrt(sigma^2 + 1), and the first batch of each
    upscaling phase by sqrt(0 + 1) (the counter is left at the end of the previous phase). The step
    itself is right. Same code in diffusers 0.21.4 (the pipeline's pin; read, not run) and 0.42 (the
    test below). apt-dist's stateless steps scale every patch with its own step's sigma."""
    assert _differs_only_by(_config(), denoiser, input_scaling="step_counter") > 100 * ATOL


def test_with_the_step_counter_demofusions_image_depends_on_the_view_batch_size(denoiser):
    """A consequence of the step counter: which patches share the first batch depends on view_batch_size.
    With each patch scaled by its own step's sigma, the batch size changes only float rounding."""
    cfg = _config()
    counter = replace(APT_DIST, input_scaling="step_counter")
    assert final_diff(demofusion_image(cfg, denoiser, counter, 1), demofusion_image(cfg, denoiser, counter, 16)) > 100 * ATOL
    assert final_diff(demofusion_image(cfg, denoiser, APT_DIST, 1), demofusion_image(cfg, denoiser, APT_DIST, 16)) < ATOL


def test_diffusers_euler_in_demofusions_call_order_scales_with_the_counters_sigma():
    """The claim above, on diffusers' EulerDiscreteScheduler itself: phase 1, then an upscaling phase
    whose steps each scale and step three patch batches in DemoFusion's order."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(build_tiny_pipeline().scheduler.config)
    sched.set_timesteps(4)
    sigmas, x = sched.sigmas, torch.ones(1, 1, 2, 2)
    for t in sched.timesteps:
        sched.scale_model_input(x, t)
        sched.step(torch.zeros_like(x), t, x)
    used = []  # the sigma each batch's model input was scaled with, per step
    for i, t in enumerate(sched.timesteps):
        row = []
        for _ in range(3):
            divisor = 1 / sched.scale_model_input(x, t)[0, 0, 0, 0]
            row.append(round(float((divisor**2 - 1).clamp(min=0) ** 0.5), 4))
            sched._init_step_index(t)
            assert sched.step_index == i  # the step uses the right sigma
            sched.step(torch.zeros_like(x), t, x)
        used.append(row)
    s = [round(float(v), 4) for v in sigmas]
    assert used[0] == [s[4], s[1], s[1]] and s[4] == 0.0
    assert used[1:] == [[s[i], s[i + 1], s[i + 1]] for i in range(1, 4)]
