"""Render one poster on a Ray cluster: one UNet replica per GPU, the driver on the head node.

On a cluster started with `ray up cluster/aws-gpu.yaml`:

    ray submit cluster/aws-gpu.yaml examples/poster.py -- \
        --prompt "'a lighthouse at dusk, oil painting'" --width 8192 --height 8192 --workers 16

The PNG is written where this script runs (the head node); fetch it with
`ray rsync-down cluster/aws-gpu.yaml /home/ubuntu/poster.png .`.

On this machine, with a local Ray instance and the built-in tiny model:

    python examples/poster.py --address local --model tiny --workers 2 --width 384 --height 256 --steps 8
"""

import argparse
import socket
import time
from pathlib import Path

import torch

from apt_dist import RenderConfig, render
from apt_dist.outputs import check_output_path, write_result
from apt_dist.ray_executor import RayExecutor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="a lighthouse on a cliff at dusk, highly detailed oil painting")
    p.add_argument("--width", type=int, default=4096, help="pixels, a multiple of 8")
    p.add_argument("--height", type=int, default=4096, help="pixels, a multiple of 8")
    p.add_argument("--workers", type=int, default=8, help="Ray workers, one UNet replica (one GPU) each")
    p.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0",
                   help="hub id | diffusers folder | .safetensors file | sdxl-random | tiny")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="poster.png", help="output PNG, on the machine this script runs on")
    p.add_argument("--address", default="auto",
                   help="auto (join the cluster this node belongs to) | HOST:PORT | local (start a local Ray instance)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="default: 1 when joining a cluster (0 for a CPU-only cluster); local: 1 if this machine has GPUs, else 0")
    p.add_argument("--placement-timeout", type=float, default=900.0,
                   help="seconds to wait for the workers; leave time for the autoscaler to boot GPU nodes")
    p.add_argument("--driver-threads", type=int, default=None,
                   help="torch threads of this script (the driver). Default: torch's own, which is 1 under `ray submit` "
                        "(the launcher sets OMP_NUM_THREADS=1); 4 is faster on a many-core head node (README)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = RenderConfig(prompt=args.prompt, width=args.width, height=args.height, model=args.model,
                          steps=args.steps, seed=args.seed).validate()
    out = Path(args.out).expanduser()
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)  # on a fresh head node (`ray submit`) it may not exist yet
    problem = check_output_path(out)
    if problem:
        raise SystemExit(f"--out: {problem}")
    if args.driver_threads is not None:
        if args.driver_threads < 1:
            raise SystemExit(f"--driver-threads: must be an integer >= 1, got {args.driver_threads}")
        torch.set_num_threads(args.driver_threads)

    local = args.address == "local"
    gpus = args.gpus_per_worker
    if gpus is None and not local:
        gpus = 1.0  # on a cluster, ask for GPUs even before the autoscaler has started any GPU node
    executor = RayExecutor(
        num_workers=args.workers,
        address="local" if local else args.address,  # "local": a fresh Ray instance, even where RAY_ADDRESS is set
        gpus_per_worker=gpus,
        placement_timeout_s=args.placement_timeout,
    )

    t0 = time.perf_counter()
    with executor:  # closes the workers (and a local Ray instance) at the end
        result = render(config, executor=executor, progress=False)
    paths = write_result(result, out)

    print(f"{config.width}x{config.height} in {time.perf_counter() - t0:.1f} s "
          f"({len(result.phases)} phases, {result.patch_evals} UNet patch evaluations) -> {paths[0]}")
    for phase in result.phases:
        print(f"  phase {phase.index}: {phase.width}x{phase.height}, {phase.steps} steps, {phase.seconds:.1f} s")
    summary = result.executor_summary
    for event in summary.get("events", []):
        print(f"  event: {event}")
    print(f"  {'worker':>6} {'node':>8} {'patches':>8} {'calls':>6} {'busy s':>8} {'idle s':>8}  state")
    for w in summary.get("workers", []):
        print(f"  {w['worker']:>6} {w['node']:>8} {w['patches']:>8} {w['calls']:>6} "
              f"{w['busy_s']:>8.2f} {w['idle_s']:>8.2f}  {w['state']}")
    # Last, so that it is the line to look for under `ray submit`: the path is on the machine this script ran on.
    print(f"wrote {paths[0].resolve()} on {socket.gethostname()}")


if __name__ == "__main__":
    main()
