"""The benchmark harness: `python benchmarks/bench.py <what>`, one function per benchmark, one table type.

  phases    per-phase wall time, UNet patch evaluations and driver share (in-process, real UNet)
  overhead  driver + Ray transport cost per patch evaluation, with a zero-cost UNet stand-in
  scaling   simulated workers (each UNet call sleeps) against the ideal and the per-step barrier bound
  workers   tiny with real compute: in-process against 1..N CPU Ray workers, per core

Every number about sampling comes from `RenderResult.phases` (the sampling phases only), so
model loading, Ray start-up, actor start-up and the VAE decode are never in it. Runs are
done side by side in one process; on a shared machine compare the ratios, not the seconds.

The stand-ins the benchmarks use live here, not in the runtime package: `ZeroExecutor` (a
zero-cost UNet in the driver's process) and `SimulatedWorker` (a Ray worker whose UNet call
sleeps), which `RayExecutor(worker_class=...)` runs. The other scripts in benchmarks/ import
them from here (`from bench import ...`: a script's folder is on its sys.path).

    python benchmarks/bench.py phases --method demofusion --markdown benchmarks/results/phases_demofusion.md
    python benchmarks/bench.py scaling --workers 4,8,16 --json scaling.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from apt_dist.config import ConfigError, RenderConfig
from apt_dist.executor import Executor, RenderContext
from apt_dist.outputs import write_atomic
from apt_dist.worker import UNetWorker

BENCHMARKS = ("phases", "overhead", "scaling", "workers")

# Per benchmark, the RenderConfig defaults; options given on the command line override them.
DEFAULT_CONFIGS = {
    "phases": {},  # tiny, 384x384, 50 steps, APT: three phases
    # float16 as on a GPU: patches and replies travel in the UNet's dtype. One patch a call, halves apart: the unit
    # these numbers were measured at (simulated workers are CPU workers, whose auto unit is another).
    "overhead": {"model": "sdxl-random", "width": 4096, "height": 4096, "dtype": "float16", "view_batch_size": 1,
                 "split_guidance": True},
    "scaling": {"model": "sdxl-random", "width": 4096, "height": 4096, "dtype": "float16", "view_batch_size": 1,
                "split_guidance": True},
    "workers": {"width": 384, "height": 288, "steps": 20},
}
DEFAULT_WORKERS = {"overhead": [2], "scaling": [1, 2, 4, 8, 16], "workers": [1, 2]}


# ---- the table -------------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # extra numbers for the JSON (unrounded, per-worker, ...)

    def cells(self) -> list[list[str]]:
        return [[_fmt(v) for v in row] for row in self.rows]

    def text(self) -> str:
        cells = self.cells()
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        def line(vals):
            return "  ".join(v.rjust(w) for v, w in zip(vals, widths))
        out = [self.title, line(self.columns), line(["-" * w for w in widths])]
        out += [line(r) for r in cells]
        out += self.notes
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |", "|" + "---:|" * len(self.columns)]
        out += ["| " + " | ".join(r) + " |" for r in self.cells()]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes, "data": self.data}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


# ---- a zero-cost UNet, without Ray ------------------------------------------------------------
class ZeroExecutor(Executor):
    """Answers every work unit with zeros, in this process: the driver's own cost, without UNet or transport."""

    def start(self, context: RenderContext) -> None:
        super().start(context)

    def _run_units(self, timestep, units, patches, crops, deliver):
        for k, u in enumerate(units):
            deliver([k], [torch.zeros((len(u.rows),) + tuple(patches[u.rows[0][0]].shape))])

    def _decode(self, tiles, norm_stats):
        return [torch.zeros(3, t.shape[1] * 8, t.shape[2] * 8) for t in tiles]

    def _norm_stats(self, latent, max_side):
        return {}


