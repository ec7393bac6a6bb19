"""MFU of the UNet call, and the memory estimate against the measured peak, on one device.

MFU: the FLOPs of the exact UNet call (torch.utils.flop_counter.FlopCounterMode on Denoiser.predict's
UNet, eager), divided by the measured wall time of a call and the device's dense peak (PEAK_TFLOPS by
device name, or --peak-tflops), per rows a call, dtype and compile setting. Also reports which SDPA
kernel ran (the profiler's kernel names) and each compile's time.

Memory (--memory): per rows a call, torch.cuda.max_memory_allocated after one UNet call, and after one
VAE decode of the default tile, against apt_dist.devices.estimate_memory (the figure `apt-dist plan
--gpu-memory` uses). CUDA only.

    python benchmarks/gpu_bench.py [--rows 2,4,8,16,32] [--dtypes float16,bfloat16] [--compile off,on] [--memory]
                                   [--markdown benchmarks/results/gpu_bench.md]
    python benchmarks/gpu_bench.py --model tiny --device cpu --dtypes float32 --peak-tflops 0.1   # dry run, no GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from bench import Table, emit, machine

from apt_dist.config import RenderConfig
from apt_dist.devices import GIB, decode_side, estimate_memory
from apt_dist.models import Denoiser, ModelSpec, encode_prompt, model_info

# Dense float16/bfloat16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0,
               "A10": 125.0, "RTX 4090": 165.0, "V100": 125.0, "T4": 65.0}


def peak_for(name: str, dtype: str) -> float | None:
    if dtype == "float32":
        return None  # TF32 peaks differ and float32 is not the fast path: pass --peak-tflops
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def unet_inputs(d: Denoiser, rows: int, n: int, channels: int, embeds):
    x = torch.randn(rows, channels, n, n, generator=torch.Generator().manual_seed(rows))
    return x, [(0, 0)] * rows, [r % 2 for r in range(rows)], embeds


def count_flops(d: Denoiser, args, original) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    call, d._unet_call = d._unet_call, d.unet  # eager: the same arithmetic as the compiled call
    try:
        with FlopCounterMode(display=False) as fc:
            d.predict(args[0], 500, args[1], args[2], args[3], original)
    finally:
        d._unet_call = call
    return fc.get_total_flops()


def sdpa_kernels(d: Denoiser, args, original) -> str:
    """The attention kernels one call ran, by the profiler's names."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if d.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        d.predict(args[0], 500, args[1], args[2], args[3], original)
    names = {e.key for e in prof.key_averages()}
    hits = sorted(n for n in names if any(k in n.lower() for k in ("flash", "fmha", "efficient_attention", "cudnn_attention",
                                                                     "scaled_dot_product", "attention_forward")))
    return "; ".join(h[:80] for h in hits[:4]) or "none found"


