"""Equal work on one device: apt-dist's defaults against a bare loop of the same UNet calls.

For each method (apt, demofusion), in one run, alternating round by round:
  (a) bare:       the render's patch evaluations as UNet calls at the reference batching (DemoFusion's
                  pipeline: 16 views a call, both guidance branches in it), on ready-made inputs: no
                  sampler, no fusion, no scheduler, only the calls;
  (b) in-process: apt-dist's render at its defaults (auto units), sampling phases only;
  (c) Ray:        the same on one Ray worker with as many threads.
The table gives the medians and the ratios (b)/(a) and (c)/(a): what the sampler, the unit size and
the executor cost over the UNet arithmetic itself. The target on CPU: (b)/(a) <= 1.10.

    python benchmarks/equal_work.py [--rounds 3] [--threads N] [--no-ray] [--markdown benchmarks/results/equal_work.md] [render options]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
from bench import Table, emit, machine, sampling_seconds

from apt_dist import cli
from apt_dist.config import RenderConfig
from apt_dist.executor import InProcessExecutor, make_units
from apt_dist.loading import model_source
from apt_dist.models import Denoiser, encode_prompt, model_info
from apt_dist.planning import build_plan
from apt_dist.sampler import render

REFERENCE_VIEWS = 16  # DemoFusion's view_batch_size, both guidance branches in one call


def bare_calls(config: RenderConfig, info):
    """Per step of the plan, (timestep, unit shapes): the render's patches cut at the reference batching."""
    plan = build_plan(dataclasses.replace(config, view_batch_size=REFERENCE_VIEWS, split_guidance=False),
                      info.native_window, info.vae_scale, info.scheduler, info.latent_channels)
    n = plan.native_window
    steps = []
    for ph in plan.phases:
        h, w = ph.latent_height, ph.latent_width
        if ph.index == 1:
            shapes = [(info.latent_channels, h, w)]
        else:
            from apt_dist.planning import dilated_shapes

            local = [(info.latent_channels, min(n, h), min(n, w))] * ph.local_windows
            shapes = local + [(info.latent_channels, a, b) for a, b in dilated_shapes((h, w), ph.dilation)]
        units = make_units(shapes, REFERENCE_VIEWS, False)
        steps += [[(len(u.rows), shapes[u.rows[0][0]]) for u in units]] * ph.steps
    return plan, steps


def run_bare(denoiser: Denoiser, steps, embeds, original_size) -> tuple[float, float]:
    """(wall s, this thread's CPU s) of the bare loop."""
    inputs = {}
    t0, c0 = time.perf_counter(), time.thread_time()
    for unit_rows in steps:
        for rows, shape in unit_rows:
            x = inputs.get((rows, shape))
            if x is None:
                x = inputs[(rows, shape)] = torch.randn((rows,) + shape, generator=torch.Generator().manual_seed(rows))
            denoiser.predict(x, 500, [(0, 0)] * rows, [r % 2 for r in range(rows)], embeds, original_size)
    return time.perf_counter() - t0, time.thread_time() - c0


