"""The executor boundary: the only way the sampler reaches a UNet or a VAE.

Per timestep the sampler hands over its patches (model inputs), their SDXL crop
coordinates and the timestep, and gets one guided noise prediction per patch back.
How the patches are cut into UNet calls ("work units") is decided here, by a pure
function of the patch shapes and two config knobs, never by the number of workers:
so every executor runs the very same UNet calls and the image does not depend on
where they ran. Classifier-free guidance is combined here, on the driver, in
float32, from the raw predictions of the two branches.

What crosses the boundary per step (`denoise`): the patches, each a cut of one of a few whole
tensors of the step (`DeferredPatches.source(j)`, `cuts`: the padded scaled latent, the blurred
one). An executor may use the patches (in-process) or send each whole tensor once and each call
only its patches' cuts (`RayExecutor`); the values are the same either way.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .fusion import batch

UNCOND, COND = 0, 1


@dataclass(frozen=True)
class WorkUnit:
    """One UNet call: rows of (patch index, guidance branch), all patches of one shape."""

    rows: tuple[tuple[int, int], ...]

    @functools.cached_property
    def patches(self) -> list[int]:
        return sorted({p for p, _ in self.rows})


class DeferredPatches(Sequence):
    """Patches whose tail is made on first use, and whose shapes are known before.

    The executor cuts work units from the shapes alone and sends the calls for the head while
    the tail does not exist yet; a remote executor thus keeps workers busy while the driver
    makes the tail (the sampler's blurred sub-lattices). `seconds`: time spent making it.

    With `sources` and `cuts`, patch i is `source(j)[:, rows, cols]` for `cuts[i] = (j, rows, cols)`:
    `sources[j]()` makes whole tensor j ([C, H, W], once, on first use), and the tail's patches are
    cuts of sources that only the tail uses.
    """

    def __init__(self, head: Sequence, tail_shapes: list[tuple[int, ...]], make_tail, sources=None, cuts=None):
        self.head, self.make_tail = head, make_tail
        self.shapes = patch_shapes(head) + [tuple(sh) for sh in tail_shapes]
        self.tail: list[torch.Tensor] | None = None
        self.seconds = 0.0
        self.sources = list(sources or [])
        self.cuts: list[tuple[int, slice, slice]] | None = list(cuts) if cuts is not None else None
        self._made: dict[int, torch.Tensor] = {}

    def source(self, j: int) -> torch.Tensor:
        """Whole tensor j, made on first use (timed in `seconds`, as the tail)."""
        if j not in self._made:
            t0 = time.perf_counter()
            self._made[j] = self.sources[j]()
            self.seconds += time.perf_counter() - t0
        return self._made[j]

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i < 0:
            i += len(self.shapes)
        if i < len(self.head):
            return self.head[i]
        if self.tail is None:
            t0 = time.perf_counter()
            tail = list(self.make_tail())
            self.seconds += time.perf_counter() - t0
            got = [tuple(p.shape) for p in tail]
            if got != self.shapes[len(self.head):]:
                raise ValueError(f"deferred patches: announced shapes {self.shapes[len(self.head):]}, made {got}")
            self.tail = tail
        return self.tail[i - len(self.head)]


def patch_shapes(patches) -> list[tuple[int, ...]]:
    """Every patch's shape, without making deferred or lazy patches (a sequence with `shapes`)."""
    shapes = getattr(patches, "shapes", None)
    return [tuple(sh) for sh in shapes] if shapes is not None else [tuple(p.shape) for p in patches]


def make_units(shapes: list[tuple[int, ...]], batch_size: int, split_guidance: bool) -> list[WorkUnit]:
    """Cut patches into UNet calls: consecutive patches of one shape, at most `batch_size` each.

    With `split_guidance` the unconditional and conditional halves of a batch are
    separate calls (twice the units, half the size: finer load balancing across
    workers); otherwise a call holds [uncond, cond] rows for each patch.
    """
    # Every step of a phase has the same shapes: cut once (0.1 ms at 4096x4096, before each step's first call).
    return list(_cut_units(tuple(map(tuple, shapes)), batch_size, split_guidance))


@functools.lru_cache(maxsize=64)
def _cut_units(shapes: tuple[tuple[int, ...], ...], batch_size: int, split_guidance: bool) -> tuple[WorkUnit, ...]:
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
    return tuple(units)


def lpt_shares(weights: Sequence[float], workers: int) -> list[list[int]]:
    """Share items of these weights (a unit's work: its rows) among `workers` equal workers: longest first, each to
    the worker with the least work so far (on a tie the one with fewer items, then the first).

    Equal items give shares that differ by at most one, the larger first. Its makespan (the largest share's weight)
    is the optimum when no worker gets two items, and when the items are equal but for one smaller remainder (what
    `make_units` cuts from one run of one patch shape); otherwise it is at most 4/3 of the optimum (Graham, 1969).
    Returns each worker's item indices, heaviest first.
    """
    heap = [(0.0, 0, j) for j in range(workers)]
    shares: list[list[int]] = [[] for _ in range(workers)]
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):  # stable: equal items in their order
        load, count, j = heapq.heappop(heap)
        shares[j].append(i)
        heapq.heappush(heap, (load + weights[i], count + 1, j))
    return shares


