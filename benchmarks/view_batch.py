"""Seconds per patch evaluation against --view-batch-size (patches per UNet call), in-process on one GPU.

A small UNet call does not fill a GPU (kernel launches bound it), so batching patches buys speed;
bigger units also coarsen the work that Ray workers share (see `apt-dist plan --workers N`).

    python benchmarks/view_batch.py [OUT_DIR] [--sizes 1,2,4,8] [--steps 20] [--size 2048]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from apt_dist import RenderConfig, render
from apt_dist.executor import InProcessExecutor
from apt_dist.models import Denoiser, ModelSpec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="benchmarks/results")
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--model", default="sdxl-random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ex = InProcessExecutor(Denoiser(ModelSpec(a.model, a.dtype, a.device)))
    base = dict(prompt="a lighthouse", width=a.size, height=a.size, steps=a.steps, model=a.model, dtype=a.dtype, device=a.device)
    render(RenderConfig(**base | {"steps": 2, "width": a.size // 2, "height": a.size // 2}), executor=ex, progress=False)
    rows = []
    for vbs in (int(v) for v in a.sizes.split(",")):
        t0 = time.perf_counter()
        r = render(RenderConfig(**base | {"view_batch_size": vbs}), executor=ex, progress=False)
        sampling = sum(p.seconds for p in r.phases)
        rows.append({"view_batch_size": vbs, "patch_evals": r.patch_evals, "sampling_s": round(sampling, 2),
                     "s_per_patch": round(sampling / r.patch_evals, 4), "wall_s": round(time.perf_counter() - t0, 2)})
        print(json.dumps(rows[-1]), flush=True)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    (out / "view_batch.json").write_text(json.dumps({"device": dev, "rows": rows}, indent=2))
    lines = [f"# Patches per UNet call: {dev}, {a.model} {a.dtype} {a.size}x{a.size} apt, {a.steps} steps, in-process", "",
             f"command: `python benchmarks/view_batch.py {' '.join(sys.argv[1:])}`", "",
             "| view batch size | patch evals | sampling s | s / patch | speed vs 1 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['view_batch_size']} | {r['patch_evals']} | {r['sampling_s']} | {r['s_per_patch']} | "
                     f"{rows[0]['s_per_patch'] / r['s_per_patch']:.2f}x |")
    (out / "view_batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
