"""One short GPU check, for a session that is lent a GPU machine (see benchmarks/README.md).

sdxl-random (the real SDXL UNet and VAE, random weights) at 2048x2048 on one GPU:
  1. in-process, --method apt and --method demofusion: seconds per phase, seconds per patch
     evaluation (both guidance halves), peak GPU memory;
  2. one Ray worker on the same GPU, --method apt: seconds per patch and the Ray overhead share
     against (1), and the worker's peak GPU memory.
Writes gpu_check.json and gpu_check.md to the folder given (default benchmarks/results).

    python benchmarks/gpu_check.py [OUT_DIR] [--steps 50] [--size 2048]
    python benchmarks/gpu_check.py /tmp/dry --model tiny --device cpu --dtype float32 --size 384   # dry run, no GPU
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from apt_dist import RenderConfig, render
from apt_dist.executor import InProcessExecutor
from apt_dist.models import Denoiser, ModelSpec


def run(cfg, executor):
    t0 = time.perf_counter()
    r = render(cfg, executor=executor, progress=False)
    sampling = sum(p.seconds for p in r.phases)
    return {
        "method": cfg.method,
        "wall_s": round(time.perf_counter() - t0, 2),
        "sampling_s": round(sampling, 2),
        "decode_s": round(r.decode_seconds, 2),
        "patch_evals": r.patch_evals,
        "s_per_patch": round(sampling / r.patch_evals, 4),
        "phases": [{"phase": p.index, "size": f"{p.width}x{p.height}", "seconds": round(p.seconds, 2),
                    "patch_evals": p.patch_evals, "s_per_patch": round(p.seconds / p.patch_evals, 4)} for p in r.phases],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="benchmarks/results")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--model", default="sdxl-random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda needs a CUDA GPU (use --device cpu --model tiny for a dry run)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"gpu": torch.cuda.get_device_name() if cuda else a.device, "torch": torch.__version__, "runs": []}
    while True:
        base = dict(prompt="a lighthouse", width=a.size, height=a.size, steps=a.steps, model=a.model, dtype=a.dtype, device=a.device)
        warm = base | {"steps": 2, "width": a.size // 2, "height": a.size // 2}
        t0 = time.perf_counter()
        ex = InProcessExecutor(Denoiser(ModelSpec(a.model, a.dtype, a.device)))
        res["model_build_s"] = round(time.perf_counter() - t0, 1)
        try:
            run(RenderConfig(**warm), ex)  # warm-up: kernels, allocator
            break
        except Exception as e:  # random weights may overflow float16; bfloat16 has float32's range
            if a.dtype != "float16":
                raise
            print(f"float16 failed ({e}); again in bfloat16", flush=True)
            res["float16_error"] = str(e)
            a.dtype = "bfloat16"
            del ex
    res["dtype"] = a.dtype
    for method in ("apt", "demofusion"):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        r = run(RenderConfig(**base | {"method": method}), ex)
        r["executor"] = "in-process"
        r["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
        write(out, res, a)  # keep what ran, whatever comes next
    del ex
    if cuda:
        torch.cuda.empty_cache()

    from apt_dist.ray_executor import RayExecutor

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with RayExecutor(num_workers=1, gpus_per_worker=1 if cuda else 0) as rex:
        run(RenderConfig(**warm), rex)
        r = run(RenderConfig(**base), rex)
        r["executor"] = "ray, 1 worker"
        import ray

        info = ray.get(rex.workers[0].handle.info.remote())
        r["peak_gpu_gib"] = round(info["peak_gpu_bytes"] / 2**30, 2) if "peak_gpu_bytes" in info else None
        inproc = res["runs"][0]["s_per_patch"]
        r["ray_overhead_share"] = round(1 - inproc / r["s_per_patch"], 3)
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
    write(out, res, a)
    print((out / "gpu_check.md").read_text())


def write(out, res, a):
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    lines = [f"# GPU check: {res['gpu']}, {a.model} {a.dtype} {a.size}x{a.size}, {a.steps} steps", "",
             f"command: `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`", "",
             "| executor | method | patch evals | sampling s | s / patch | decode s | peak GPU GiB |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['executor']} | {r['method']} | {r['patch_evals']} | {r['sampling_s']} | {r['s_per_patch']} | {r['decode_s']} | {r['peak_gpu_gib']} |")
    lines += ["", "Per phase (seconds):", ""]
    for r in res["runs"]:
        lines.append(f"- {r['executor']} {r['method']}: " + ", ".join(f"{p['size']} {p['seconds']} s ({p['s_per_patch']} s/patch)" for p in r["phases"]))
    if len(res["runs"]) > 2:
        lines.append(f"\nRay overhead share (1 worker vs in-process, apt): {res['runs'][2]['ray_overhead_share']:.1%}")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
