"""Two versions of apt-dist side by side: the simulated 4096x4096 APT render on the same machine, alternating.

Each checkout (a folder holding `apt_dist/`, say a `git worktree` of an older commit) renders in a
fresh process of this Python: the zero-cost warm-up, one Ray instance, `--workers` simulated
actors, a warm-up render, then `--renders` timed ones. The checkouts take turns `--rounds`
times, so a noisy machine disturbs both alike. Usage:
  git worktree add /tmp/old REV
  python benchmarks/checkout_ab.py /tmp/old . --workers 8 --markdown benchmarks/results/checkout_ab_8.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# Runs inside each checkout; only what every version of the package has had since the scaling benchmark.
# Older packages hold the harness themselves (apt_dist.bench, RayExecutor's simulate_seconds_per_patch); newer ones
# take this folder's (bench.py: SimulatedWorker through RayExecutor's worker_class).
ONE_CHECKOUT = r"""
import json, os, sys
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import ray
import apt_dist
from apt_dist.config import RenderConfig
from apt_dist.ray_executor import RayExecutor
# By the checkout's files, not by what imports: an editable install elsewhere may fill in missing modules.
has = lambda name: os.path.isfile(os.path.join(os.path.dirname(apt_dist.__file__), name))
if has("planning.py"):
    from apt_dist.planning import plan
else:
    from apt_dist.plan import plan
workers, renders, spp, steps = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
if has("bench.py"):
    from apt_dist.bench import ZeroExecutor, _render, sampling_seconds
    simulated = lambda: RayExecutor(num_workers=workers, simulate_seconds_per_patch=spp, cpus_per_worker=1)
else:
    sys.path.insert(0, sys.argv[5])
    from bench import ZeroExecutor, _render, sampling_seconds, simulated_executor
    simulated = lambda: simulated_executor(workers, spp, cpus_per_worker=1)
cfg = RenderConfig(model="sdxl-random", width=4096, height=4096, steps=steps, dtype="float16")
_render(cfg, ZeroExecutor())
ray.init(address="local", num_cpus=workers + 2, include_dashboard=False, log_to_driver=False)
with simulated() as ex:
    _render(cfg, ex)
    walls = [sampling_seconds(_render(cfg, ex)) for _ in range(renders)]
ray.shutdown()
print("RESULT " + json.dumps({"walls": walls, "timing": plan(cfg).timing(workers, spp), "package": apt_dist.__file__}))
"""


def label(checkout: str) -> str:
    """The folder, and its git commit when it is a checkout ("+" when it has uncommitted changes)."""
    def git(*a):
        return subprocess.run(["git", "-C", checkout, *a], capture_output=True, text=True, check=False).stdout.strip()

    if os.path.realpath(git("rev-parse", "--show-toplevel") or "/nonexistent") != os.path.realpath(checkout):
        return checkout  # not a checkout of its own (a copied package inside another tree): no commit to name
    rev = git("rev-parse", "--short", "HEAD")
    return f"{checkout} ({rev}{'+' if git('status', '--porcelain', '--untracked-files=no') else ''})" if rev else checkout


def run_once(checkout: str, workers: int, renders: int, seconds_per_patch: float, steps: int) -> dict:
    harness = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", ONE_CHECKOUT, str(workers), str(renders), str(seconds_per_patch), str(steps),
                           harness],
                          cwd=checkout, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"checkout {checkout}: the render failed:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    if not out["package"].startswith(os.path.abspath(checkout) + os.sep):
        raise SystemExit(f"checkout {checkout}: imported {out['package']} instead of its own apt_dist")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs=2, help="two folders, each holding an apt_dist package")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--renders", type=int, default=2, help="timed renders per checkout and round")
    ap.add_argument("--seconds-per-patch", type=float, default=0.035)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    from bench import Table, _pct, emit, write_markdown

    walls: list[list[float]] = [[] for _ in args.checkouts]  # by position: the same folder twice is two rows

    def table(rounds: int, timing: dict) -> Table:
        return Table(
            f"Two checkouts side by side: sdxl-random 4096x4096 APT, {args.steps} steps, {args.workers} simulated workers "
            f"at {1000 * args.seconds_per_patch:g} ms/patch, {rounds} rounds x {args.renders} renders each",
            ["checkout", "walls s", "median s", "vs bound", "vs ideal"],
            [[label(c), " ".join(f"{w:.2f}" for w in ws), statistics.median(ws),
              _pct(timing["barrier_s"] / statistics.median(ws)), _pct(timing["ideal_s"] / statistics.median(ws))]
             for c, ws in zip(args.checkouts, walls)],
            [f"barrier bound {timing['barrier_s']:.2f} s, ideal {timing['ideal_s']:.2f} s; walls: sampling phases, in run order"],
        )

    for r in range(1, args.rounds + 1):
        for c, ws in zip(args.checkouts, walls):
            out = run_once(c, args.workers, args.renders, args.seconds_per_patch, args.steps)
            ws += out["walls"]
            timing = out["timing"]
        print(f"round {r}/{args.rounds}: " + "; ".join(f"{label(c)} {' '.join(f'{w:.2f}' for w in ws)}"
                                                     for c, ws in zip(args.checkouts, walls)), flush=True)
        if args.markdown and r < args.rounds:  # the rounds so far, should the run be stopped before the end
            write_markdown(args.markdown, table(r, timing), "python " + " ".join(sys.argv))
    emit(table(args.rounds, timing), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
