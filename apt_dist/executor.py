"""The executor boundary: the only way the sampler reaches a UNet or a VAE.

Per timestep the sampler hands over its patches (model inputs), their SDXL crop
coordinates and the timestep, and gets one guided noise prediction per patch back.
How the patches are cut into UNet calls ("work units") is decided here, by a pure
function of the patch shapes and two config knobs, never by the number of workers:
so every executor runs the very same UNet calls and the image does not depend on
where they ran. Classifier-free guidance is combined here, on the driver, in
float32, from the raw predictions of the two branches.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

UNCOND, COND = 0, 1


@dataclass(frozen=True)
class WorkUnit:
    """One UNet call: rows of (patch index, guidance branch), all patches of one shape."""

    rows: tuple[tuple[int, int], ...]

    @property
    def patches(self) -> list[int]:
        return sorted({p for p, _ in self.rows})


def make_units(shapes: list[tuple[int, ...]], batch_size: int, split_guidance: bool) -> list[WorkUnit]:
    """Cut patches into UNet calls: consecutive patches of one shape, at most `batch_size` each.

    With `split_guidance` the unconditional and conditional halves of a batch are
    separate calls (twice the units, half the size: finer load balancing across
    workers); otherwise a call holds [uncond, cond] rows for each patch.
    """
    units: list[WorkUnit] = []
    start = 0
    while start < len(shapes):
        end = start + 1
        while end < len(shapes) and end - start < batch_size and shapes[end] == shapes[start]:
            end += 1
        idx = range(start, end)
        if split_guidance:
            units.append(WorkUnit(tuple((p, UNCOND) for p in idx)))
            units.append(WorkUnit(tuple((p, COND) for p in idx)))
        else:
            units.append(WorkUnit(tuple((p, b) for p in idx for b in (UNCOND, COND))))
        start = end
    return units


def guide(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance in float32: uncond + g * (cond - uncond)."""
    u, c = uncond.to(torch.float32), cond.to(torch.float32)
    return u + guidance_scale * (c - u)


class Guidance:
    """Collects raw unit outputs in any order; as soon as a patch has both branches, guides it.

    Each patch is guided (and handed to `then`) on its own, so the result does not depend
    on which units arrive together or in what order: that is what keeps images identical
    across executors and worker counts while letting a remote executor overlap this work
    with the UNet calls still running.
    """

    def __init__(self, units: list[WorkUnit], num_patches: int, guidance_scale: float, then=None):
        self.units, self.scale, self.then = units, guidance_scale, then
        self._branches: list[list[torch.Tensor | None]] = [[None, None] for _ in range(num_patches)]
        self.results: list = [None] * num_patches
        self._delivered = [False] * len(units)
        self.then_seconds = 0.0  # time spent in `then` (the caller's work, not the executor's)

    def deliver(self, unit_index: int, out: torch.Tensor) -> None:
        """Raw UNet output [rows, C, h, w] of units[unit_index]; each unit exactly once."""
        if self._delivered[unit_index]:
            raise RuntimeError(f"work unit {unit_index} delivered twice")
        self._delivered[unit_index] = True
        for row, (p, b) in enumerate(self.units[unit_index].rows):
            pair = self._branches[p]
            pair[b] = out[row]
            if pair[0] is not None and pair[1] is not None:
                eps = guide(pair[0], pair[1], self.scale)
                self._branches[p] = [None, None]  # release the raw rows (they may be views of a reply)
                if self.then is not None:
                    t0 = time.perf_counter()
                    eps = self.then(p, eps)
                    self.then_seconds += time.perf_counter() - t0
                self.results[p] = eps

    def finish(self) -> list:
        missing = [i for i, d in enumerate(self._delivered) if not d]
        if missing:
            raise RuntimeError(f"work unit(s) {missing[:5]} never delivered: a work unit was lost")
        return self.results


@dataclass
class RenderContext:
    """What a render sends to the executor once: the model, prompt embeddings, micro-conditioning."""

    model: object  # models.ModelSpec
    embeds: object  # models.PromptEmbeddings
    original_size: tuple[int, int]  # (H, W) pixels of the final image
    guidance_scale: float
    view_batch_size: int = 1
    split_guidance: bool = True


