"""The driver's critical path at each step boundary, without Ray: from a step's last reply to the next step's first call.

Every step of the simulated 4096x4096 APT render waits, after its last reply, for the driver
to use that reply, finish the step and send the next step's first call; the workers idle
in the meantime. This replays each step as `--workers` workers of equal speed would answer it:
the units are shared out as RayExecutor shares them (`_shares`), each call's patches are
staged as for a worker on the driver's node (`_Staging`, float16, into a shared-memory
file), and the replies (zeros) reach the sampler in the order the calls end. Nothing
sleeps, so the times are the driver's own work, measured in one process: steady enough on
a shared 2-core machine to compare two checkouts side by side (`--repeats` alternating
runs; PYTHONPATH picks the package).

Usage:
  python benchmarks/step_boundary.py --workers 16 [--driver-threads 1] [--repeats 3] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import deque

import numpy as np
import torch
from bench import Table, ZeroExecutor, emit

import apt_dist
from apt_dist import shared_memory
from apt_dist.config import RenderConfig
from apt_dist.executor import DeferredPatches
from apt_dist.planning import plan
from apt_dist.ray_executor import WorkerState, _shares, _Staging
from apt_dist.sampler import render


class ReplayExecutor(ZeroExecutor):
    """Shares, stages and answers each step's units as `workers` equal workers would, in this process."""

    def __init__(self, workers: int):
        super().__init__()
        self.workers = [WorkerState(handle=None, index=i) for i in range(workers)]
        self.buf = shared_memory.SharedBuffer()
        self.marks: list[tuple[str, float]] = []

    def _run_units(self, timestep, units, patches, crops, deliver):
        staging = _Staging(units, patches, np.float16, self.buf)
        made = len(patches.head) if isinstance(patches, DeferredPatches) else len(patches)
        calls = _shares(deque(range(len(units))), self.workers, lambda k: units[k].patches[-1] < made,
                        [len(u.rows) / 2 for u in units])
        ends, busy = [], {}
        for n, (w, idx) in enumerate(calls):
            for k in idx:
                staging.message(k, crops, True)
            if n == 0:
                self.marks.append(("first call", time.perf_counter()))
            busy[w.index] = busy.get(w.index, 0) + sum(len(units[k].rows) for k in idx)  # its calls back to back
            ends.append((busy[w.index], n, idx))
        ends.sort()  # replies in the order the calls end; ties in the order they were sent
        for j, (_, _, idx) in enumerate(ends):
            if j == len(ends) - 1:
                self.marks.append(("last reply", time.perf_counter()))
            deliver(idx, [torch.zeros((len(units[k].rows),) + tuple(patches[units[k].rows[0][0]].shape)) for k in idx])

    def close(self):
        self.buf.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--driver-threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.driver_threads)
    cfg = RenderConfig(model="sdxl-random", width=4096, height=4096, steps=50, dtype="float16")
    p = plan(cfg)
    per_phase: dict[int, list[float]] = {}
    per_step: dict[int, list[float]] = {}  # the driver's whole work in a step
    ex = ReplayExecutor(args.workers)
    try:
        for r in range(args.repeats + 1):  # the first render warms up
            steps: list[tuple[int, list]] = []

            def on_step(phase, step, t):
                steps.append((phase, list(ex.marks), time.perf_counter()))
                ex.marks.clear()

            ex.marks.clear()
            render(cfg, executor=ex, progress=False, callback=on_step)
            if r == 0:
                continue
            for (ph, m, end), (ph_next, m_next, end_next) in zip(steps, steps[1:]):
                if ph == ph_next and ph > 1:  # within an upscaling phase: the boundary between two steps
                    last = [t for e, t in m if e == "last reply"][0]
                    first = [t for e, t in m_next if e == "first call"][0]
                    per_phase.setdefault(ph, []).append((first - last) * 1000)
                    per_step.setdefault(ph, []).append((end_next - end) * 1000)
    finally:
        ex.close()
    rows = [[ph.index, f"{ph.width}x{ph.height}", ph.units_per_step, len(per_phase[ph.index]),
             statistics.median(per_phase[ph.index]), min(per_phase[ph.index]), statistics.median(per_step[ph.index])]
            for ph in p.phases if ph.index in per_phase]
    table = Table(
        f"Step boundary on the driver, sdxl-random 4096x4096 APT as {args.workers} workers share it, driver on "
        f"{torch.get_num_threads()} torch thread(s), package {apt_dist.__file__}: ms from a step's last reply "
        "to the next step's first call",
        ["phase", "size", "units/step", "boundaries", "median ms", "min ms", "driver ms/step"], rows,
        ["median and min ms: the last reply's guidance, scheduler step and fusion, the end of the step, the next "
         "step's set-up and its first call's staging: work the workers wait for",
         "driver ms/step: the driver's whole work in a step (median), most of it while the workers compute"])
    emit(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