# ---- a Ray worker whose UNet call sleeps -------------------------------------------------------
class SimulatedWorker(UNetWorker):
    """Answers every UNet row with zeros after `seconds_per_row`; builds no model.

    The sleeps run to deadlines, so a call of n rows takes n x the set time, without the
    oversleep of n separate sleeps. `extra_delay_s` keeps each call in flight a while longer
    (fault-injection tests).
    """

    def __init__(self, spec, cpu_threads=None, seconds_per_row: float = 0.0, extra_delay_s: float = 0.0):
        self.seconds_per_row = seconds_per_row
        self.extra_delay_s = extra_delay_s
        self._deadline = 0.0
        super().__init__(spec, cpu_threads)

    def load(self, spec, cpu_threads):
        return None

    def predict(self, timestep, units, *sources, context=0):
        self._deadline = time.perf_counter()
        outs, busy = super().predict(timestep, units, *sources, context=context)
        if self.extra_delay_s:
            time.sleep(self.extra_delay_s)
        return outs, busy

    def predict_unit(self, timestep, x, rows, crops):
        self._deadline += self.seconds_per_row * len(rows)
        time.sleep(max(0.0, self._deadline - time.perf_counter()))
        return np.zeros((len(rows),) + x.shape[1:], dtype=x.dtype)

    def decode(self, tiles, norm_stats):
        return [np.zeros((3, t.shape[1] * 8, t.shape[2] * 8), np.float32) for t in tiles], 0.0

    def group_norm_stats(self, latents, max_side):
        return [{}], 0.0


def simulated_executor(num_workers: int, seconds_per_patch: float, **kwargs):
    """A RayExecutor over SimulatedWorkers: a patch (both guidance rows) takes `seconds_per_patch`; no GPUs."""
    from apt_dist.ray_executor import RayExecutor

    kwargs.setdefault("gpus_per_worker", 0)
    return RayExecutor(num_workers=num_workers, worker_class=SimulatedWorker,
                       worker_kwargs={"seconds_per_row": seconds_per_patch / 2}, **kwargs)


def sampling_seconds(result) -> float:
    """Wall time of the sampling phases: no model set-up, no actor start-up, no decode."""
    return sum(p.seconds for p in result.phases)


def _render(config: RenderConfig, executor):
    from apt_dist.sampler import render

    return render(config, executor=executor, progress=False)


