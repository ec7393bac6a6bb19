"""A/B of RayExecutor._dispatch policies on the simulated 4096x4096 APT render, side by side in one run.

    .venv/bin/python benchmarks/dispatch_ab.py [--steps 50] [--workers 2,4,8,16] [--seconds-per-patch 0.035]
                                               [--policies old,wave,current] [--dtype float32]

Policies (all keep the same worker-loss handling where the package's does; here no worker is lost):
  old      commit 3693ae8's: depth first (each worker's 2 slots filled before the next worker's); every
           call takes ceil(queue / (workers x 2)) units, a shrinking share
  wave     breadth first, 2 calls in flight per worker: the first workers x 2 calls take
           floor(units / (workers x 2)) each, then single units to whoever frees a slot first
  current  RayExecutor._dispatch as it is in the tree
All run on the same actors, one render each per worker count, in a rotating order. The numbers are
sampling seconds (RenderResult.phases): no actor start-up, no decode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import deque

import ray

from apt_dist.bench import machine, sampling_seconds
from apt_dist.config import RenderConfig
from apt_dist.plan import plan
from apt_dist.ray_executor import RayExecutor, _record
from apt_dist.sampler import render


class CountingExecutor(RayExecutor):
    """RayExecutor that counts its Ray calls and can dispatch with another policy."""

    policy = "current"
    calls_made = 0
    slots_per_worker = 2  # calls in flight per worker, for "old" and "wave"

    def _dispatch(self, items, submit, weights, what):
        if self.policy == "current":
            n0 = sum(w.calls for w in self.workers)
            out = super()._dispatch(items, submit, weights, what)
            self.calls_made += sum(w.calls for w in self.workers) - n0
            return out
        results: list = [None] * len(items)
        queue = deque(range(len(items)))
        in_flight: dict = {}
        cif = self.slots_per_worker

        def call(w, take):
            idx = [queue.popleft() for _ in range(min(take, len(queue)))]
            in_flight[submit(w.handle, [items[i] for i in idx])] = (w, idx)
            w.in_flight += 1
            self.calls_made += 1

        made = 0
        while queue or in_flight:
            live = [w for w in self.workers if w.alive]
            slots = len(live) * cif
            if self.policy == "old":
                for w in live:
                    while queue and w.in_flight < cif:
                        call(w, max(1, math.ceil(len(queue) / slots)))
            else:  # wave
                for slot in range(cif):
                    for w in live:
                        if queue and w.in_flight <= slot:
                            call(w, max(1, len(items) // slots) if made < slots else 1)
                            made += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                w, idx = in_flight.pop(ref)
                w.in_flight -= 1
                outs, busy = ray.get(ref)
                _record(w, idx, outs, busy, results, weights)
        return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--workers", default="2,4,8,16")
    ap.add_argument("--seconds-per-patch", type=float, default=0.035)
    ap.add_argument("--policies", default="old,wave,current")
    ap.add_argument("--dtype", default="float32", help="model dtype: float16 sends float16 over the wire (if the tree does)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    policies = args.policies.split(",")
    cfg = RenderConfig(model="sdxl-random", width=4096, height=4096, steps=args.steps, dtype=args.dtype)
    p = plan(cfg)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(counts) + 2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for k, n in enumerate(counts):
            ex = CountingExecutor(num_workers=n, simulate_seconds_per_patch=args.seconds_per_patch)
            got = {}
            try:
                for policy in policies[k % len(policies):] + policies[: k % len(policies)]:
                    ex.policy, ex.calls_made = policy, 0
                    r = render(cfg, executor=ex, progress=False)
                    got[policy] = {"wall_s": sampling_seconds(r), "calls": ex.calls_made,
                                   "phases_s": [round(x.seconds, 3) for x in r.phases]}
            finally:
                ex.close()
            b = p.timing(n, args.seconds_per_patch)
            rows.append({"workers": n, "barrier_s": b["barrier_s"], "ideal_s": b["ideal_s"]} | got)
            print(f"{n:>3} workers, barrier bound {b['barrier_s']:6.2f} s: " + "  ".join(
                f"{q} {got[q]['wall_s']:6.2f} s ({got[q]['calls']} calls, {b['barrier_s'] / got[q]['wall_s']:.1%} of bound)"
                for q in policies), flush=True)
    finally:
        ray.shutdown()
    cmd = "python " + " ".join(sys.argv)
    info = machine()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "machine": info, "plan_patch_evals": p.unet_patch_evals, "rows": rows}, f, indent=2)
    if args.markdown:
        lines = [f"`{cmd}`", "", f"{info['date']}; nproc {info['nproc']}, {info['cpu']}", "",
                 f"**RayExecutor dispatch policies: sdxl-random 4096x4096 APT ({args.dtype}), {p.unet_patch_evals} patch evals, "
                 f"simulated {1000 * args.seconds_per_patch:g} ms/patch, same actors, side by side**", "",
                 "| workers | barrier bound s | " + " | ".join(f"{q} s | {q} calls | {q} vs bound" for q in policies) + " |",
                 "|---:|---:|" + "---:|---:|---:|" * len(policies)]
        for r in rows:
            lines.append(f"| {r['workers']} | {r['barrier_s']:.1f} | " + " | ".join(
                f"{r[q]['wall_s']:.1f} | {r[q]['calls']} | {r['barrier_s'] / r[q]['wall_s']:.1%}" for q in policies) + " |")
        lines += ["", "wall seconds of sampling; vs bound = barrier bound / wall; calls include the decode's"]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