def time_calls(d: Denoiser, args, original, min_s: float, device, best: bool = False) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    d.predict(args[0], 500, args[1], args[2], args[3], original)
    times = []
    t_end = time.perf_counter() + min_s
    while time.perf_counter() < t_end or len(times) < 3:
        sync()
        t0 = time.perf_counter()
        d.predict(args[0], 500, args[1], args[2], args[3], original)  # returns a CPU tensor: synchronises
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sdxl-random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", default="2,4,8,16,32", help="UNet rows a call (2 per patch with both guidance branches)")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--compile", default="off", help="off | on | off,on")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: PEAK_TFLOPS by name)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per configuration")
    ap.add_argument("--best", action="store_true", help="the fastest call instead of the median (a shared CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--memory", action="store_true", help="also measure peak memory against the estimate (CUDA)")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device (dry run: --model tiny --device cpu --dtypes float32 --peak-tflops 0.1)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    info = model_info(ModelSpec(a.model))
    n, ch = info.native_window, info.latent_channels
    original = (n * info.vae_scale,) * 2
    rows_list = [int(r) for r in a.rows.split(",")]
    mfu = Table(f"UNet MFU: {a.model}, {n}x{n} latents, {name}",
                ["dtype", "compile", "rows", "patches", "GFLOP/call", "ms/call", "ms/patch", "TFLOP/s", "MFU", "compile s"])
    kernels = {}
    for dtype in a.dtypes.split(","):
        for comp in a.compile.split(","):
            spec = ModelSpec(a.model, dtype, a.device, compile=comp == "on")
            d = Denoiser(spec)
            embeds = encode_prompt(spec, "a lighthouse", "", 0)
            peak = a.peak_tflops or peak_for(name, dtype)
            for rows in rows_list:
                args = unet_inputs(d, rows, n, ch, embeds)
                t0 = time.perf_counter()
                d.predict(args[0], 500, args[1], args[2], args[3], original)  # compiles this shape when on
                first = time.perf_counter() - t0
                flops = count_flops(d, args, original)
                s = time_calls(d, args, original, a.seconds, device, a.best)
                tflops = flops / s / 1e12
                mfu.rows.append([dtype, comp, rows, rows / 2, flops / 1e9, 1000 * s, 2000 * s / rows, tflops,
                                 f"{100 * tflops / peak:.1f}%" if peak else None, first if comp == "on" else None])
                print(json.dumps(dict(zip(mfu.columns, mfu.rows[-1]))), flush=True)
            kernels[f"{dtype} compile {comp}"] = sdpa_kernels(d, unet_inputs(d, rows_list[0], n, ch, embeds), original)
            del d
            if device.type == "cuda":
                torch.cuda.empty_cache()
    timing = "fastest call" if a.best else "median call"
    peak_note = f"--peak-tflops {a.peak_tflops}" if a.peak_tflops else "PEAK_TFLOPS by device name (dense fp16/bf16)"
    mfu.notes += [f"timing: {timing} of {a.seconds:g} s; peak: {peak_note}; FLOPs: FlopCounterMode on the eager UNet call (2 per multiply-add)",
                  "compile s: the first call of that shape (dynamo + inductor; cache in TORCHINDUCTOR_CACHE_DIR)"]
    mfu.notes += [f"SDPA kernels, {k}: {v}" for k, v in kernels.items()]
    mfu.data = {"machine": machine(), "device": name}
    tables = [mfu]
    if a.memory and device.type == "cuda":
        tables.append(memory_table(a, info, name))
    for i, t in enumerate(tables):
        md = a.markdown if i == 0 else (a.markdown.replace(".md", "_memory.md") if a.markdown else None)
        emit(t, md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([t.to_dict() for t in tables], f, indent=2)
    return 0


def memory_table(a, info, name) -> Table:
    """Measured peak (max_memory_allocated) against the estimate, per rows a call, for the first dtype."""
    dtype = a.dtypes.split(",")[0]
    cfg = RenderConfig(model=a.model, dtype=dtype)
    spec = ModelSpec(a.model, dtype, a.device)
    torch.cuda.reset_peak_memory_stats()
    d = Denoiser(spec)
    weights = torch.cuda.memory_allocated()
    embeds = encode_prompt(spec, "a lighthouse", "", 0)
    n, side = info.native_window, decode_side(cfg, info.native_window)
    t = Table(f"GPU memory per worker: measured peak against the estimate, {a.model} {dtype}, {name}",
              ["what", "measured GiB", "estimate GiB", "estimate / measured"])
    est = estimate_memory(cfg, n, 1)
    t.rows.append(["weights (UNet + VAE)", weights / GIB, (est.unet_weights + est.vae_weights) / GIB,
                   (est.unet_weights + est.vae_weights) / weights])
    for rows in [int(r) for r in a.rows.split(",")]:
        args = unet_inputs(d, rows, n, info.latent_channels, embeds)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        d.predict(args[0], 500, args[1], args[2], args[3], (n * 8, n * 8))
        measured = torch.cuda.max_memory_allocated()
        e = estimate_memory(cfg, n, rows)
        want = e.unet_weights + e.vae_weights + e.unet_activations
        t.rows.append([f"UNet call, {rows} rows", measured / GIB, want / GIB, want / measured])
    torch.cuda.reset_peak_memory_stats()
    z = torch.randn(1, info.latent_channels, side, side)
    d.decode(z)
    measured = torch.cuda.max_memory_allocated()
    want = est.unet_weights + est.vae_weights + est.vae_decode
    t.rows.append([f"VAE decode, {side}x{side} latents", measured / GIB, want / GIB, want / measured])
    t.notes.append("estimate: apt_dist.devices.estimate_memory without its reserve (CUDA context, workspaces)")
    return t


if __name__ == "__main__":
    sys.exit(main())