def makespan(weights: Sequence[float], workers: int) -> float:
    """The largest share's weight when `lpt_shares` shares these items (0 for none)."""
    return max((sum(weights[i] for i in share) for share in lpt_shares(weights, workers)), default=0.0)


def guide(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance in float32: uncond + g * (cond - uncond)."""
    u, c = uncond.to(torch.float32), cond.to(torch.float32)
    return torch.lerp(u, c, guidance_scale)  # one fused pass over the rows


class Guidance:
    """Collects raw unit outputs in any order; as soon as a patch has both branches, guides it.

    The patches that one delivery (one reply) completes are guided, and handed to `then`,
    together, a batch per patch shape: elementwise float ops give each element the same
    result in a batch as alone, so the image does not depend on which units arrive
    together or in what order. That keeps images identical across executors and worker
    counts while a remote executor overlaps this work with the UNet calls still running.
    """

    def __init__(self, units: list[WorkUnit], num_patches: int, guidance_scale: float, then=None):
        self.units, self.scale, self.then = units, guidance_scale, then
        self._branches: list[list[torch.Tensor | None]] = [[None, None] for _ in range(num_patches)]
        self.results: list = [None] * num_patches
        self._delivered = [False] * len(units)
        self.then_seconds = 0.0  # time spent in `then` (the caller's work, not the executor's)

    def deliver(self, unit_indices: list[int], outputs: list[torch.Tensor]) -> None:
        """Raw UNet outputs [rows, C, h, w] of some units (say, one reply); each unit exactly once."""
        ready = []
        for k, out in zip(unit_indices, outputs):
            if self._delivered[k]:
                raise RuntimeError(f"work unit {k} delivered twice")
            self._delivered[k] = True
            for row, (p, b) in enumerate(self.units[k].rows):
                pair = self._branches[p]
                pair[b] = out[row]
                if pair[0] is not None and pair[1] is not None:
                    ready.append(p)
        by_shape: dict[tuple, list[int]] = {}
        for p in ready:
            by_shape.setdefault(tuple(self._branches[p][0].shape), []).append(p)
        for ps in by_shape.values():
            eps = guide(batch([self._branches[p][0] for p in ps]), batch([self._branches[p][1] for p in ps]), self.scale)
            for p in ps:
                self._branches[p] = [None, None]  # release the raw rows (they may be views of a reply)
            if self.then is None:
                out = list(eps)
            else:
                t0 = time.perf_counter()
                out = self.then(ps, eps) or [None] * len(ps)
                self.then_seconds += time.perf_counter() - t0
            for p, r in zip(ps, out):
                self.results[p] = r

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
    patch_evals: int = 0  # the render's UNet patch evaluations in all (a pool of several renders weighs them by it)


@dataclass
class ExecutorStats:
    patch_evals: int = 0  # patches predicted (each with both guidance branches)
    unet_calls: int = 0  # work units run
    unet_rows: int = 0  # UNet batch rows (2 per patch)
    decode_tiles: int = 0
    encode_tiles: int = 0
    seconds: float = 0.0  # wall time inside predict(), less the caller's `then` work
    events: list[str] = field(default_factory=list)  # worker losses, retries, ...


class Executor(ABC):
    """Base of every executor. Subclasses implement `_run_units` and `_decode` (and, to upscale images, `_encode`)."""

    def __init__(self):
        self.stats = ExecutorStats()
        self.context: RenderContext | None = None

    def start(self, context: RenderContext) -> None:
        """Called once per render, before any prediction."""
        self.context = context
        self.stats = ExecutorStats()

    def device_profile(self, gpu_memory: float | None = None):
        """The devices.DeviceProfile of the UNets this executor runs (after start): what auto units are sized for.
        `gpu_memory`: GiB per worker, instead of the GPU's own."""
        from .devices import DeviceProfile, local_device

        if self.context.model.torch_device().type != "cuda":
            return DeviceProfile("cpu")
        return local_device(self.context.model.device, gpu_memory)

    def predict(self, timestep: int, patches: list[torch.Tensor], crops: list[tuple[int, int]], then=None) -> list:
        """Guided noise predictions for `patches` ([C, h, w] float32 model inputs, or DeferredPatches) at `timestep`.

        With `then`, predictions are handed to `then(patch_indices, eps [k, C, h, w])` as soon as
        they are ready (in any order, in batches of one shape), and what it returns (a list,
        one item per patch, or None) is returned instead: the caller's per-patch work then
        overlaps with UNet calls that are still running.
        """
        ctx = self.context
        assert ctx is not None, "Executor.start(context) must be called first"
        t0 = time.perf_counter()
        units = make_units(patch_shapes(patches), ctx.view_batch_size, ctx.split_guidance)
        guidance = Guidance(units, len(patches), ctx.guidance_scale, then)
        self._run_units(timestep, units, patches, crops, guidance.deliver)
        results = guidance.finish()
        self.stats.patch_evals += len(patches)
        self.stats.unet_calls += len(units)
        self.stats.unet_rows += sum(len(u.rows) for u in units)
        made = patches.seconds if isinstance(patches, DeferredPatches) else 0.0  # the caller's work, not the executor's
        self.stats.seconds += time.perf_counter() - t0 - guidance.then_seconds - made
        return results

    def denoise(self, timestep: int, view_sets: list) -> None:
        """Predict every view of every set, handing each set its predictions as they come (`take`).

        A view set (fusion.LocalViews, fusion.DilatedViews) has `shapes`, `crops`, `inputs()`,
        `take(indices, eps)`, `source()` and `cuts` (every input is a cut of that one tensor). The
        first set's inputs are made now; the others' when a call first needs them, so a remote
        executor's first calls are out while the driver makes them (the blur).
        Predictions reach `take` in any order and grouping, overlapping the calls still running.
        """
        first, rest = view_sets[0], view_sets[1:]
        tail_shapes = [sh for vs in rest for sh in vs.shapes]
        patches = DeferredPatches(first.inputs(), tail_shapes, lambda: [p for vs in rest for p in vs.inputs()],
                                  sources=[vs.source for vs in view_sets],
                                  cuts=[(j, ys, xs) for j, vs in enumerate(view_sets) for ys, xs in vs.cuts])
        owner = [(vs, k) for vs in view_sets for k in range(len(vs.shapes))]

        def take(ps: list[int], eps: torch.Tensor) -> None:
            for vs in view_sets:
                mine = [j for j, p in enumerate(ps) if owner[p][0] is vs]
                if mine:
                    vs.take([owner[ps[j]][1] for j in mine], eps if len(mine) == len(ps) else eps[mine])

        self.predict(timestep, patches, [c for vs in view_sets for c in vs.crops], then=take)

    def decode(self, tiles: list[torch.Tensor], norm_stats: dict | None = None) -> list[torch.Tensor]:
        """Decode latent tiles [C, h, w] to image tiles [3, 8h, 8w] in [-1, 1], all with the same GroupNorm statistics."""
        self.stats.decode_tiles += len(tiles)
        return self._decode(tiles, norm_stats)

    def norm_stats(self, latent: torch.Tensor, max_side: int) -> dict:
        """The VAE decoder's GroupNorm statistics of the whole latent (decoded once, downsampled to max_side)."""
        return self._norm_stats(latent, max_side)

    def encode(self, tiles: list[torch.Tensor], norm_stats: dict | None = None) -> list[torch.Tensor]:
        """Encode image tiles [3, H, W] in [-1, 1] to model latent tiles [C, H/8, W/8], all with the same encoder
        GroupNorm statistics (an upscale's input image)."""
        self.stats.encode_tiles += len(tiles)
        return self._encode(tiles, norm_stats)

    def encoder_norm_stats(self, image: torch.Tensor, max_side: int) -> dict:
        """The VAE encoder's GroupNorm statistics of the whole image [1, 3, H, W] (encoded once, downsampled to max_side px)."""
        return self._encoder_norm_stats(image, max_side)

    def _encode(self, tiles: list[torch.Tensor], norm_stats: dict | None) -> list[torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} cannot encode images (it has no VAE encoder)")

    def _encoder_norm_stats(self, image: torch.Tensor, max_side: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} cannot encode images (it has no VAE encoder)")

    @abstractmethod
    def _run_units(self, timestep: int, units: list[WorkUnit], patches: list[torch.Tensor], crops: list[tuple[int, int]],
                   deliver) -> None:
        """Run every unit; call `deliver(unit_indices, raw_outputs [rows, C, h, w])` once per unit, in any order."""

    @abstractmethod
    def _decode(self, tiles: list[torch.Tensor], norm_stats: dict | None) -> list[torch.Tensor]: ...

    @abstractmethod
    def _norm_stats(self, latent: torch.Tensor, max_side: int) -> dict: ...

    def open_lanes(self, model, policy: str = "longest") -> None:
        """Before lanes start: load `model` (a ModelSpec) where the UNet calls run, from the calling thread (Ray's
        own start wants the main thread). `policy`: which render has the workers first (see many.POLICIES)."""

    def lane(self, key: int) -> Executor:
        """An executor for render `key` (1, 2, ...: the order of submission) of several running at once on this
        executor's devices (`many.render_many`): its own context and statistics, its UNet calls queued with the
        other lanes', in the order the pool's policy gives."""
        raise NotImplementedError(f"{type(self).__name__} cannot run several renders at once")

    def end_lanes(self) -> None:
        """Release what the lanes shared, once every lane's render has ended."""

    def pool_status(self) -> dict:
        """For a progress line while lanes run: {"workers", "busy", "queued"} (work units), or {} if not told."""
        return {}

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
        self._turns, self._load_lock = _Turns(), threading.Lock()  # for lanes: one call at a time, one model load

    def start(self, context: RenderContext) -> None:
        super().start(context)
        if self._denoiser is None or self._denoiser.spec != context.model:
            from .models import Denoiser

            self._denoiser = Denoiser(context.model)

    def _run_units(self, timestep, units, patches, crops, deliver):
        ctx = self.context
        for k, unit in enumerate(units):
            x, c, b = unit_batch(unit, patches, crops)
            with self._turn():
                y = self._denoiser.predict(x, timestep, c, b, ctx.embeds, ctx.original_size)
            deliver([k], [y])

    def _turn(self):
        return contextlib.nullcontext()

    def open_lanes(self, model, policy: str = "longest") -> None:
        """Load `model` unless a model is loaded (a lane's start checks that it is the same)."""
        with self._load_lock:
            if self._denoiser is None:
                from .models import Denoiser

                self._denoiser = Denoiser(model)

    def lane(self, key: int) -> Executor:
        return _InProcessLane(self, key)

    def _decode(self, tiles, norm_stats):
        with self._turn():
            return [self._denoiser.decode(t[None], norm_stats=norm_stats)[0] for t in tiles]

    def _norm_stats(self, latent, max_side):
        with self._turn():
            return self._denoiser.group_norm_stats(latent, max_side=max_side)

    def _encode(self, tiles, norm_stats):
        with self._turn():
            return [self._denoiser.encode(t[None], norm_stats=norm_stats)[0] for t in tiles]

    def _encoder_norm_stats(self, image, max_side):
        with self._turn():
            return self._denoiser.encoder_group_norm_stats(image, max_side=max_side)


class _Turns:
    """One device, several renders' threads: of those waiting, the render submitted earliest runs the next call."""

    def __init__(self):
        self._cv = threading.Condition()
        self._waiting: list[int] = []
        self._busy = False

    @contextlib.contextmanager
    def turn(self, key: int):
        with self._cv:
            heapq.heappush(self._waiting, key)
            self._cv.wait_for(lambda: not self._busy and self._waiting[0] == key)
            heapq.heappop(self._waiting)
            self._busy = True
        try:
            yield
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()


class _InProcessLane(InProcessExecutor):
    """One render of several on an InProcessExecutor's model (`InProcessExecutor.lane`): one call at a time."""

    def __init__(self, parent: InProcessExecutor, key: int):
        super().__init__()
        self.parent, self.key = parent, key

    def start(self, context: RenderContext) -> None:
        Executor.start(self, context)
        self.parent.open_lanes(context.model)  # a lane started without render_many loads the model here
        held = self.parent._denoiser
        if held.spec != context.model:
            raise ValueError(f"the renders of one pool share its model: {held.spec.name!r} runs, render {self.key} "
                             f"asks for {context.model.name!r} (or other LoRAs, VAE or dtype)")
        self._denoiser = held

    def _turn(self):
        return self.parent._turns.turn(self.key)