def _ray_init(num_cpus: int) -> bool:
    """Start a local Ray instance with `num_cpus` logical CPUs unless one is running; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _ray_shutdown(started: bool) -> None:
    import ray

    if started:
        ray.shutdown()


# ---- 1. phases ---------------------------------------------------------------------------------
def bench_phases(config: RenderConfig, warmup: bool = True) -> Table:
    """Render in-process (after a warm-up render: first UNet calls per shape are slow on CPU); time each phase."""
    from apt_dist.executor import InProcessExecutor

    ex = InProcessExecutor()
    if warmup:
        _render(config, ex)
    r = _render(config, ex)
    t = Table(
        f"bench phases: {config.model} {config.width}x{config.height}, {config.method}, {config.steps} steps, in-process "
        f"({torch.get_num_threads()} torch threads)",
        ["phase", "size", "steps", "wall s", "patch evals", "UNet s", "ms/patch", "driver share"],
    )
    for p in r.phases:
        t.rows.append([p.index, f"{p.width}x{p.height}", p.steps, p.seconds, p.patch_evals, p.executor_seconds,
                       1000 * p.seconds / max(1, p.patch_evals), _pct(p.driver_share)])
    sampling = sampling_seconds(r)
    unet = sum(p.executor_seconds for p in r.phases)
    t.rows.append(["decode", f"{config.width}x{config.height}", None, r.decode_seconds, None, None, None, None])
    t.rows.append(["setup", None, None, r.seconds - sampling - r.decode_seconds, None, None, None, None])
    t.rows.append(["total", None, sum(p.steps for p in r.phases), r.seconds, r.patch_evals, unet, None,
                   _pct(max(0.0, 1 - unet / sampling)) + " of sampling"])
    t.notes.append("driver share: the phase's wall time outside UNet calls (cutting windows, stepping, fusing); "
                   "setup: model lookup and prompt encoding of the measured render")
    t.data = {"phases": [dataclasses.asdict(p) | {"driver_share": p.driver_share} for p in r.phases],
              "decode_seconds": r.decode_seconds, "seconds": r.seconds, "sampling_seconds": sampling,
              "patch_evals": r.patch_evals, "warmup": warmup}
    return t


# ---- 2. overhead -------------------------------------------------------------------------------
def bench_overhead(config: RenderConfig, workers: int = 2, repeats: int = 3) -> Table:
    """ms per patch evaluation of driver + transport with a zero-cost UNet: Ray actors against in-process zeros.

    Each executor renders once to warm up, then `repeats` times, the two interleaved; the median counts.
    """
    started = _ray_init(workers + 2)
    try:
        zero = ZeroExecutor()
        ray_ex = simulated_executor(workers, 0.0)
        runs = {"zero": [], "ray": []}
        try:
            for i in range(repeats + 1):  # run 0 is the warm-up
                for name, ex in (("zero", zero), ("ray", ray_ex)):
                    r = _render(config, ex)
                    if i > 0:
                        runs[name].append((sampling_seconds(r), r.patch_evals, sum(p.executor_seconds for p in r.phases)))
        finally:
            ray_ex.close()
    finally:
        _ray_shutdown(started)

    evals = runs["zero"][0][1]
    zero_s = statistics.median(s for s, _, _ in runs["zero"])
    ray_s = statistics.median(s for s, _, _ in runs["ray"])
    zero_ms, ray_ms = 1000 * zero_s / evals, 1000 * ray_s / evals
    t = Table(
        f"bench overhead: {config.model} {config.width}x{config.height}, {config.method}, {config.steps} steps, "
        f"zero-cost UNet, median of {repeats}",
        ["executor", "workers", "patch evals", "seconds", "ms/patch (driver+transport)", "ms/patch (driver only)",
         "transport share"],
    )
    t.rows.append(["in-process zeros", None, evals, zero_s, zero_ms, zero_ms, _pct(0.0)])
    t.rows.append(["Ray, simulated 0 s", workers, evals, ray_s, ray_ms, zero_ms, _pct(max(0.0, 1 - zero_ms / ray_ms))])
    t.notes.append("seconds: sampling phases only (no Ray or actor start-up, no decode); target <= 1 ms per patch")
    t.data = {"runs": runs, "ms_per_patch": {"zero": zero_ms, "ray": ray_ms}, "workers": workers, "repeats": repeats}
    return t


# ---- 3. scaling --------------------------------------------------------------------------------
def bench_scaling(config: RenderConfig, workers: list[int], seconds_per_patch: float = 0.035) -> Table:
    """Simulated workers (a UNet call sleeps seconds_per_patch per patch) against the ideal and the barrier bound.

    A zero-cost in-process render first (warm-up for the driver's tensor ops; its time is the driver's own
    share of every run, which the barrier bound leaves out), then one RayExecutor per worker count on one
    Ray instance.
    """
    from apt_dist.planning import plan

    p = plan(config)
    whole = plan(dataclasses.replace(config, split_guidance=False))
    zero = ZeroExecutor()
    _render(config, zero)  # warm-up
    driver_s = sampling_seconds(_render(config, zero))
    started = _ray_init(max(workers) + 2)
    t = Table(
        f"bench scaling: {config.model} {config.width}x{config.height}, {config.method}, {p.unet_patch_evals} patch evals, "
        f"{p.unet_calls} UNet calls, simulated {1000 * seconds_per_patch:g} ms/patch",
        ["workers", "wall s", "ideal s", "eff vs ideal", "barrier s", "bound eff", "wall vs bound",
         "in calls s", "calls vs bound", "driver s", "bound eff (whole patches)", "worker busy"],
    )
    runs = []
    try:
        for n in workers:
            ex = simulated_executor(n, seconds_per_patch, cpus_per_worker=1)
            try:
                r = _render(config, ex)
                summary = ex.summary()
            finally:
                ex.close()
            wall = sampling_seconds(r)
            in_calls = sum(x.executor_seconds for x in r.phases)
            bound, bound_whole = p.timing(n, seconds_per_patch), whole.timing(n, seconds_per_patch)
            busy = sum(w["busy_s"] for w in summary["workers"])
            t.rows.append([n, wall, bound["ideal_s"], _pct(bound["ideal_s"] / wall), bound["barrier_s"],
                           _pct(bound["bound_efficiency"]), _pct(bound["barrier_s"] / wall), in_calls,
                           _pct(bound["barrier_s"] / in_calls), wall - in_calls, _pct(bound_whole["bound_efficiency"]),
                           _pct(busy / (n * wall))])
            runs.append({"workers": n, "wall_s": wall, "in_calls_s": in_calls, "phases": [dataclasses.asdict(x) for x in r.phases],
                         "bound": bound, "bound_whole_patches": bound_whole, "worker_busy_s": busy,
                         "workers_summary": summary["workers"]})
    finally:
        _ray_shutdown(started)
    t.notes.append("wall s: sampling phases; eff vs ideal = ideal / wall; wall vs bound = barrier bound / wall")
    t.notes.append("in calls s: wall time inside executor.predict (dispatch, Ray transport, simulated UNet); "
                   "calls vs bound = barrier bound / in calls; driver s = wall - in calls: the driver's own work (cutting, guiding, "
                   "stepping, fusing), the guiding and stepping done while other workers still compute")
    t.notes.append(f"the same driver alone, in-process with a zero-cost UNet: {driver_s:.2f} s; "
                   "whole patches: the bound with split_guidance=False (not run); "
                   "worker busy: summed worker busy time / (workers x wall)")
    t.data = {"runs": runs, "driver_only_s": driver_s, "seconds_per_patch": seconds_per_patch, "plan": p.to_dict()}
    return t


# ---- 4. workers ----------------------------------------------------------------------------------
def bench_workers(config: RenderConfig, workers: list[int]) -> Table:
    """Real compute, per core: in-process on 1 torch thread against RayExecutor with 1-CPU workers.

    Each executor renders once to warm up (first UNet calls per shape are slow), then once measured.
    """
    from apt_dist.executor import InProcessExecutor
    from apt_dist.ray_executor import RayExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ex = InProcessExecutor()
        _render(config, ex)
        ref = _render(config, ex)
    finally:
        torch.set_num_threads(threads)
    base = sampling_seconds(ref)
    t = Table(
        f"bench workers: {config.model} {config.width}x{config.height}, {config.method}, {config.steps} steps, "
        f"real UNet on CPU, 1 thread per worker",
        ["executor", "workers", "wall s", "patch evals", "patch evals/s", "speed-up", "bit-identical"],
    )
    t.rows.append(["in-process", None, base, ref.patch_evals, ref.patch_evals / base, 1.0, None])
    runs = [{"executor": "in-process", "wall_s": base}]
    started = _ray_init(max(workers) + 2)
    try:
        for n in workers:
            ex = RayExecutor(num_workers=n, cpus_per_worker=1)
            try:
                _render(config, ex)
                r = _render(config, ex)
            finally:
                ex.close()
            wall = sampling_seconds(r)
            same = torch.equal(r.latent, ref.latent) and r.image.tobytes() == ref.image.tobytes()
            t.rows.append(["Ray", n, wall, r.patch_evals, r.patch_evals / wall, base / wall, same])
            runs.append({"executor": "ray", "workers": n, "wall_s": wall, "bit_identical": same})
    finally:
        _ray_shutdown(started)
    t.notes.append("wall s: sampling phases only; speed-up vs in-process on one torch thread; "
                   "bit-identical: latent and image equal to the in-process render")
    t.data = {"runs": runs, "nproc": os.cpu_count()}
    return t


# ---- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from apt_dist.cli import HelpFormatter, Parser, add_config_options

    def options(config: dict) -> str:
        def one(name: str, value) -> str:
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):  # a --flag / --no-flag option
                return flag if value else "--no-" + flag[2:]
            return f"{flag} {value}"

        return " ".join(one(name, value) for name, value in config.items()) or "none"

    own = "; ".join(f"{what}: {options(config)}" for what, config in DEFAULT_CONFIGS.items())
    b = Parser(prog="python benchmarks/bench.py", description="apt-dist benchmarks; each prints a table",
               epilog=f"Each benchmark's own defaults come before the render defaults shown above ({own}).",
               formatter_class=HelpFormatter)
    b.add_argument("what", choices=BENCHMARKS,
                   help="phases: per-phase time, patch evaluations and driver share (in-process); "
                        "overhead: driver + Ray transport ms per patch with a zero-cost UNet; "
                        "scaling: simulated workers against the ideal and the per-step barrier bound; "
                        "workers: in-process against CPU Ray workers, per core")
    add_config_options(b)
    add_arguments(b)
    return b


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/bench.py <what> [options]`: bad options exit 2 with one line, as apt-dist's own."""
    ns = build_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(RenderConfig)}
    command = "python benchmarks/bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if ns.driver_threads is not None:
            if ns.driver_threads < 1:
                raise ConfigError("--driver-threads", f"must be an integer >= 1, got {ns.driver_threads}")
            torch.set_num_threads(ns.driver_threads)
        return run(ns.what, {k: v for k, v in vars(ns).items() if k in names}, ns, command)
    except ConfigError as e:
        print(f"bench.py {ns.what}: error: {e}", file=sys.stderr)
        return 2


