"""The driver on its own node against the driver on the workers' node: overhead and scaling, side by side.

The shipped cluster config drives from a head node that holds no workers, so every worker is
on another node. This starts a `ray.cluster_utils.Cluster` on this machine, a head node (the
driver's) and `--nodes` worker nodes, and runs the simulated 4096x4096 APT render both ways on
the same cluster, alternating which goes first each round:

  same node, shm + socket  every worker on the driver's node (what the earlier numbers measured), patches
                           and predictions through the driver's /dev/shm file, calls over Unix sockets
  same node, Ray           the same actors, every call a plain Ray call with Ray objects
  other nodes              every worker on a worker node (SPREAD over them), none on the driver's: plain
                           Ray calls and objects (the shared memory and the sockets cannot reach them);
                           the step's latents go once per step and node, each call carries cuts
  other nodes, patches per call   the same actors, each call carrying its own patches (the transport before)

Workers are pinned by a custom resource per node (`RayExecutor(worker_resources=...)`). The
head also has CPU slots, for the same-node workers; in the other-nodes runs it holds none.

  overhead  a zero-cost UNet: the driver's and the transport's ms per patch evaluation
            (and the driver alone, in-process with zeros: what no transport costs)
  scaling   each UNet call sleeps `--seconds-per-patch` per patch (0.048 s: SDXL float16 on an
            H200 at 8 patches per call), against the per-step barrier bound

    python benchmarks/topology.py --workers 8,16 --rounds 3 --markdown benchmarks/results/topology.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import ray
from bench import SimulatedWorker, Table, ZeroExecutor, _pct, emit, machine, sampling_seconds

from apt_dist.config import RenderConfig
from apt_dist.outputs import write_atomic
from apt_dist.planning import plan
from apt_dist.ray_executor import RayExecutor
from apt_dist.sampler import render

# mode: (the actors' node resource, placement strategy, shared_memory, direct_calls, latents once per step)
TOPOLOGIES = {
    "same node, shm + socket": ("driver_node", "PACK", True, True, True),
    "same node, Ray": ("driver_node", "PACK", False, False, True),
    "other nodes": ("worker_node", "SPREAD", True, True, True),
    "other nodes, patches per call": ("worker_node", "SPREAD", True, True, False),
}
IN_PROCESS = "in-process, zero-cost (the driver alone)"


def start_cluster(workers: int, nodes: int):
    from ray.cluster_utils import Cluster

    per_node = math.ceil(workers / nodes)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": workers, "resources": {"driver_node": workers},
                                                            "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=per_node, resources={"worker_node": per_node})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


class PerCallExecutor(RayExecutor):
    """The transport before the step's latents went once per step: every Ray call carries its own patches."""

    once_per_step = True

    def _staging(self, units, patches):
        staging = super()._staging(units, patches)
        if not self.once_per_step:
            staging.cuts = None
        return staging


def executor(resource: str, strategy: str, n: int, seconds_per_patch: float):
    return PerCallExecutor(num_workers=n, worker_class=SimulatedWorker, gpus_per_worker=0,
                           worker_kwargs={"seconds_per_row": seconds_per_patch / 2},
                           worker_resources={resource: 1}, placement_strategy=strategy)


def where(ex) -> dict:
    """How the workers were reached: nodes, data plane and call path, as the executor's summary says."""
    here = ray.get_runtime_context().get_node_id()[:8]
    ws = ex.summary()["workers"]
    return {"on_driver_node": sum(w["node"] == here for w in ws), "nodes": len({w["node"] for w in ws}),
            "transport": sorted({w["transport"] for w in ws}), "calls via": sorted({w["calls_via"] for w in ws})}


