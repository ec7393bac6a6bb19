"""Fusing the stepped local views back into one latent: pure tensor code, no models, no Ray."""

from __future__ import annotations

import torch

from .geometry import Window


class WindowAverage:
    """The average of overlapping windows, summed in window order whatever order they arrive in.

    Float sums depend on their order, so adding windows as their predictions come back
    from the workers would make the image depend on the workers. Here a window that
    arrives early waits until every window before it is in; the work still overlaps the
    UNet calls that are running, and the result is the same for every arrival order.
    """

    def __init__(self, channels: int, height: int, width: int, windows: list[Window]):
        self.windows, self.shape = windows, (channels, height, width)
        self.value: torch.Tensor | None = None
        self.count: torch.Tensor | None = None  # windows over each position, at least 1 (the divisor)
        self._pending: dict[int, torch.Tensor] = {}
        self._next = 0

    def prepare(self) -> None:
        """Allocate the sums and count the cover (the windows are known up front). The first `add`
        does it if not done before; a caller calls it early to do it while it waits anyway."""
        if self.value is not None:
            return
        channels, height, width = self.shape
        self.value = torch.zeros(channels, height, width)
        self.count = torch.zeros(1, height, width)
        for win in self.windows:
            ys, xs = win.slices()
            self.count[:, ys, xs] += 1
        self.count.clamp_(min=1)  # uncovered positions: 0 / 1

    def add(self, k: int, view: torch.Tensor) -> None:
        """Window k's values [C, h, w]."""
        self.prepare()
        self._pending[k] = view
        while self._next in self._pending:
            ys, xs = self.windows[self._next].slices()
            self.value[:, ys, xs] += self._pending.pop(self._next)
            self._next += 1

    def result(self, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """[C, H, W] (or the region rows x cols): the average where windows cover, 0 elsewhere."""
        if self._next != len(self.windows):
            raise RuntimeError(f"window {self._next} of {len(self.windows)} never arrived")
        self.prepare()  # no windows at all
        return self.value[:, rows, cols] / self.count[:, rows, cols]
