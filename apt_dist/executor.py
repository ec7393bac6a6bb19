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


def combine_guidance(
    units: list[WorkUnit], outputs: list[torch.Tensor], num_patches: int, guidance_scale: float
) -> list[torch.Tensor]:
    """Guided eps per patch: uncond + g * (cond - uncond), from each unit's raw rows."""
    branch: list[list[torch.Tensor | None]] = [[None, None] for _ in range(num_patches)]
    for unit, out in zip(units, outputs):
        for row, (p, b) in enumerate(unit.rows):
            branch[p][b] = out[row].to(torch.float32)
    guided = []
    for p, (u, c) in enumerate(branch):
        if u is None or c is None:
            raise RuntimeError(f"patch {p} is missing a guidance branch: a work unit was lost")
        guided.append(u + guidance_scale * (c - u))
    return guided


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
    seconds: float = 0.0  # wall time inside predict()
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

    def predict(self, timestep: int, patches: list[torch.Tensor], crops: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Guided noise predictions for `patches` ([C, h, w] float32 model inputs) at `timestep`."""
        ctx = self.context
        assert ctx is not None, "Executor.start(context) must be called first"
        t0 = time.perf_counter()
        units = make_units([tuple(p.shape) for p in patches], ctx.view_batch_size, ctx.split_guidance)
        outputs = self._run_units(timestep, units, patches, crops)
        guided = combine_guidance(units, outputs, len(patches), ctx.guidance_scale)
        self.stats.patch_evals += len(patches)
        self.stats.unet_calls += len(units)
        self.stats.unet_rows += sum(len(u.rows) for u in units)
        self.stats.seconds += time.perf_counter() - t0
        return guided

    def decode(self, tiles: list[torch.Tensor], norm_stats: dict | None = None) -> list[torch.Tensor]:
        """Decode latent tiles [C, h, w] to image tiles [3, 8h, 8w] in [-1, 1], all with the same GroupNorm statistics."""
        self.stats.decode_tiles += len(tiles)
        return self._decode(tiles, norm_stats)

    def norm_stats(self, latent: torch.Tensor, max_side: int) -> dict:
        """The VAE decoder's GroupNorm statistics of the whole latent (decoded once, downsampled to max_side)."""
        return self._norm_stats(latent, max_side)

    @abstractmethod
    def _run_units(
        self, timestep: int, units: list[WorkUnit], patches: list[torch.Tensor], crops: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Raw UNet outputs, one [rows, C, h, w] tensor per unit, in unit order."""

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

    def _run_units(self, timestep, units, patches, crops):
        ctx = self.context
        outs = []
        for unit in units:
            x, c, b = unit_batch(unit, patches, crops)
            outs.append(self._denoiser.predict(x, timestep, c, b, ctx.embeds, ctx.original_size))
        return outs

    def _decode(self, tiles, norm_stats):
        return [self._denoiser.decode(t[None], norm_stats=norm_stats)[0] for t in tiles]

    def _norm_stats(self, latent, max_side):
        return self._denoiser.group_norm_stats(latent, max_side=max_side)
