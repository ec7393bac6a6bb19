"""The Ray worker: one UNet replica (and the VAE) behind two methods, predict and decode.

A small class on purpose. What travels: per call, the unique patches of the call's
work units as numpy arrays plus their rows (patch, guidance branch) and crops; the
render's prompt embeddings travel once per worker, as an object reference that the
worker resolves on its first call of a render (again after a restart) and caches.
The replies are numpy arrays, which Ray returns zero-copy.

`simulate_seconds_per_row` replaces the UNet by a sleep and zeros, for scheduling
and overhead benchmarks: no torch model is built then.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np


class UNetWorker:
    def __init__(self, spec, simulate_seconds_per_row: float | None = None, extra_delay_s: float = 0.0,
                 cpu_threads: int | None = None):
        self.spec = spec
        self.simulate = simulate_seconds_per_row
        self.extra_delay_s = extra_delay_s  # for fault-injection tests: keeps a call in flight a while
        self._ctx_key = None
        self._ctx = None
        self.denoiser = None
        if simulate_seconds_per_row is None:
            import torch

            from .models import Denoiser

            if cpu_threads and spec.device == "cpu":
                # CPU float reductions depend on the intra-op thread count: pin it, so a CPU worker
                # computes bit for bit what an in-process executor with as many threads computes.
                torch.set_num_threads(cpu_threads)

            self.denoiser = Denoiser(spec)

    def info(self) -> dict:
        import ray

        out = {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
        if self.denoiser is not None and self.denoiser.device.type == "cuda":
            import torch

            out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.denoiser.device)
        return out

    def _context(self, ctx_box):
        import ray

        ref = ctx_box[0]
        if self._ctx_key != ref.hex():
            self._ctx = ray.get(ref)
            self._ctx_key = ref.hex()
        return self._ctx

    def predict(self, ctx_box: list, timestep: int, calls: list[tuple[np.ndarray, list, list, list]]):
        """Run each (unique_patches [k,C,h,w], rows [(local_patch, branch)], crops [k]) as one UNet call.

        Returns ([outputs [rows,C,h,w] float32], busy seconds).
        """
        t0 = time.perf_counter()
        ctx = self._context(ctx_box) if self.simulate is None else None
        outs = []
        for x_unique, rows, crops in calls:
            if self.simulate is not None:
                time.sleep(self.simulate * len(rows))
                outs.append(np.zeros((len(rows),) + x_unique.shape[1:], dtype=x_unique.dtype))
                continue
            import torch

            idx = [p for p, _ in rows]
            x = torch.from_numpy(np.ascontiguousarray(x_unique[idx]))
            out = self.denoiser.predict(x, timestep, [tuple(crops[p]) for p in idx], [b for _, b in rows], ctx["embeds"], ctx["original_size"])
            # Replies travel in the dtype the patches came in: float16 for a float16 UNet, whose
            # outputs are float16 values anyway (lossless, half the bytes).
            outs.append(out.numpy().astype(x_unique.dtype, copy=False))
        if self.extra_delay_s:
            time.sleep(self.extra_delay_s)
        return outs, time.perf_counter() - t0

    def decode(self, tiles: list[np.ndarray], norm_stats: dict | None):
        t0 = time.perf_counter()
        if self.simulate is not None:
            return [np.zeros((3, t.shape[1] * 8, t.shape[2] * 8), np.float32) for t in tiles], time.perf_counter() - t0
        import torch

        outs = [self.denoiser.decode(torch.from_numpy(np.ascontiguousarray(t))[None], norm_stats=norm_stats)[0].numpy()
                for t in tiles]
        return outs, time.perf_counter() - t0

    def group_norm_stats(self, latents: list[np.ndarray], max_side: int):
        t0 = time.perf_counter()
        if self.simulate is not None:
            return [{}], time.perf_counter() - t0
        import torch

        return [self.denoiser.group_norm_stats(torch.from_numpy(np.ascontiguousarray(latents[0])), max_side=max_side)], time.perf_counter() - t0
