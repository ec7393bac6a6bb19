"""Where a patch evaluation's GPU time goes: the bare UNet forward against Denoiser.predict, per batch size.

    python benchmarks/unet_probe.py [--model sdxl-random] [--dtype float16]
"""

import argparse
import time

import torch

from apt_dist.models import Denoiser, ModelSpec, PromptEmbeddings


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sdxl-random")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    d = Denoiser(ModelSpec(a.model, a.dtype, "cuda"))
    unet = d.unet
    print("attn processor:", type(next(iter(unet.attn_processors.values()))).__name__,
          "flash:", torch.backends.cuda.flash_sdp_enabled(), "mem_eff:", torch.backends.cuda.mem_efficient_sdp_enabled())
    w = d.info.native_window
    emb = PromptEmbeddings(torch.randn(2, 77, unet.config.cross_attention_dim), torch.randn(2, 1280))
    for b in (1, 2, 4):
        x = torch.randn(b, 4, w, w)
        xc = x.to("cuda", d.dtype)
        ehs = emb.prompt_embeds[:1].expand(b, -1, -1).to("cuda", d.dtype)
        added = {"text_embeds": emb.pooled[:1].expand(b, -1).to("cuda", d.dtype),
                 "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * b, device="cuda", dtype=torch.float32)}
        t = torch.tensor(500, device="cuda")
        with torch.no_grad():
            bare = timed(lambda: unet(xc, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample, a.reps)
        pred = timed(lambda: d.predict(x, 500, [(0, 0)] * b, [1] * b, emb, (1024, 1024)), a.reps)
        print(f"batch {b}: bare UNet {bare * 1e3:.1f} ms ({bare / b * 1e3:.1f} per row), "
              f"Denoiser.predict {pred * 1e3:.1f} ms ({pred / b * 1e3:.1f} per row)", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        d.predict(torch.randn(2, 4, w, w), 500, [(0, 0)] * 2, [0, 1], emb, (1024, 1024))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
