"""Where a timestep's time goes on the driver: the simulated 4096x4096 APT render, one step at a time.

For every step, times from the end of the previous step (ms): the driver's work before the
step's first call, the first and last submit, the first and last reply taken up, when the
last reply has been used (guided, stepped, fused), and the end of the step (fusion, check);
and the driver's time spent using replies. Printed as medians per phase next to the barrier bound of a step.
Usage:
  python benchmarks/step_timeline.py --workers 8 [--driver-threads 1] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import ray
import torch
from bench import SimulatedWorker, Table, emit

from apt_dist.config import RenderConfig
from apt_dist.planning import plan
from apt_dist.ray_executor import RayExecutor
from apt_dist.sampler import render


class TimedExecutor(RayExecutor):
    """RayExecutor that stamps each step's first submit, last submit, first reply and last reply."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.marks: list[tuple[str, float]] = []

    def predict(self, *a, **kw):
        self.marks.append(("predict", time.perf_counter()))
        return super().predict(*a, **kw)

    def _dispatch(self, job):
        submit, receive = job.submit, job.receive

        def timed_submit(w, idx):
            ref = submit(w, idx)
            self.marks.append(("submit", time.perf_counter()))
            return ref

        def timed_receive(idx, outs):
            self.marks.append(("reply", time.perf_counter()))
            receive(idx, outs)
            self.marks.append(("used", time.perf_counter()))

        job.submit, job.receive = timed_submit, timed_receive
        return super()._dispatch(job)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seconds-per-patch", type=float, default=0.035)
    ap.add_argument("--driver-threads", type=int, default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    if args.driver_threads:
        torch.set_num_threads(args.driver_threads)
    cfg = RenderConfig(model="sdxl-random", width=4096, height=4096, steps=args.steps, dtype="float16")
    p = plan(cfg)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False)
    steps: list[tuple[int, list]] = []
    try:
        with TimedExecutor(num_workers=args.workers, worker_class=SimulatedWorker, gpus_per_worker=0,
                           worker_kwargs={"seconds_per_row": args.seconds_per_patch / 2}) as ex:
            render(cfg, executor=ex, progress=False)  # warm-up
            ex.marks.clear()
            last = [time.perf_counter()]

            def on_step(phase, step, t):
                now = time.perf_counter()
                steps.append((phase, [(e, s - last[0]) for e, s in ex.marks] + [("end", now - last[0])]))
                ex.marks.clear()
                last[0] = now

            t0 = time.perf_counter()
            ex.marks.clear()
            last[0] = t0
            render(cfg, executor=ex, progress=False, callback=on_step)
    finally:
        ray.shutdown()

    rows = []
    for ph in p.phases:
        st = [m for phase, m in steps if phase == ph.index]
        st = st[1:] or st  # the first step of a phase also holds the phase's set-up
        units = ph.units_per_step
        bound = 1000 * args.seconds_per_patch * ph.step_barrier(args.workers)

        def med(event, pick, st=st):
            return statistics.median(pick([t for e, t in m if e == event]) for m in st) * 1000

        end = med("end", max)
        using = statistics.median(sum(u - r for r, u in zip([t for e, t in m if e == "reply"], [t for e, t in m if e == "used"]))
                                  for m in st) * 1000
        rows.append([ph.index, f"{ph.width}x{ph.height}", units, bound, med("predict", min), med("submit", min),
                     med("submit", max), med("reply", min), med("reply", max), med("used", max), end, end - bound, using])
    table = Table(
        f"Per-step timeline, sdxl-random 4096x4096 APT, {args.workers} simulated workers at "
        f"{1000 * args.seconds_per_patch:g} ms/patch, driver on {torch.get_num_threads()} torch thread(s): "
        "medians per step, ms from the end of the previous step",
        ["phase", "size", "units/step", "bound ms", "before predict", "first submit", "last submit",
         "first reply", "last reply", "last reply used", "step end", "over bound", "using replies"], rows,
        ["bound ms: the barrier bound of one step (its units shared longest first, PhasePlan.step_barrier); over bound: step end - bound",
         ("a reply's time is when the driver takes it up; used: when its guidance, steps and fusion are done; "
          "using replies: their sum over the step (ms)")])
    emit(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
