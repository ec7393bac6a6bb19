"""The Ray worker: one UNet replica (and the VAE) behind predict, decode and encode.

A small class on purpose. What travels: per call, for each work unit, its unique patches
plus their rows (patch, guidance branch) and crops. On the driver's node the patches and
the outputs live in the driver's shared-memory file and the call carries their offsets;
elsewhere the patches come as cuts (slices) of the step's whole tensors, which the call passes
as Ray object references (fetched once per node and step), or as numpy arrays, and the outputs
go back as numpy arrays (Ray returns those zero-copy). The driver on the worker's node calls predict over a Unix
socket (`open_channel`, `channel.py`) rather than through Ray, whose calls cost about a
millisecond each. The render's prompt embeddings travel once per worker and render, in
`set_context` (again after a restart), not with every call.

A subclass may replace the UNet (`RayExecutor(worker_class=...)`): it overrides
`predict_unit` (one work unit's UNet call) and, if it builds no model, `decode` and
`group_norm_stats`. The benchmarks' simulated workers (benchmarks/bench.py) and the
fault-injection tests do so.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import numpy as np

from .shared_memory import SharedViews


@dataclass(frozen=True)
class Cuts:
    """A unit's patches as cuts of tensors the call passes: `sources[arg][:, rows, cols]` for each (arg, rows, cols)."""

    cuts: tuple[tuple[int, slice, slice], ...]


class ContextMissing(RuntimeError):
    """predict() on a worker that has no render context (Ray restarted it between two calls)."""


class UNetWorker:
    def __init__(self, spec, cpu_threads: int | None = None):
        self.spec = spec
        self._contexts: dict[int, dict] = {}  # per render running on this worker (render_many runs several)
        self._ctx = None  # the current call's
        self._shared = SharedViews()
        try:
            self.denoiser = self.load(spec, cpu_threads)
        except Exception as e:  # told to the driver by info(), in one line, instead of an ActorDiedError
            self.denoiser = None
            self.load_error = " ".join(str(e).split())[:500] or type(e).__name__

    load_error: str | None = None

    def load(self, spec, cpu_threads: int | None):
        """The model this worker answers with (a subclass without a model returns None)."""
        import torch

        from .models import Denoiser

        if cpu_threads and spec.device == "cpu":
            # CPU float reductions depend on the intra-op thread count: pin it, so a CPU worker
            # computes bit for bit what an in-process executor with as many threads computes.
            torch.set_num_threads(cpu_threads)
        return Denoiser(spec)

    def info(self) -> dict:
        import ray

        out = {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
        if self.load_error:
            out["load_error"] = self.load_error
        if self.denoiser is not None and self.denoiser.device.type == "cuda":
            import torch

            out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.denoiser.device)
            props = torch.cuda.get_device_properties(self.denoiser.device)
            out["gpu_total_bytes"], out["gpu_name"] = props.total_memory, props.name
        return out

    def set_context(self, ctx: dict, key: int = 0) -> None:
        """A render's prompt embeddings and original size: sent once per render (and after a restart). `key`
        names the render among those sharing this worker (`predict(context=key)`)."""
        self._contexts[key] = ctx

    def drop_context(self, key: int) -> None:
        self._contexts.pop(key, None)

    def attach(self, path: str) -> bool:
        """Can this worker map the driver's shared-memory file? (Same node, same /dev/shm.)"""
        try:
            self._shared.array(path, 0, (1,), np.uint8)
            return True
        except OSError:
            return False

    def open_channel(self, address: str, authkey: bytes) -> str | None:
        """Serve predict() over a Unix socket too (`channel.py`): the driver on this node calls it directly.

        Returns None, or why not (a socket path too long, say): the driver then calls through Ray.
        """
        from . import channel

        try:
            channel.serve(address, authkey, self.predict)  # a daemon thread; ends when the driver hangs up
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return None

    def _array(self, ref, sources: tuple) -> np.ndarray:
        """A unit's inputs: a numpy array, cuts of the call's sources, or (path, offset, shape, dtype) in the
        driver's shared memory."""
        if isinstance(ref, np.ndarray):
            return ref
        if isinstance(ref, Cuts):
            return np.stack([sources[arg][:, rows, cols] for arg, rows, cols in ref.cuts])
        path, offset, shape, dtype = ref
        return self._shared.array(path, offset, shape, dtype)

    def predict(self, timestep: int, units: list[tuple], *sources: np.ndarray, context: int = 0):
        """Run each (patches [k,C,h,w], rows [(local_patch, branch)], crops [k], out) as one UNet call.

        The patches may be `Cuts` of `sources` (whole [C, H, W] tensors of the step, which Ray
        passes from the object store of this node). `out` None: the output [rows,C,h,w] is
        returned; else (path, offset): it is written there and None is returned in its place.
        `context`: the key of the render's context (`set_context`). Returns ([outputs], busy seconds).
        """
        t0 = time.perf_counter()
        self._ctx = self._contexts.get(context)
        outs = []
        for x_ref, rows, crops, out_ref in units:
            y = self.predict_unit(timestep, self._array(x_ref, sources), rows, crops)
            if out_ref is None:
                outs.append(y)
            else:
                self._shared.array(out_ref[0], out_ref[1], y.shape, y.dtype)[...] = y
                outs.append(None)
        return outs, time.perf_counter() - t0

    def predict_unit(self, timestep: int, x: np.ndarray, rows: list[tuple], crops: list) -> np.ndarray:
        """One work unit: the UNet on rows [(local_patch, branch)] of patches x [k,C,h,w] -> [rows,C,h,w]."""
        import torch

        ctx = self._ctx
        if ctx is None:
            raise ContextMissing("predict before set_context: this worker has no render context (restarted?)")
        idx = [p for p, _ in rows]
        xt = torch.from_numpy(np.ascontiguousarray(x[idx]))
        out = self.denoiser.predict(xt, timestep, [tuple(crops[p]) for p in idx], [b for _, b in rows],
                                    ctx["embeds"], ctx["original_size"])
        # Outputs travel in the dtype the patches came in: float16 for a float16 UNet, whose
        # outputs are float16 values anyway (lossless, half the bytes).
        return out.numpy().astype(x.dtype, copy=False)

    def decode(self, tiles: list[np.ndarray], norm_stats: dict | None):
        return _per_tile(self.denoiser.decode, tiles, norm_stats)

    def group_norm_stats(self, latents: list[np.ndarray], max_side: int):
        t0 = time.perf_counter()
        import torch

        return [self.denoiser.group_norm_stats(torch.from_numpy(np.ascontiguousarray(latents[0])), max_side=max_side)], time.perf_counter() - t0

    def encode(self, tiles: list[np.ndarray], norm_stats: dict | None):
        return _per_tile(self.denoiser.encode, tiles, norm_stats)

    def encoder_group_norm_stats(self, images: list[np.ndarray], max_side: int):
        t0 = time.perf_counter()
        import torch

        image = torch.from_numpy(np.ascontiguousarray(images[0]))
        return [self.denoiser.encoder_group_norm_stats(image, max_side=max_side)], time.perf_counter() - t0


def _per_tile(vae_call, tiles: list[np.ndarray], norm_stats: dict | None):
    """One VAE call (the denoiser's decode or encode) per tile, all with the same GroupNorm statistics; (outputs, seconds)."""
    import torch

    t0 = time.perf_counter()
    outs = [vae_call(torch.from_numpy(np.ascontiguousarray(t))[None], norm_stats=norm_stats)[0].numpy() for t in tiles]
    return outs, time.perf_counter() - t0