def add_arguments(b) -> None:
    """The benchmarks' own options (RenderConfig options are added as for apt-dist)."""
    b.add_argument("--json", dest="json_path", metavar="PATH", default=None, help="also write the numbers as JSON")
    b.add_argument("--markdown", metavar="PATH", default=None, help="also write the table as Markdown")
    b.add_argument("--workers", default=None,
                   help="worker counts, comma-separated (overhead: 2; scaling: 1,2,4,8,16; workers: 1,2)")
    b.add_argument("--seconds-per-patch", type=float, default=0.035,
                   help="scaling: simulated UNet seconds per patch with guidance (H100 SDXL: ~0.035)")
    b.add_argument("--repeats", type=int, default=3, help="overhead: measured renders per executor (median)")
    b.add_argument("--no-warmup", action="store_true", help="phases: skip the warm-up render")
    b.add_argument("--driver-threads", type=int, default=None,
                   help="torch threads of the driver process (default: torch's own); on a box where the driver shares "
                        "its cores with the workers, 1 leaves them a core")


def config_for(what: str, overrides: dict) -> RenderConfig:
    """The benchmark's default config, with the options given on the command line on top."""
    return RenderConfig(**(DEFAULT_CONFIGS[what] | overrides)).validate()


def parse_workers(text: str | None, what: str) -> list[int]:
    if text is None:
        return list(DEFAULT_WORKERS.get(what, [1]))
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError("--workers", f"expected positive integers separated by commas, got {text!r}")
    return counts


