"""Fusing the stepped local views back into one latent: pure tensor code, no models, no Ray."""

from __future__ import annotations

from collections import deque

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
        self._final: list[int] = []  # [k]: rows no window from k on covers (final once windows < k are in)

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
        self._final = [height] * (len(self.windows) + 1)
        for k in reversed(range(len(self.windows))):
            self._final[k] = min(self.windows[k].top, self._final[k + 1])

    def final_rows(self) -> int:
        """How many leading rows no window still to come covers: their average is final.

        Windows are summed in window order (by rows of windows, top first), so the rows above
        the next window's top are done long before the last window arrives: the sampler fuses
        them while the last UNet calls still run.
        """
        self.prepare()
        return self._final[self._next]

    def add(self, k: int, view: torch.Tensor) -> None:
        """Window k's values [C, h, w]."""
        self.prepare()
        self._pending[k] = view
        while self._next in self._pending:
            ys, xs = self.windows[self._next].slices()
            self.value[:, ys, xs] += self._pending.pop(self._next)
            self._next += 1

    def result(self, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """[C, H, W] (or the region rows x cols): the average where windows cover, 0 elsewhere.

        A region of final rows (`final_rows`) may be taken before every window is in.
        """
        stop = self.shape[1] if rows.stop is None else rows.stop
        if stop > self.final_rows():
            raise RuntimeError(f"window {self._next} of {len(self.windows)} never arrived")
        return self.value[:, rows, cols] / self.count[:, rows, cols]


class Fusion:
    """Which row bands of a step's output can be fused now: each once, top first, when it is final.

    A band is final when every dilated sub-lattice is stepped (each covers every row) and no
    window still to come covers it (`WindowAverage.final_rows`). The bands are fixed up front
    (`geometry.row_bands`), not cut where the replies happen to stop: every band then gets the
    same float ops whatever the order and grouping of the replies, and so does the image.
    """

    def __init__(self, bands: list[tuple[int, int]], lattices: int):
        self.todo = deque(bands)
        self.lattices_left = lattices

    def lattice_done(self) -> None:
        self.lattices_left -= 1

    def take(self, upto: int) -> list[tuple[int, int]]:
        """The bands not yet taken that end at or above row `upto` (their windows are all in)."""
        if self.lattices_left > 0:
            return []
        out = []
        while self.todo and self.todo[0][1] <= upto:
            out.append(self.todo.popleft())
        return out