class SamplingCPU:
    """This thread's CPU seconds in the sampling phases of each render (the sampler's run, no set-up or decode).

    With one torch thread every UNet call runs on the calling thread, so on a shared machine this counts the
    work done, not the time spent waiting for a core."""

    def __init__(self):
        from apt_dist import sampler

        self.last = 0.0
        run = sampler._Sampler.run

        def timed(sampler_self):
            c0 = time.thread_time()
            try:
                return run(sampler_self)
            finally:
                self.last = time.thread_time() - c0

        sampler._Sampler.run = timed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="apt,demofusion")
    ap.add_argument("--no-ray", action="store_true", help="skip (c), one Ray worker")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads here and on the Ray worker (default: torch's own; on a shared CPU 1 is steadier)")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None)
    cli.add_config_options(ap)
    ns = ap.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    overrides = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(RenderConfig)}}
    base = RenderConfig(**({"width": 384, "height": 384, "steps": 10} | overrides)).validate()
    spec = model_source(base)
    info = model_info(spec)
    denoiser = Denoiser(spec)
    threads = torch.get_num_threads()
    ray_ex = None
    if not ns.no_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from apt_dist.ray_executor import RayExecutor

        # One worker with this process's thread count, on a GPU if this process has one.
        ray_ex = RayExecutor(num_workers=1, cpus_per_worker=threads, gpus_per_worker=1 if denoiser.device.type == "cuda" else 0,
                             ray_init_kwargs={"num_cpus": threads, "num_gpus": 1 if denoiser.device.type == "cuda" else 0})
    methods = ns.methods.split(",")
    cpu_clock = SamplingCPU()
    one_thread = torch.get_num_threads() == 1 and denoiser.device.type == "cpu"
    times = {m: {"bare": [], "in-process": [], "ray": [], "bare cpu": [], "in-process cpu": []} for m in methods}
    units = {}
    try:
        for m in methods:  # warm-up: allocator, kernels, Ray start-up and the worker's model
            cfg = dataclasses.replace(base, method=m, steps=2)
            render(cfg, executor=InProcessExecutor(denoiser), progress=False)
            if ray_ex:
                render(cfg, executor=ray_ex, progress=False)
        for r in range(ns.rounds):
            for m in methods:
                cfg = dataclasses.replace(base, method=m)
                embeds = encode_prompt(spec, cfg.prompt, cfg.negative_prompt, cfg.seed)
                plan, steps = bare_calls(cfg, info)
                wall, cpu = run_bare(denoiser, steps, embeds, (cfg.height, cfg.width))
                times[m]["bare"].append(wall)
                times[m]["bare cpu"].append(cpu)
                res = render(cfg, executor=InProcessExecutor(denoiser), progress=False)
                times[m]["in-process cpu"].append(cpu_clock.last)
                units[m] = res.plan.units.describe()
                assert res.patch_evals == plan.unet_patch_evals  # equal work
                times[m]["in-process"].append(sampling_seconds(res))
                if ray_ex:
                    times[m]["ray"].append(sampling_seconds(render(cfg, executor=ray_ex, progress=False)))
                print(f"round {r + 1} {m}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times[m].items() if v), flush=True)
    finally:
        if ray_ex:
            ray_ex.close()
    dev = torch.cuda.get_device_name() if denoiser.device.type == "cuda" else f"CPU, {threads} threads"
    table = Table(f"Equal work, {base.model} {base.width}x{base.height} {base.steps} steps, {dev}: medians of {ns.rounds} "
                  "alternating rounds",
                  ["method", "patch evals", "(a) bare s", "(b) in-process s", "(c) 1 Ray worker s", "(b)/(a)", "(c)/(a)",
                   "(a) CPU s", "(b) CPU s", "(b)/(a) CPU"])
    for m in methods:
        t = {k: statistics.median(v) if v else None for k, v in times[m].items()}
        plan, _ = bare_calls(dataclasses.replace(base, method=m), info)
        table.rows.append([m, plan.unet_patch_evals, t["bare"], t["in-process"], t["ray"], t["in-process"] / t["bare"],
                           t["ray"] / t["bare"] if t["ray"] else None] +
                          ([t["bare cpu"], t["in-process cpu"], t["in-process cpu"] / t["bare cpu"]] if one_thread else [None] * 3))
    table.notes.append("ratios of the medians; CPU s: this thread's CPU time (one torch thread on a CPU only), which a "
                       "shared machine's other load does not inflate as it does the wall time")
    table.notes.append(f"(a): {REFERENCE_VIEWS} views a UNet call, both guidance branches in it, no sampler; "
                       f"(b), (c) at the defaults: {units[methods[0]]}")
    table.data = {"times": times, "machine": machine(), "units": units}
    emit(table, ns.markdown)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(table.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
