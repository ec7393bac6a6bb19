"""A step's views and their fusion: pure tensor code, no models, no Ray.

An upscaling step predicts two sets of views of its latent x. Each set says what the UNet
sees (`shapes`, `crops`, `inputs()`), takes each prediction as it comes back (`take`: the
scheduler step of those views), and gives its stepped latent when all are in (`result`):

  LocalViews    jittered n x n windows of the zero-padded x, averaged where they overlap
  DilatedViews  the d x d sub-lattices x[a::d, b::d]; the UNet sees the blurred ones

Every view the UNet sees is a cut of one whole tensor of the step (`source()`, [C, H, W]: the
zero-padded scaled latent, the blurred one) by `cuts` ((rows, cols) slices, one per view), so a
remote executor can send that tensor once per step and each call only its views' cuts.

The executor (`Executor.denoise`) hands predictions over in any order and grouping, while
other UNet calls still run; every operation here is elementwise or summed in a fixed
order, so the result does not depend on that order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import schedules as S
from .geometry import Window, WindowViews, crop_pixels, gaussian_blur, lattice_offsets
from .matching import standardize_to


class WindowAverage:
    """The average of overlapping windows, summed in window order whatever order they arrive in.

    Float sums depend on their order, so adding windows as their predictions come back
    from the workers would make the image depend on the workers. Here a window that
    arrives early waits until every window before it is in; the work still overlaps the
    UNet calls that are running, and the result is the same for every arrival order.
    """

    def __init__(self, channels: int, height: int, width: int, windows: list[Window]):
        self.windows, self.shape = windows, (channels, height, width)
        self.value = torch.zeros(channels, height, width)
        self.count = torch.zeros(1, height, width)  # windows over each position, at least 1 (the divisor)
        for win in windows:
            ys, xs = win.slices()
            self.count[:, ys, xs] += 1
        self.count.clamp_(min=1)  # uncovered positions: 0 / 1
        self._pending: dict[int, torch.Tensor] = {}
        self._next = 0

    def add(self, k: int, view: torch.Tensor) -> None:
        """Window k's values [C, h, w]."""
        self._pending[k] = view
        while self._next in self._pending:
            ys, xs = self.windows[self._next].slices()
            self.value[:, ys, xs] += self._pending.pop(self._next)
            self._next += 1

    def result(self, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """[C, H, W] (or the region rows x cols): the average where windows cover, 0 elsewhere."""
        if self._next < len(self.windows):
            raise RuntimeError(f"window {self._next} of {len(self.windows)} never arrived")
        return self.value[:, rows, cols] / self.count[:, rows, cols]


class LocalViews:
    """Step i's local views: windows of x zero-padded by `pad` (the jitter range), in padded coordinates.

    The UNet sees each window of the scaled latent, with the window's top-left in the unpadded
    image as its SDXL crop; each window of x is stepped with its prediction.
    """

    def __init__(self, x: torch.Tensor, windows: list[Window], pad: int, sched: S.NoiseSchedule, i: int, vae_scale: int):
        self.sched, self.i, self.pad, self.size = sched, i, pad, x.shape[-2:]
        padded = F.pad(x, (pad, pad, pad, pad))
        self.views = WindowViews(padded, windows)
        self.model_views = WindowViews(S.scale_model_input(sched, padded, i), windows)
        self.shapes = self.views.shapes
        self.cuts = [win.slices() for win in windows]
        self.crops = [crop_pixels(win, pad, vae_scale) for win in windows]
        self.average = WindowAverage(x.shape[1], *padded.shape[-2:], windows)

    def inputs(self) -> WindowViews:
        return self.model_views  # views, each made on first use

    def source(self) -> torch.Tensor:
        """The scaled padded latent [C, H+2p, W+2p] that every input is a cut of."""
        return self.model_views.x

    def take(self, ks: list[int], eps: torch.Tensor) -> None:
        stepped = S.step(self.sched, batch([self.views[k] for k in ks]), eps, self.i)
        for k, s in zip(ks, stepped):
            self.average.add(k, s)

    def result(self) -> torch.Tensor:
        (h, w), p = self.size, self.pad
        return self.average.result(slice(p, p + h), slice(p, p + w))[None]


class DilatedViews:
    """Step i's dilated views: the d x d sub-lattices x[..., a::d, b::d].

    The UNet sees the blurred sub-lattice (a Gaussian blur of x with std `sigma`, re-standardised
    to x's mean and std); the unblurred one is stepped with that prediction and written back.
    """

    def __init__(self, x: torch.Tensor, d: int, sigma: float, sched: S.NoiseSchedule, i: int):
        self.x, self.d, self.sigma, self.sched, self.i = x, d, sigma, sched, i
        self.offsets = lattice_offsets(d)
        h, w = x.shape[-2:]
        self.shapes = [(x.shape[1], len(range(a, h, d)), len(range(b, w, d))) for a, b in self.offsets]
        self.crops = [(0, 0)] * len(self.offsets)
        self.cuts = [(slice(a, None, d), slice(b, None, d)) for a, b in self.offsets]
        self.out = torch.empty_like(x)
        self._source: torch.Tensor | None = None

    def source(self) -> torch.Tensor:
        """The scaled blurred latent [C, H, W] that every input is a cut of; made when first needed, so a
        remote executor has the local windows' calls out while this blurs."""
        if self._source is None:
            x = self.x
            blurred = standardize_to(gaussian_blur(x, 2 * self.d - 1, self.sigma), x.mean(), x.std())
            self._source = S.scale_model_input(self.sched, blurred, self.i)[0]
        return self._source

    def inputs(self) -> list[torch.Tensor]:
        src = self.source()
        return [src[:, ys, xs] for ys, xs in self.cuts]

    def take(self, ks: list[int], eps: torch.Tensor) -> None:
        d = self.d
        lattices = [self.x[0, :, a::d, b::d] for a, b in (self.offsets[k] for k in ks)]
        stepped = S.step(self.sched, batch(lattices), eps, self.i)
        for k, s in zip(ks, stepped):
            a, b = self.offsets[k]
            self.out[0, :, a::d, b::d] = s

    def result(self) -> torch.Tensor:
        return self.out


def batch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, but a view for one tensor (most replies complete one patch)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
