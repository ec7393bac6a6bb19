"""Work units sized for the device, and the peak GPU memory of a worker.

`--view-batch-size auto` and `--split-guidance auto` (the defaults) choose the rows of a UNet call
from the workers' device kind and memory, never from their number: the driver cuts the units, so
one choice holds for every worker, and the image does not depend on the worker count.

  CPU   CPU_VIEWS patches a call, both guidance branches in it (measured fastest per patch for
        the tiny model on this project's 2-core machines: benchmarks/README.md).
  CUDA  both branches in one call, and the largest of CUDA_VIEWS patches a call whose estimated
        peak memory fits the worker's GPU (its share, with fractional GPUs).

The trade-off: a bigger call runs faster per patch (a GPU is launch-bound below a few rows), but
a step has fewer units to share among workers, and each step is a barrier; `apt-dist plan
--workers N` shows the barrier bound of the choice. Fix both knobs to override it.

The memory estimate (per worker): UNet weights + VAE weights + the larger of the UNet's
activations for one unit and the VAE's for one decode tile, plus a fixed reserve for the CUDA
context, workspaces and allocator slack. The activations are measured, not guessed: the real
modules run on the meta device (shapes only, no memory, no arithmetic) under a dispatch mode that
adds up the bytes of live tensors and keeps the peak. Attention is counted as a fused kernel
(flash or memory-efficient SDPA: its output only), as PyTorch runs it on CUDA. Not calibrated on a
GPU until benchmarks/device_check.sh has run (benchmarks/README.md says which numbers are measured).
"""

from __future__ import annotations

import functools
import json
import weakref
from dataclasses import asdict, dataclass

AUTO = "auto"
CPU_VIEWS = 16  # patches per call on CPU (32 rows, as DemoFusion batches): benchmarks/README.md, "Units on CPU"
CUDA_VIEWS = (8, 4, 2, 1)  # tried largest first; 8 patches = 16 rows, DemoFusion's own batch of 16 views halved
GPU_RESERVE_GIB = 1.5  # CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation (not calibrated)
GIB = 2**30


@dataclass(frozen=True)
class DeviceProfile:
    """The device every worker's UNet runs on: its kind, and for CUDA the memory one worker may use."""

    kind: str  # "cpu" | "cuda"
    memory_gib: float | None = None
    name: str = ""  # GPU name, or where the memory figure came from

    def describe(self) -> str:
        if self.kind == "cpu":
            return "CPU"
        if self.memory_gib is None:
            return "CUDA, memory unknown"
        return f"CUDA, {self.memory_gib:.1f} GiB per worker" + (f" ({self.name})" if self.name else "")


def local_device(device: str = "auto", gpu_memory: float | None = None) -> DeviceProfile:
    """The device of a UNet in this process (`device` as RenderConfig.device); `gpu_memory` GiB overrides the GPU's."""
    # Without CUDA here, gpu_memory is ignored: `plan` (planning.plan) plans for CUDA workers itself.
    import torch

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dev.type != "cuda":
        return DeviceProfile("cpu")
    if gpu_memory is not None:
        return DeviceProfile("cuda", float(gpu_memory), "--gpu-memory")
    props = torch.cuda.get_device_properties(dev)
    return DeviceProfile("cuda", props.total_memory / GIB, props.name)


# ---- memory ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory of one worker, bytes by part."""

    unet_weights: int
    vae_weights: int
    unet_activations: int  # one unit of `rows` rows
    vae_decode: int  # one decode tile of `decode_side` x `decode_side` latents, with its context
    rows: int
    decode_side: int
    reserve: int = int(GPU_RESERVE_GIB * GIB)

    @property
    def peak(self) -> int:
        """What torch.cuda.max_memory_allocated should read: UNet calls and decodes never overlap on a worker."""
        return self.unet_weights + self.vae_weights + max(self.unet_activations, self.vae_decode)

    @property
    def need(self) -> int:
        return self.peak + self.reserve

    def parts(self) -> list[tuple[str, int]]:
        return [("UNet weights", self.unet_weights), (f"UNet activations, {self.rows} rows", self.unet_activations),
                ("VAE weights", self.vae_weights), (f"VAE decode, {self.decode_side}x{self.decode_side}-latent tile",
                                                     self.vae_decode), ("reserve (CUDA context, workspaces)", self.reserve)]

    def to_dict(self) -> dict:
        return asdict(self) | {"peak": self.peak, "need": self.need}


