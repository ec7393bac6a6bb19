"""Many renders on one pool against the same renders one after another: pool utilisation and driver overhead.

One render cannot keep many workers busy: each timestep is a barrier, and phase 1 has a single
patch. `render_many` queues several renders on one executor, and one render's barrier gaps run
the others' work units. This measures it with simulated workers (`SimulatedWorker`: a UNet row
sleeps a fixed time, `--seconds-per-patch` / 2 per guidance half), side by side in one run,
the order of the two modes alternating each round:

  together          the renders queued at once with `render_many` (the executor's pool: the render
                    with the most work left first, the others backfilling; `--policy longest`)
  together, --policy earliest   the same, the earliest submitted render first
  one after another the same renders with `render`, one at a time, on the same executor

  farm      `--renders` renders of `--size` (seeds differ) on each of `--workers`
  mixed     one render of each of `--mixed-sizes` on `--mixed-workers`
  overhead  a zero-cost UNet (seconds per row 0) on `--overhead-workers`: the driver's (and Ray's)
            ms per patch evaluation, `--renders` renders interleaved against one render alone

Pool utilisation = the workers' summed busy seconds (`RayExecutor.summary()`) / (workers x seconds):
over the sampling window (first UNet call to last reply; one after another, the sum of the
renders' windows), which the single-render barrier bound (`Plan.timing`, what `apt-dist plan
--workers N` prints as the efficiency bound) also covers, and over the whole wall time (prompt
set-up and VAE decode too). The renders are float16 with one patch and one guidance half per
UNet call, the unit `apt-dist plan` assumes.

    python benchmarks/farm.py --workers 8,16 --rounds 1 --markdown benchmarks/results/farm.md \\
        --json benchmarks/results/farm.json
    python benchmarks/farm.py --quick      # a dry run: small sizes, 2 workers, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import threading
import time

import torch
from bench import Table, _pct, _ray_init, _ray_shutdown, machine, sampling_seconds, simulated_executor, write_markdown

from apt_dist.config import ConfigError, RenderConfig
from apt_dist.many import render_many
from apt_dist.outputs import write_atomic
from apt_dist.planning import plan
from apt_dist.sampler import render

# The measurement's defaults, and --quick's (a dry run in seconds); options given on the command line win.
FULL = {"workers": "8,16", "size": 4096, "mixed_sizes": "2048,3072,4096", "mixed_workers": 16, "overhead_workers": 2,
        "renders": 4, "steps": 50, "seconds_per_patch": 0.035, "rounds": 1}
QUICK = {"workers": "2", "size": 2048, "mixed_sizes": "1024,2048", "mixed_workers": 2, "overhead_workers": 2,
         "renders": 2, "steps": 2, "seconds_per_patch": 0.002, "rounds": 1}
TOGETHER, SEQUENTIAL, SEQ_RAY = "together", "one after another", "one after another, plain Ray"
EARLIEST = "together, --policy earliest"
COLUMNS = ["run", "workers", "renders", "mode", "wall s", "sampling s", "ideal s", "busy s", "UNet s (plan)",
           "util (sampling)", "util (wall)", "1-render bound", "speed-up", "ms/patch (sampling)"]


def timed(ex):
    """Record on `ex` (a RayExecutor) the window of its UNet work: from the first timestep's call to the last
    timestep's end, over every render (lane) it runs. `ex.window = None` starts a new window."""
    run_units, lock = ex._run_units, threading.Lock()
    ex.window = None

    def _run_units(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return run_units(*args, **kwargs)
        finally:
            t1 = time.perf_counter()
            with lock:
                ex.window = (min(ex.window[0], t0), max(ex.window[1], t1)) if ex.window else (t0, t1)

    ex._run_units = _run_units  # lanes and lone renders both reach the workers through it
    return ex


def busy_seconds(ex) -> float:
    return sum(w["busy_s"] for w in ex.summary()["workers"])


def window_seconds(ex) -> float:
    return ex.window[1] - ex.window[0] if ex.window else 0.0


def together(ex, configs: list[RenderConfig], policy: str = "longest") -> dict:
    """The renders queued at once. The pool opens at the first lane, which resets the workers' counters."""
    ex.window = None
    t0 = time.perf_counter()
    results = sorted(render_many(configs, ex, policy=policy), key=lambda j: j.index)
    wall = time.perf_counter() - t0
    failed = [f"{j.job.name}: {j.error}" for j in results if j.error]
    if failed:
        raise RuntimeError("; ".join(failed))
    return {"wall_s": wall, "sampling_s": window_seconds(ex), "busy_s": busy_seconds(ex),
            "patch_evals": sum(j.result.patch_evals for j in results),
            "renders": [{"size": j.job.config.width, "started_s": j.started_s, "finished_s": j.finished_s,
                         "sampling_s": sampling_seconds(j.result)} for j in results]}


def one_after_another(ex, configs: list[RenderConfig]) -> dict:
    """The renders one at a time. Each render's start resets the workers' counters: read them after each."""
    out = {"wall_s": 0.0, "sampling_s": 0.0, "busy_s": 0.0, "patch_evals": 0, "renders": []}
    t0 = time.perf_counter()
    for cfg in configs:
        ex.window = None
        r = render(cfg, executor=ex, progress=False)
        out["sampling_s"] += window_seconds(ex)
        out["busy_s"] += busy_seconds(ex)
        out["patch_evals"] += r.patch_evals
        out["renders"].append({"size": cfg.width, "seconds": r.seconds, "sampling_s": sampling_seconds(r)})
    out["wall_s"] = time.perf_counter() - t0
    return out


def plain_ray(ex, configs: list[RenderConfig]) -> dict:
    """One after another, each call a plain Ray call with Ray objects: the transport the lanes use."""
    before = ex.shared_memory, ex.direct_calls
    ex.shared_memory = ex.direct_calls = False  # read at each render's start
    try:
        return one_after_another(ex, configs)
    finally:
        ex.shared_memory, ex.direct_calls = before


def alternate(ex, configs: list[RenderConfig], rounds: int, label: str, with_plain_ray: bool = False) -> dict:
    """The modes on one executor, `rounds` times, the order rotated each round (after a short warm-up of each:
    actor start-up and first calls)."""
    modes = {TOGETHER: together, EARLIEST: lambda ex, c: together(ex, c, "earliest"), SEQUENTIAL: one_after_another}
    modes |= {SEQ_RAY: plain_ray} if with_plain_ray else {}
    warm = [dataclasses.replace(configs[0], steps=2)]
    for fn in modes.values():
        fn(ex, warm)
    runs: dict = {mode: [] for mode in modes}
    names = list(modes)
    for r in range(rounds):
        for mode in names[r % len(names):] + names[:r % len(names)]:
            runs[mode].append(modes[mode](ex, configs))
            m = runs[mode][-1]
            print(f"  {label}, {ex.num_workers} workers, {mode}: wall {m['wall_s']:.2f} s, sampling {m['sampling_s']:.2f} s, "
                  f"util {_pct(m['busy_s'] / (ex.num_workers * m['sampling_s']))} (sampling)", flush=True)
    return runs


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def rows_for(run: str, n: int, configs: list[RenderConfig], runs: dict, seconds_per_patch: float) -> list[list]:
    plans = [plan(c) for c in configs]
    timings = [p.timing(n, seconds_per_patch) for p in plans]
    ideal = sum(t["ideal_s"] for t in timings)
    bound = ideal / sum(t["barrier_s"] for t in timings)  # each render alone at its barrier bound, one after another
    unet = sum(p.unet_patch_evals for p in plans) * seconds_per_patch
    seq_wall = median(runs[SEQUENTIAL], "wall_s")
    rows = []
    for mode, rs in runs.items():
        wall, sampling, busy = median(rs, "wall_s"), median(rs, "sampling_s"), median(rs, "busy_s")
        rows.append([run, n, len(configs), mode, wall, sampling, ideal, busy, unet, _pct(busy / (n * sampling)),
                     _pct(busy / (n * wall)), _pct(bound), seq_wall / wall, None])
    return rows


def overhead_rows(n: int, configs: list[RenderConfig], rounds: int, with_plain_ray: bool = False,
                  cpus_per_worker: float = 1.0) -> tuple[list[list], dict]:
    """Zero-cost UNet: the renders interleaved against the first one alone; ms per patch evaluation in sampling."""
    ex = timed(simulated_executor(n, 0.0, cpus_per_worker=cpus_per_worker))
    alone = {"alone": lambda: one_after_another(ex, configs[:1])}
    if with_plain_ray:
        alone[SEQ_RAY.replace("one after another", "alone")] = lambda: plain_ray(ex, configs[:1])
    modes = {TOGETHER: lambda: together(ex, configs)} | alone
    runs: dict = {mode: [] for mode in modes}
    names = list(modes)
    try:
        warm = [dataclasses.replace(configs[0], steps=2)]
        for fn in (together, one_after_another) + ((plain_ray,) if with_plain_ray else ()):
            fn(ex, warm)
        for r in range(rounds):
            for mode in names[r % len(names):] + names[:r % len(names)]:
                runs[mode].append(modes[mode]())
                m = runs[mode][-1]
                print(f"  overhead, {n} workers, {mode}: {1000 * m['sampling_s'] / m['patch_evals']:.3f} ms/patch",
                      flush=True)
    finally:
        ex.close()
    rows = []
    for mode, rs in runs.items():
        count = len(configs) if mode == TOGETHER else 1
        rows.append(["overhead", n, count, mode, median(rs, "wall_s"), median(rs, "sampling_s"), None, None, None, None,
                     None, None, None, 1000 * median(rs, "sampling_s") / rs[0]["patch_evals"]])
    return rows, runs


def parse_ints(option: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(option, f"expected positive integers separated by commas, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python benchmarks/farm.py", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a dry run in seconds: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--workers", help=f"worker counts of the farm runs, comma-separated, 0: skip them (default {FULL['workers']})")
    ap.add_argument("--size", type=int, help=f"width and height of the farm's renders (default {FULL['size']})")
    ap.add_argument("--renders", type=int, help=f"renders queued together in the farm and overhead runs (default {FULL['renders']})")
    ap.add_argument("--mixed-sizes", help=f"sizes rendered together in the mixed run, in submission order (default {FULL['mixed_sizes']})")
    ap.add_argument("--mixed-workers", type=int, help=f"workers of the mixed run, 0: skip it (default {FULL['mixed_workers']})")
    ap.add_argument("--overhead-workers", type=int, help=f"workers of the zero-cost runs, 0: skip them (default {FULL['overhead_workers']})")
    ap.add_argument("--steps", type=int, help=f"denoising steps (default {FULL['steps']})")
    ap.add_argument("--rounds", type=int, help=f"measured runs of each mode (median; default {FULL['rounds']})")
    ap.add_argument("--seconds-per-patch", type=float,
                    help=f"simulated UNet seconds per patch with both guidance branches (default {FULL['seconds_per_patch']}: "
                         "SDXL on an H100, as `apt-dist plan`)")
    ap.add_argument("--view-batch-size", type=int, default=1, help="patches per UNet call (default 1)")
    ap.add_argument("--split-guidance", action=argparse.BooleanOptionalAction, default=True,
                    help="each guidance branch its own UNet call (default: split)")
    ap.add_argument("--plain-ray", action="store_true",
                    help="also run the renders one after another with plain Ray calls and objects (the lanes' "
                         "transport; by default a lone render on the driver's node uses shared memory and sockets)")
    ap.add_argument("--driver-threads", type=int, default=1, help="torch threads of the driver (default 1)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per simulated worker (default 1)")
    ap.add_argument("--json", default=None, help="also write the numbers as JSON")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown")
    return ap


def settings(ns) -> dict:
    """The options, defaults filled from --quick's or the full measurement's, checked (ConfigError: exit 2)."""
    s = {k: (getattr(ns, k) if getattr(ns, k) is not None else v) for k, v in (QUICK if ns.quick else FULL).items()}
    s["workers"] = [] if str(s["workers"]).strip() == "0" else parse_ints("--workers", s["workers"])
    s["mixed_sizes"] = parse_ints("--mixed-sizes", s["mixed_sizes"])
    for key in ("renders", "steps", "rounds", "size"):
        if s[key] < 1:
            raise ConfigError("--" + key.replace("_", "-"), f"must be an integer >= 1, got {s[key]}")
    for key in ("mixed_workers", "overhead_workers"):
        if s[key] < 0:
            raise ConfigError("--" + key.replace("_", "-"), f"must be an integer >= 0 (0: skip), got {s[key]}")
    if s["seconds_per_patch"] < 0:
        raise ConfigError("--seconds-per-patch", f"must be >= 0, got {s['seconds_per_patch']}")
    if ns.driver_threads < 1:
        raise ConfigError("--driver-threads", f"must be an integer >= 1, got {ns.driver_threads}")
    if ns.cpus_per_worker <= 0:
        raise ConfigError("--cpus-per-worker", f"must be > 0, got {ns.cpus_per_worker}")
    return s


def config(size: int, seed: int, steps: int, ns) -> RenderConfig:
    return RenderConfig(model="sdxl-random", width=size, height=size, steps=steps, seed=seed, dtype="float16",
                        view_batch_size=ns.view_batch_size, split_guidance=ns.split_guidance).validate()


def run(ns, s: dict) -> Table:
    farm = [config(s["size"], 1 + i, s["steps"], ns) for i in range(s["renders"])]
    mixed = [config(size, 1 + i, s["steps"], ns) for i, size in enumerate(s["mixed_sizes"])]
    counts = list(s["workers"])
    if s["mixed_workers"] and s["mixed_workers"] not in counts:
        counts.append(s["mixed_workers"])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = _ray_init(int(max(counts + [s["overhead_workers"]]) * ns.cpus_per_worker) + 2)
    rows, data = [], {}
    try:
        if s["overhead_workers"]:
            print(f"overhead: {s['renders']} renders of {s['size']}x{s['size']}, zero-cost UNet", flush=True)
            over, data["overhead"] = overhead_rows(s["overhead_workers"], farm, s["rounds"], ns.plain_ray,
                                                      ns.cpus_per_worker)
            rows += over
        for n in counts:  # one executor per worker count, so that only one set of actors is up at a time
            ex = timed(simulated_executor(n, s["seconds_per_patch"], cpus_per_worker=ns.cpus_per_worker))
            try:
                if n in s["workers"]:
                    data[f"farm {n}"] = alternate(ex, farm, s["rounds"], "farm", ns.plain_ray)
                    rows += rows_for("farm", n, farm, data[f"farm {n}"], s["seconds_per_patch"])
                if n == s["mixed_workers"]:
                    data[f"mixed {n}"] = alternate(ex, mixed, s["rounds"], "mixed", ns.plain_ray)
                    rows += rows_for("mixed " + "+".join(map(str, s["mixed_sizes"])), n, mixed, data[f"mixed {n}"],
                                     s["seconds_per_patch"])
            finally:
                ex.close()
    finally:
        _ray_shutdown(started)
    unit = (f"{ns.view_batch_size} patch(es) per call" +
            (", guidance halves apart" if ns.split_guidance else ", both guidance branches"))
    table = Table(f"Farm: sdxl-random float16 APT, {s['steps']} steps, {unit}, simulated "
                  f"{1000 * s['seconds_per_patch']:g} ms/patch; {s['rounds']} round(s), modes alternating", COLUMNS, rows)
    table.notes.append("together: render_many on one pool; one after another: render, one at a time, on the same executor; "
                       "farm: seeds 1..n of one size; mixed: one render per size, submitted in that order")
    table.notes.append("sampling s: first UNet call to last reply (one after another: the sum over the renders); wall s: also prompt "
                       "set-up and VAE decode; ideal s: patch evals x s/patch / workers")
    table.notes.append("util = workers' busy s / (workers x seconds); 1-render bound: each render alone at its per-step barrier bound "
                       "(apt-dist plan's efficiency bound); speed-up: one-after-another wall / this wall")
    table.notes.append("busy s against UNet s (plan): the counters cover every render (a shortfall: calls the counters missed)")
    table.notes.append("overhead: seconds per row 0, ms/patch = sampling s / patch evaluations (driver and Ray calls; lanes use plain "
                       "Ray calls, a lone render shared memory and sockets; --plain-ray: also one after another over plain Ray)")
    table.data = {"runs": data, "settings": s | {"view_batch_size": ns.view_batch_size, "split_guidance": ns.split_guidance,
                                                 "driver_threads": ns.driver_threads, "cpus_per_worker": ns.cpus_per_worker}}
    return table


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        s = settings(ns)
        for option, sizes in (("--size", [s["size"]]), ("--mixed-sizes", s["mixed_sizes"])):
            for size in sizes:  # bad sizes, steps, view batch: exit 2 before Ray starts
                try:
                    config(size, 1, s["steps"], ns)
                except ConfigError as e:
                    if e.option in ("--width", "--height"):
                        raise ConfigError(option, str(e).split(": ", 1)[1]) from None
                    raise
    except ConfigError as e:
        print(f"farm.py: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(ns.driver_threads)
    command = "python benchmarks/farm.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    table = run(ns, s)
    print(table.text())
    if ns.json:
        text = json.dumps(table.to_dict() | {"command": command, "machine": machine()}, indent=2, default=str)
        write_atomic(ns.json, lambda f: f.write(text.encode()))
    if ns.markdown:
        write_markdown(ns.markdown, table, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
