"""Phase sizes, local windows, dilated sub-lattices and the Gaussian blur.

Pure tensor and integer geometry: no models, no Ray. Sizes are in latents unless a
name says pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def phase_shapes(height: int, width: int, native: int) -> list[tuple[int, int]]:
    """Latent (h, w) of every phase for a target latent of (height, width).

    Phase 1 is the native size (long side = `native`, aspect kept); later phases grow
    the long side in equal steps; the last phase is exactly the target. The number of
    phases is round(long / native), at least 2 above the native size (DemoFusion:
    max(H, W) / 1024 for SDXL). At or below the native size the render is one phase.
    """
    long = max(height, width)
    if long <= native:
        return [(height, width)]
    count = max(2, round(long / native))
    shapes = []
    for s in range(1, count):
        scale = (native + (s - 1) * (long - native) / (count - 1)) / long
        shapes.append((max(1, round(height * scale)), max(1, round(width * scale))))
    shapes.append((height, width))
    return shapes


def dilation_factor(shape: tuple[int, int], native: int) -> int:
    """Stride of the dilated sub-lattices so each one is about the native window (DemoFusion: s)."""
    return max(1, round(max(shape) / native))


def lattice_offsets(d: int) -> list[tuple[int, int]]:
    """The d x d dilated sub-lattices x[..., a::d, b::d], in a fixed order."""
    return [(a, b) for a in range(d) for b in range(d)]


def _axis_positions(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    count = int((length - window) / stride - 1e-6) + 2  # DemoFusion's count; the last one snaps to the end
    return [min(k * stride, length - window) for k in range(count)]


@dataclass(frozen=True)
class Window:
    """A local view: top-left and size in the jitter-padded latent (pad = `jitter_range`)."""

    top: int
    left: int
    height: int
    width: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


class WindowViews(Sequence):
    """The views x[0, :, window] of a padded latent [1, C, H, W], each made when first asked for.

    The sampler asks for the first call's few before that call goes out and for the rest
    while the workers compute: 49 views at 4096x4096 are a few hundred microseconds of
    Python that the step's first call then does not wait for. `shapes` needs no view.
    """

    def __init__(self, x: torch.Tensor, windows: list[Window]):
        self.x, self.windows = x[0], windows
        self.shapes = [(x.shape[1], w.height, w.width) for w in windows]
        self._views: list[torch.Tensor | None] = [None] * len(windows)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, k: int) -> torch.Tensor:
        view = self._views[k]
        if view is None:
            view = self._views[k] = self.x[(slice(None), *self.windows[k].slices())]
        return view


def jitter_range(native: int, stride: int) -> int:
    return (native - stride) // 4


def local_windows(
    height: int,
    width: int,
    native: int,
    stride: int,
    generator: torch.Generator | None = None,
) -> list[Window]:
    """DemoFusion's local views of a (height, width) latent, in padded coordinates.

    The latent is padded by `jitter_range(native, stride)` on every side. With a
    generator each window is shifted by up to that range (inner windows both ways,
    edge windows only outwards), so seams move every step; without one, no jitter.
    """
    jr = jitter_range(native, stride)
    wh, ww = min(native, height), min(native, width)
    windows = []
    for top in _axis_positions(height, wh, stride):
        for left in _axis_positions(width, ww, stride):
            dt = _jitter(top, wh, height, jr, generator)
            dl = _jitter(left, ww, width, jr, generator)
            windows.append(Window(top + dt + jr, left + dl + jr, wh, ww))
    return windows


def _jitter(pos: int, window: int, length: int, jr: int, generator: torch.Generator | None) -> int:
    if generator is None or jr == 0:
        return 0
    at_start, at_end = pos == 0, pos + window == length
    if at_start and at_end:
        lo, hi = 0, 0
    elif at_start:
        lo, hi = -jr, 0
    elif at_end:
        lo, hi = 0, jr
    else:
        lo, hi = -jr, jr
    # Always draw, so the stream of draws is the same whatever the window's position.
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return lo + min(int(u * (hi - lo + 1)), hi - lo)


def count_local_windows(height: int, width: int, native: int, stride: int) -> int:
    return len(_axis_positions(height, min(native, height), stride)) * len(_axis_positions(width, min(native, width), stride))


def crop_pixels(window: Window, pad: int, vae_scale: int) -> tuple[int, int]:
    """SDXL crop coordinates of a window: its top-left in image pixels (clamped to the image)."""
    return max(0, window.top - pad) * vae_scale, max(0, window.left - pad) * vae_scale


def gaussian_kernel_1d(kernel_size: int, sigma: float) -> list[float]:
    """DemoFusion's normalised Gaussian taps (computed in float64)."""
    coords = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).tolist()


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of [B, C, H, W] per channel (DemoFusion's kernel; edges replicated, not zero-padded).

    The 2-D kernel is separable, so this is two 1-D passes written as weighted sums of
    shifted slices: the same result as DemoFusion's depthwise 2-D convolution (to float
    rounding) at a tenth of its CPU cost, which matters on the driver every step.
    """
    if kernel_size <= 1:
        return x
    g = gaussian_kernel_1d(kernel_size, sigma)
    p = kernel_size // 2
    height, width = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    rows = xp[..., 0:height, :] * g[0]
    for j in range(1, kernel_size):
        rows.add_(xp[..., j : j + height, :], alpha=g[j])
    out = rows[..., 0:width] * g[0]
    for j in range(1, kernel_size):
        out.add_(rows[..., j : j + width], alpha=g[j])
    return out