def run(what: str, overrides: dict, ns, command: str | None = None) -> int:
    """Run benchmark `what`, print its table, write --json / --markdown."""
    config = config_for(what, overrides)
    counts = parse_workers(getattr(ns, "workers", None), what)
    if what == "phases":
        table = bench_phases(config, warmup=not ns.no_warmup)
    elif what == "overhead":
        table = bench_overhead(config, workers=counts[0], repeats=max(1, ns.repeats))
    elif what == "scaling":
        table = bench_scaling(config, counts, ns.seconds_per_patch)
    else:
        table = bench_workers(config, counts)
    info = machine()
    print(table.text())
    if ns.json_path:
        doc = table.to_dict() | {"benchmark": what, "command": command, "machine": info, "config": config.to_dict()}
        text = json.dumps(doc, indent=2, default=str)
        write_atomic(ns.json_path, lambda f: f.write(text.encode()))
    if ns.markdown:
        write_markdown(ns.markdown, table, command or f"python benchmarks/bench.py {what}", info)
    return 0


def emit(table: Table, markdown: str | None) -> None:
    """A benchmark script's end: print its table; with `markdown`, also write it, headed by the script's command."""
    print(table.text())
    if markdown:
        write_markdown(markdown, table, "python " + " ".join(sys.argv))


def write_markdown(path: str, table: Table, command: str, info: dict | None = None) -> None:
    """A results file: the command that made it, the machine, then the table."""
    info = info or machine()
    machine_line = (f"{info['date']}; nproc {info['nproc']}, {info['cpu']}; torch {info['torch']} "
                    f"({info['torch_threads']} threads), Python {info['python']}")
    head = [f"`{command}`", "", machine_line, ""]
    text = "\n".join(head) + "\n" + table.markdown()
    write_atomic(path, lambda f: f.write(text.encode()))  # a run stopped mid-write leaves the file as it was


if __name__ == "__main__":
    sys.exit(main())