def alternate(cfg: RenderConfig, n: int, seconds_per_patch: float, rounds: int) -> dict:
    """One executor per node kind kept up (the same-node modes share their actors); each round renders every
    mode once, the order rotated each round."""
    exs = {key[:2]: executor(*key[:2], n, seconds_per_patch) for key in TOPOLOGIES.values()}
    modes = list(TOPOLOGIES) + ([IN_PROCESS] if seconds_per_patch == 0 else [])
    runs: dict = {t: [] for t in modes}
    info = {IN_PROCESS: {"on_driver_node": 0, "nodes": 0, "transport": ["none"], "calls via": ["none"]}}
    zero = ZeroExecutor()

    def once(t: str):
        if t == IN_PROCESS:
            return render(cfg, executor=zero, progress=False)
        resource, strategy, shm, direct, once = TOPOLOGIES[t]
        ex = exs[resource, strategy]
        ex.shared_memory, ex.direct_calls, ex.once_per_step = shm, direct, once
        res = render(cfg, executor=ex, progress=False)
        info[t] = where(ex)
        return res

    try:
        for t in modes:  # warm-up render (actor start, first calls), not counted
            once(t)
        for r in range(rounds):
            for t in modes[r % len(modes):] + modes[:r % len(modes)]:
                res = once(t)
                runs[t].append({"wall_s": sampling_seconds(res), "patch_evals": res.patch_evals})
                print(f"  {n} workers, {t}: {runs[t][-1]['wall_s']:.3f} s", flush=True)
    finally:
        for ex in exs.values():
            ex.close()
    return {"runs": runs, "where": info}


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="8,16", help="worker counts for scaling, comma-separated")
    ap.add_argument("--overhead-workers", type=int, default=2, help="workers of the zero-cost runs (0: skip them)")
    ap.add_argument("--nodes", type=int, default=2, help="worker nodes besides the driver's")
    ap.add_argument("--rounds", type=int, default=3, help="measured renders per topology and worker count")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--view-batch-size", type=int, default=8, help="patches per UNet call")
    ap.add_argument("--split-guidance", action="store_true", help="guidance halves as separate calls")
    ap.add_argument("--seconds-per-patch", type=float, default=0.048,
                    help="simulated UNet seconds per patch with both guidance branches (H200, 8 per call: 0.048)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    cfg = RenderConfig(model="sdxl-random", width=4096, height=4096, steps=args.steps, dtype="float16",
                       view_batch_size=args.view_batch_size, split_guidance=args.split_guidance).validate()
    p = plan(cfg)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = start_cluster(max(counts + [args.overhead_workers]), args.nodes)
    results: dict = {}
    try:
        if args.overhead_workers:
            results["overhead"] = alternate(cfg, args.overhead_workers, 0.0, args.rounds)
        for n in counts:
            results[n] = alternate(cfg, n, args.seconds_per_patch, args.rounds)
    finally:
        ray.shutdown()
        cluster.shutdown()

    unit = f"{args.view_batch_size} patch(es) per call" + (", guidance halves split" if args.split_guidance else
                                                           ", both guidance branches")
    table = Table(
        f"Topology: sdxl-random 4096x4096 APT float16, {args.steps} steps, {p.unet_patch_evals} patch evals, "
        f"{p.unet_calls} UNet calls ({unit}); {args.nodes} worker node(s); {args.rounds} rounds, alternating",
        ["run", "workers", "topology", "median s", "min-max s", "ms/patch (median)", "barrier s", "vs bound (median)",
         "vs bound (best)", "worker nodes (on driver's)", "transport", "calls via"],
    )
    for key, res in results.items():
        n = args.overhead_workers if key == "overhead" else key
        for t in res["runs"]:
            walls = [r["wall_s"] for r in res["runs"][t]]
            med = statistics.median(walls)
            w = res["where"][t]
            nodes = f"{w['nodes']} ({w['on_driver_node']})"
            if key == "overhead":
                table.rows.append(["overhead", n, t, med, spread(walls), 1000 * med / p.unet_patch_evals, None, None, None,
                                   nodes, "/".join(w["transport"]), "/".join(w["calls via"])])
            else:
                bound = p.timing(n, args.seconds_per_patch)["barrier_s"]
                table.rows.append(["scaling", n, t, med, spread(walls), None, bound, _pct(bound / med),
                                   _pct(bound / min(walls)), nodes, "/".join(w["transport"]), "/".join(w["calls via"])])
    table.notes.append("seconds: sampling phases only; overhead: a zero-cost UNet, ms per patch evaluation of driver + "
                       "transport; scaling: each call sleeps its patches x seconds-per-patch; vs bound = barrier bound / wall")
    table.notes.append("same node: every worker on the driver's node; other nodes: none there (SPREAD over the worker nodes)")
    table.data = {"results": {str(k): v for k, v in results.items()}, "plan": p.to_dict()}
    if args.json:
        doc = table.to_dict() | {"command": "python " + " ".join(sys.argv), "machine": machine()}
        text = json.dumps(doc, indent=2, default=str)
        write_atomic(args.json, lambda f: f.write(text.encode()))
    emit(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
