"""A/B/C of RayExecutor's data and control planes on the simulated 4096x4096 APT render, side by side.

  shm + socket     patches and predictions through the driver's /dev/shm file, calls (offsets) over a
                   Unix socket per worker: the default for workers on the driver's node
  shm + Ray calls  the same file, every call a Ray actor call (direct_calls=False)
  object store     plain Ray calls and objects (what workers on other nodes use): the step's latents once per
                   step, each call its patches' cuts; the replies as Ray objects

The same actors render every way, rotating which goes first, so a noisy machine
disturbs all alike. Usage:
  python benchmarks/transport_ab.py --workers 8,16 --markdown benchmarks/results/transport_ab.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ray
from bench import Table, _pct, emit, machine, sampling_seconds, simulated_executor

from apt_dist.config import RenderConfig
from apt_dist.planning import plan
from apt_dist.sampler import render

# mode: (shared_memory, direct_calls, the summary's (transport, calls_via))
MODES = {
    "shm + socket": (True, True, ("shared memory", "socket")),
    "shm + Ray calls": (True, False, ("shared memory", "ray")),
    "object store": (False, False, ("object store", "ray")),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--workers", default="8,16")
    ap.add_argument("--seconds-per-patch", type=float, default=0.035)
    ap.add_argument("--dtype", default="float16", help="model dtype: float16 patches travel as float16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    cfg = RenderConfig(model="sdxl-random", width=4096, height=4096, steps=args.steps, dtype=args.dtype)
    p = plan(cfg)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(counts) + 2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for k, n in enumerate(counts):
            ex = simulated_executor(n, args.seconds_per_patch)
            got = {}
            try:
                modes = list(MODES)[k % len(MODES):] + list(MODES)[:k % len(MODES)]
                for mode in modes:
                    ex.shared_memory, ex.direct_calls, want = MODES[mode]
                    r = render(cfg, executor=ex, progress=False)
                    used = {(w["transport"], w["calls_via"]) for w in ex.summary()["workers"]}
                    assert used == {want}, f"asked for {mode}, workers used {used}"
                    got[mode] = {"wall_s": sampling_seconds(r), "phases_s": [round(x.seconds, 3) for x in r.phases]}
            finally:
                ex.close()
            b = p.timing(n, args.seconds_per_patch)
            rows.append({"workers": n, "barrier_s": b["barrier_s"], "ideal_s": b["ideal_s"]} | got)
            print(f"{n:>3} workers, barrier bound {b['barrier_s']:6.2f} s: " + "  ".join(
                f"{m} {got[m]['wall_s']:6.2f} s ({b['barrier_s'] / got[m]['wall_s']:.1%} of bound)" for m in MODES), flush=True)
    finally:
        ray.shutdown()
    cmd = "python " + " ".join(sys.argv)
    table = Table(
        f"RayExecutor data planes: sdxl-random 4096x4096 APT ({args.dtype}), {p.unet_patch_evals} patch evals, "
        f"simulated {1000 * args.seconds_per_patch:g} ms/patch, same actors, side by side",
        ["workers", "barrier bound s", "ideal s"] + [f"{m} {c}" for m in MODES for c in ("s", "vs bound", "vs ideal")],
        [[r["workers"], r["barrier_s"], r["ideal_s"]]
         + [v for m in MODES for v in (r[m]["wall_s"], _pct(r["barrier_s"] / r[m]["wall_s"]), _pct(r["ideal_s"] / r[m]["wall_s"]))]
         for r in rows],
        ["wall seconds of sampling; vs bound = barrier bound / wall; vs ideal = (patch time / workers) / wall"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "machine": machine(), "plan_patch_evals": p.unet_patch_evals, "rows": rows}, f, indent=2)
    emit(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