class LiveBytes:
    """A dispatch mode that adds up the bytes of the tensors the ops inside it make, while they live.

    Storages are counted once however many views share them, and leave the count when their last
    tensor is gone. Tensors made outside the mode (weights, inputs) are not counted.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                outer._track(out)
                return out

        self._mode = _Mode()
        self._live: dict[int, list[int]] = {}
        self.total = self.peak = 0

    def _track(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            entry = self._live.get(key)
            if entry is None:
                entry = self._live[key] = [0, storage.nbytes()]
                self.total += entry[1]
                self.peak = max(self.peak, self.total)
            entry[0] += 1
            weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.total -= entry[1]
            del self._live[key]

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class _FusedAttention:
    """F.scaled_dot_product_attention as a fused kernel allocates: its output only (no score matrix)."""

    def __enter__(self):
        import torch.nn.functional as F

        self._orig = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: q.new_empty(q.shape[:-1] + (v.shape[-1],))
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self._orig


def _default_dtype(dt):
    from .models import _default_dtype

    return _default_dtype(dt)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


@functools.lru_cache(maxsize=16)
def unet_memory(unet_config_json: str, dtype: str, window: int, rows: int = 1) -> tuple[int, int]:
    """(weight bytes, peak activation bytes of one call of `rows` rows at `window` x `window` latents)."""
    import torch
    from diffusers import UNet2DConditionModel

    cfg = json.loads(unet_config_json)
    dt = _dtype(dtype)
    with torch.device("meta"), _default_dtype(dt):
        unet = UNet2DConditionModel.from_config(cfg)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    cross = int(cfg.get("cross_attention_dim") or 2048)
    cross = cross if isinstance(cross, int) else int(cross[0])
    kw = {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = int(cfg.get("projection_class_embeddings_input_dim", 2816)) - 6 * int(cfg.get("addition_time_embed_dim", 256))
        kw["added_cond_kwargs"] = {"text_embeds": torch.empty(rows, pooled, device="meta", dtype=dt),
                                   "time_ids": torch.empty(rows, 6, device="meta", dtype=torch.float32)}
    with torch.inference_mode(), _FusedAttention(), LiveBytes() as live:
        x = torch.empty(rows, int(cfg.get("in_channels", 4)), window, window, device="meta", dtype=dt)
        e = torch.empty(rows, 77, cross, device="meta", dtype=dt)
        unet(x, torch.tensor(999, device="meta"), encoder_hidden_states=e, return_dict=False, **kw)
    return weights, live.peak


@functools.lru_cache(maxsize=16)
def vae_memory(vae_config_json: str, dtype: str, side: int) -> tuple[int, int]:
    """(weight bytes, peak activation bytes of decoding one `side` x `side`-latent tile)."""
    import torch
    from diffusers import AutoencoderKL

    cfg = json.loads(vae_config_json)
    dt = _dtype(dtype)
    with torch.device("meta"), _default_dtype(dt):
        vae = AutoencoderKL.from_config(cfg)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    with torch.inference_mode(), _FusedAttention(), LiveBytes() as live:
        vae.decode(torch.empty(1, int(cfg.get("latent_channels", 4)), side, side, device="meta", dtype=dt), return_dict=False)
    return weights, live.peak


def gpu_workers(gpu_memory: float) -> DeviceProfile:
    """CUDA workers with `gpu_memory` GiB each (--gpu-memory), wherever they are."""
    return DeviceProfile("cuda", float(gpu_memory), "--gpu-memory")


def model_configs(spec) -> tuple[dict, dict]:
    """The UNet and VAE configs of a models.ModelSpec (configs only, no weights)."""
    from . import models

    name = spec.name
    if name == "tiny":
        return models._tiny_unet_config(), models._tiny_vae_config()
    if name == "sdxl-random" or (models._is_single_file(name) and not spec.config):
        return models.sdxl_unet_config(), models.sdxl_vae_config()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = spec.config if models._is_single_file(name) else models._resolve(name)
    unet = dict(UNet2DConditionModel.load_config(path, subfolder="unet"))
    vae = dict(AutoencoderKL.load_config(spec.vae, subfolder=None) if spec.vae and not spec.vae.endswith(".safetensors")
               else AutoencoderKL.load_config(path, subfolder="vae"))
    return unet, vae


def _public(cfg: dict) -> str:
    return json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, sort_keys=True)


def decode_side(config, native: int) -> int:
    """Latents on a side of one decode tile with its context (sampler.decode's defaults)."""
    tile = config.decode_tile or native
    context = config.decode_context if config.decode_context is not None else max(8, tile // 8)
    return tile + 2 * context


def estimate_memory(config, native: int, rows: int, side: int | None = None) -> MemoryEstimate:
    """Peak GPU memory of one worker rendering `config` with units of `rows` rows (UNet dtype: float16 for auto)."""
    from .loading import model_source

    spec = model_source(config)
    unet_cfg, vae_cfg = model_configs(spec)
    dtype = "float16" if config.dtype == "auto" else config.dtype
    side = side or decode_side(config, native)
    uw, per_row = unet_memory(_public(unet_cfg), dtype, native, 1)
    vw, dec = vae_memory(_public(vae_cfg), config.vae_dtype, side)
    # Activations grow linearly with the rows (measured: 1, 2, 4 rows of SDXL give 1x, 2x, 4x).
    return MemoryEstimate(uw, vw, per_row * rows, dec, rows, side)


# ---- the choice ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitChoice:
    view_batch_size: int
    split_guidance: bool
    device: DeviceProfile
    auto: bool  # whether either knob was auto
    memory: MemoryEstimate | None = None

    @property
    def rows(self) -> int:
        return self.view_batch_size * (1 if self.split_guidance else 2)

    def describe(self) -> str:
        how = "each guidance branch its own call" if self.split_guidance else "both guidance branches in one call"
        src = "auto for" if self.auto else "set, on"
        return f"{self.view_batch_size} patches per UNet call, {how} ({self.rows} rows; {src} {self.device.describe()})"

    def to_dict(self) -> dict:
        return {"view_batch_size": self.view_batch_size, "split_guidance": self.split_guidance, "rows": self.rows,
                "auto": self.auto, "device": asdict(self.device), "memory": self.memory.to_dict() if self.memory else None}


def choose_units(config, native: int, device: DeviceProfile) -> UnitChoice:
    """Resolve config's view_batch_size / split_guidance for `device`; on CUDA, check that one worker fits.

    Raises config.ConfigError (exit 2) when no unit fits the worker's memory, naming what does not fit.
    """
    from .config import ConfigError

    vbs, split = config.view_batch_size, config.split_guidance
    auto = vbs == AUTO or split == AUTO
    split = False if split == AUTO else bool(split)
    if device.kind != "cuda":
        return UnitChoice(CPU_VIEWS if vbs == AUTO else vbs, split, device, auto)
    if device.memory_gib is None:  # memory not known (workers that report none): no check, the largest unit
        v = CUDA_VIEWS[0] if vbs == AUTO else vbs
        return UnitChoice(v, split, device, auto, estimate_memory(config, native, v * (1 if split else 2)))
    budget = device.memory_gib * GIB
    candidates = CUDA_VIEWS if vbs == AUTO else (vbs,)
    est = None
    for v in candidates:
        est = estimate_memory(config, native, v * (1 if split else 2))
        if est.need <= budget:
            return UnitChoice(v, split, device, auto, est)
    # Nothing fits: say what is too big, and the largest setting that would fit.
    have = f"a worker has {device.memory_gib:.1f} GiB ({device.name or 'its GPU'})"
    parts = ", ".join(f"{n} {b / GIB:.2f}" for n, b in est.parts())
    fixed = est.unet_weights + est.vae_weights + est.reserve
    if vbs != AUTO and fixed + est.vae_decode <= budget:
        per_row = est.unet_activations / est.rows
        rows_fit = int((budget - fixed) // per_row)
        most = rows_fit // (1 if split else 2)
        raise ConfigError("--view-batch-size", f"{vbs} patches per call need {est.need / GIB:.1f} GiB per worker ({parts} GiB); "
                                               f"{have}; the largest that fits: {most}" if most >= 1 else
                          f"even 1 patch per call does not fit ({parts} GiB); {have}")
    if fixed + est.unet_activations <= budget:
        side = next((s for s in range(est.decode_side - 8, 15, -8)
                     if fixed + estimate_memory(config, native, est.rows, s).vae_decode <= budget), None)
        ctx = est.decode_side - (config.decode_tile or native)
        hint = (f"the largest decode tile that fits is {side - ctx} latents (--decode-tile {side - ctx})"
                if side and side - ctx >= 2 else "no decode tile fits: use a smaller --decode-context or --vae-dtype bfloat16")
        raise ConfigError("--decode-tile", f"decoding a {est.decode_side}x{est.decode_side}-latent tile needs "
                                           f"{est.need / GIB:.1f} GiB per worker ({parts} GiB); {have}; {hint}")
    raise ConfigError("--gpu-memory", f"the model does not fit: {est.need / GIB:.1f} GiB per worker at the smallest unit "
                                      f"({parts} GiB); {have}; use a GPU with more memory, or a smaller --dtype")