@dataclass
class ExecutorStats:
    patch_evals: int = 0  # patches predicted (each with both guidance branches)
    unet_calls: int = 0  # work units run
    unet_rows: int = 0  # UNet batch rows (2 per patch)
    decode_tiles: int = 0
    seconds: float = 0.0  # wall time inside predict(), less the caller's `then` work
    events: list[str] = field(default_factory=list)  # worker losses, retries, ...


class Executor(ABC):
    """Base of every executor. Subclasses implement `_run_units` and `_decode`."""

    def __init__(self):
        self.stats = ExecutorStats()
        self.context: RenderContext | None = None

    def start(self, context: RenderContext) -> None:
        """Called once per render, before any prediction."""
        self.context = context
        self.stats = ExecutorStats()

    def predict(self, timestep: int, patches: list[torch.Tensor], crops: list[tuple[int, int]], then=None) -> list:
        """Guided noise predictions for `patches` ([C, h, w] float32 model inputs) at `timestep`.

        With `then`, each patch's prediction is passed through `then(patch_index, eps)` as soon
        as it is ready (in any order), and its results are returned instead: the caller's
        per-patch work then overlaps with UNet calls that are still running.
        """
        ctx = self.context
        assert ctx is not None, "Executor.start(context) must be called first"
        t0 = time.perf_counter()
        units = make_units([tuple(p.shape) for p in patches], ctx.view_batch_size, ctx.split_guidance)
        guidance = Guidance(units, len(patches), ctx.guidance_scale, then)
        self._run_units(timestep, units, patches, crops, guidance.deliver)
        results = guidance.finish()
        self.stats.patch_evals += len(patches)
        self.stats.unet_calls += len(units)
        self.stats.unet_rows += sum(len(u.rows) for u in units)
        self.stats.seconds += time.perf_counter() - t0 - guidance.then_seconds
        return results

    def decode(self, tiles: list[torch.Tensor], norm_stats: dict | None = None) -> list[torch.Tensor]:
        """Decode latent tiles [C, h, w] to image tiles [3, 8h, 8w] in [-1, 1], all with the same GroupNorm statistics."""
        self.stats.decode_tiles += len(tiles)
        return self._decode(tiles, norm_stats)

    def norm_stats(self, latent: torch.Tensor, max_side: int) -> dict:
        """The VAE decoder's GroupNorm statistics of the whole latent (decoded once, downsampled to max_side)."""
        return self._norm_stats(latent, max_side)

    @abstractmethod
    def _run_units(
        self, timestep: int, units: list[WorkUnit], patches: list[torch.Tensor], crops: list[tuple[int, int]], deliver
    ) -> None:
        """Run every unit; call `deliver(unit_index, raw_output [rows, C, h, w])` once per unit, in any order."""

    @abstractmethod
    def _decode(self, tiles: list[torch.Tensor], norm_stats: dict | None) -> list[torch.Tensor]: ...

    @abstractmethod
    def _norm_stats(self, latent: torch.Tensor, max_side: int) -> dict: ...

    def close(self) -> None:
        pass

    def summary(self) -> dict:
        return {"patch_evals": self.stats.patch_evals, "unet_calls": self.stats.unet_calls, "events": list(self.stats.events)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def unit_batch(unit: WorkUnit, patches: list[torch.Tensor], crops: list[tuple[int, int]]):
    """The tensors of one unit: stacked latents, crops and branches, row by row."""
    x = torch.stack([patches[p] for p, _ in unit.rows])
    return x, [crops[p] for p, _ in unit.rows], [b for _, b in unit.rows]


class InProcessExecutor(Executor):
    """Runs every unit on one Denoiser in this process (CPU or one GPU)."""

    def __init__(self, denoiser=None):
        super().__init__()
        self._denoiser = denoiser

    def start(self, context: RenderContext) -> None:
        super().start(context)
        if self._denoiser is None or self._denoiser.spec != context.model:
            from .models import Denoiser

            self._denoiser = Denoiser(context.model)

    def _run_units(self, timestep, units, patches, crops, deliver):
        ctx = self.context
        for k, unit in enumerate(units):
            x, c, b = unit_batch(unit, patches, crops)
            deliver(k, self._denoiser.predict(x, timestep, c, b, ctx.embeds, ctx.original_size))

    def _decode(self, tiles, norm_stats):
        return [self._denoiser.decode(t[None], norm_stats=norm_stats)[0] for t in tiles]

    def _norm_stats(self, latent, max_side):
        return self._denoiser.group_norm_stats(latent, max_side=max_side)
