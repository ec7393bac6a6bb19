"""RenderConfig: every knob of a render, with the paper's defaults, and its validation.

Method presets: `method="apt"` (the default) turns on Statistical Matching, Scale-aware
Scheduling and the shortcut (the last 60% of the steps: T0 = 30 of 50); `method="demofusion"`
turns all three off.
The per-part fields default to None, meaning "as the method says"; setting one
overrides the preset, for ablations. Resolved values are the `*_on` / `start_step`
properties, so `dataclasses.replace(cfg, method=...)` behaves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from .matching import SM_STATS
from .schedules import SCHEDULERS

METHODS = ("apt", "demofusion")
INIT_FITS = ("exact", "crop", "pad")
DEFAULT_ETA = {2: 2.0, 3: 3.0, 4: 3.5}  # per phase; larger phases keep the last value
APT_SHORTCUT = 0.6  # the paper's T0 = 30 of 50, as the share of the steps an upscaling phase runs


class ConfigError(ValueError):
    """Bad input, reported as one line naming the option."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(f"{option}: {message}")


@dataclass
class RenderConfig:
    # What to render.
    prompt: str = ""
    negative_prompt: str = ""
    width: int = 384  # pixels, a multiple of 8 (384 = three phases of the tiny model; SDXL posters: 2048-16384)
    height: int = 384
    seed: int = 0
    # Model and numerics.
    model: str = "tiny"  # "tiny" | "sdxl-random" | hub id | diffusers folder | .safetensors file
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU
    device: str = "auto"
    loras: list = field(default_factory=list)  # "FILE[:SCALE]" or (FILE, SCALE), fused in order (CLI: --lora)
    vae: str | None = None  # a separate VAE: diffusers AutoencoderKL folder or single .safetensors file
    vae_dtype: str = "float32"  # float16 only for fp16-safe VAEs (SDXL's own overflows in float16)
    model_config: str | None = None  # single-file models: a diffusers config folder (default: built-in SDXL base)
    # Sampling.
    method: str = "apt"  # "apt" | "demofusion"
    scheduler: str = "auto"  # "auto" (the model's own class) | "euler" | "ddim"; tables from the model's config
    steps: int = 50
    guidance_scale: float = 7.5
    # APT parts (None: as `method` says).
    statistical_matching: bool | None = None
    sm_stats: str = "channel"  # "channel" | "global"
    scale_aware_scheduling: bool | None = None
    eta: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_ETA))
    shortcut: float = APT_SHORTCUT  # apt: upscaling phases start at step round((1 - shortcut) * steps)
    shortcut_steps: int | None = None  # T0, overriding `shortcut`; None: as the method says
    # DemoFusion.
    cosine_scale_1: float = 3.0  # skip residual
    cosine_scale_2: float = 1.0  # local/dilated fusion
    cosine_scale_3: float = 1.0  # blur strength
    sigma: float = 0.8
    stride: int | None = None  # local window stride in latents; None: native // 2
    jitter: bool = True
    anchor_renorm: bool = True
    # Work units: patches per UNet call, and whether the two guidance halves are separate calls.
    view_batch_size: int = 1
    split_guidance: bool = True
    # Upscaling an existing picture (apt-dist upscale): it takes the place of phase 1's result.
    init_image: object = None  # PIL.Image or an image file's path; None: text-to-image
    init_strength: float = 0.0  # 0: the picture as it is; (0, 1]: phase 1 re-noised and denoised, as img2img
    init_fit: str = "exact"  # when its aspect is not the target's: "exact" (refuse) | "crop" (centre) | "pad" (white)
    # Decoding and outputs.
    decode_tile: int | None = None  # latent tile (also an input picture's encode tile); None: the native window
    decode_overlap: int | None = None  # latents; None: a quarter of the tile
    decode_context: int | None = None  # latents of surroundings decoded with each tile; None: max(8, tile / 8)
    save_phases: bool = False

    # ---- resolved presets -------------------------------------------------------
    @property
    def sm_on(self) -> bool:
        return self.method == "apt" if self.statistical_matching is None else self.statistical_matching

    @property
    def sas_on(self) -> bool:
        return self.method == "apt" if self.scale_aware_scheduling is None else self.scale_aware_scheduling

    @property
    def upscale_steps(self) -> int:
        """T0: denoising steps run in each upscaling phase (apt: at least one; demofusion: all)."""
        if self.shortcut_steps is not None:
            return self.shortcut_steps
        if self.method != "apt":
            return self.steps
        return self.steps - min(self.steps - 1, round((1 - self.shortcut) * self.steps))

    @property
    def init_steps(self) -> int:
        """Phase-1 steps when it starts from a picture: diffusers img2img's int(steps * strength)."""
        return min(int(self.steps * self.init_strength), self.steps)

    def eta_for(self, phase: int) -> float | None:
        """Scale-aware Scheduling eta of phase `phase` (1-based); None: the model's own table."""
        if not self.sas_on or phase < 2 or not self.eta:
            return None
        keys = sorted(self.eta)
        usable = [k for k in keys if k <= phase]
        return float(self.eta[usable[-1] if usable else keys[0]])

    # ---- validation ------------------------------------------------------------
    def validate(self) -> RenderConfig:
        """Raise ConfigError for the first bad option; cheap, loads nothing."""
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % 8:
                raise ConfigError(f"--{name}", f"must be a positive multiple of 8 pixels, got {v!r}")
        _int_at_least("--steps", self.steps, 1)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError("--seed", f"must be an integer in 0..2**64-1 ({MAX_SEED}), got {self.seed!r}")
        problem = device_problem(self.device)
        if problem:
            raise ConfigError("--device", problem)
        _choice("--method", self.method, METHODS)
        _choice("--scheduler", self.scheduler, SCHEDULERS)
        _choice("--sm-stats", self.sm_stats, SM_STATS)
        if not _finite(self.shortcut) or not 0 < self.shortcut <= 1:
            raise ConfigError("--shortcut", f"must be a number in (0, 1] (the share of steps each upscaling phase runs), got {self.shortcut!r}")
        if self.shortcut_steps is not None:
            _int_at_least("--shortcut-steps", self.shortcut_steps, 1)
            if self.shortcut_steps > self.steps:
                raise ConfigError(
                    "--shortcut-steps",
                    f"the shortcut T0={self.shortcut_steps} is longer than --steps={self.steps}; allowed: 1..{self.steps}",
                )
        if not _finite(self.guidance_scale) or self.guidance_scale < 0:
            raise ConfigError("--guidance", f"must be a finite number >= 0, got {self.guidance_scale!r}")
        if not isinstance(self.eta, dict):
            raise ConfigError("--eta", f"must map phase to eta, got {self.eta!r}")
        for k, v in self.eta.items():
            if not isinstance(k, int) or k < 2:
                raise ConfigError("--eta", f"phase keys must be integers >= 2, got {k!r}")
            if not _finite(v) or v <= 0:
                raise ConfigError("--eta", f"eta must be a finite number > 0, got {v!r} for phase {k}")
        for name in ("cosine_scale_1", "cosine_scale_2", "cosine_scale_3"):
            v = getattr(self, name)
            if not _finite(v) or v < 0:
                raise ConfigError("--" + name.replace("_", "-"), f"must be a finite number >= 0, got {v!r}")
        if not _finite(self.sigma) or self.sigma <= 0:
            raise ConfigError("--sigma", f"must be a finite number > 0, got {self.sigma!r}")
        if self.stride is not None:
            _int_at_least("--stride", self.stride, 1)
        _int_at_least("--view-batch-size", self.view_batch_size, 1)
        if self.decode_tile is not None:
            _int_at_least("--decode-tile", self.decode_tile, 2)
        if self.decode_context is not None:
            _int_at_least("--decode-context", self.decode_context, 0)
        if self.decode_overlap is not None:
            _int_at_least("--decode-overlap", self.decode_overlap, 0)
            tile = self.decode_tile
            if tile is not None and self.decode_overlap >= tile:
                raise ConfigError("--decode-overlap", f"must be smaller than --decode-tile={tile}, got {self.decode_overlap}")
        if not _finite(self.init_strength) or not 0 <= self.init_strength <= 1:
            raise ConfigError("--init-strength", f"must be a number in [0, 1] (0: the picture as it is), got {self.init_strength!r}")
        _choice("--init-fit", self.init_fit, INIT_FITS)
        if self.init_image is not None:
            from .init_image import check_image

            check_image(self.init_image)  # readable, and of a sane size: the header only
        from .models import DTYPES, check_model_name  # local: keeps `import apt_dist.config` light

        _choice("--dtype", self.dtype, DTYPES)
        try:
            check_model_name(self.model)
        except ValueError as e:
            raise ConfigError("--model", str(e)) from None
        from .models import VAE_DTYPES

        _choice("--vae-dtype", self.vae_dtype, VAE_DTYPES)
        for lora in self.lora_list():
            if not os.path.isfile(lora.path):
                raise ConfigError("--lora", f"{lora.path!r} does not exist (expected FILE[:SCALE], a LoRA .safetensors)")
        if self.vae is not None and not os.path.exists(os.path.expanduser(self.vae)):
            raise ConfigError("--vae", f"{self.vae!r} does not exist (a diffusers VAE folder or a .safetensors file)")
        if self.model_config is not None and not os.path.isdir(os.path.expanduser(self.model_config)):
            raise ConfigError("--model-config", f"{self.model_config!r} is not a folder")
        return self

    def lora_list(self) -> list:
        """`loras` as loading.Lora(path, scale) items."""
        from .loading import parse_lora

        if not isinstance(self.loras, (list, tuple)):
            raise ConfigError("--lora", f"must be a list of FILE[:SCALE], got {self.loras!r}")
        try:
            return [parse_lora(x) for x in self.loras]
        except ValueError as e:
            raise ConfigError("--lora", str(e)) from None

    def validate_for_model(self, native: int, num_train_timesteps: int = 1000) -> None:
        """Checks that need the model: its native window (in latents) and its training timesteps.

        Sizes are bounded in `plan.check_bounds`, which build_plan runs first.
        """
        if self.stride is not None and self.stride > native:
            raise ConfigError("--stride", f"must be at most the native window of {native} latents, got {self.stride}")
        # Leading spacing with offset 1 (SDXL's): N steps start at (N - 1) * (T // N) + 1, which must be < T.
        most = num_train_timesteps - 1
        if self.steps > most:
            raise ConfigError("--steps", f"must be at most {most} for this model ({num_train_timesteps} training "
                                         f"timesteps, leading spacing), got {self.steps}; allowed: 1..{most}")

    # ---- (de)serialisation -------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(dataclasses.replace(self, init_image=None))  # a PIL image is not copied, nor JSON
        if self.init_image is not None:
            from .init_image import identity

            d["init_image"] = identity(self.init_image)  # name, size and SHA-256: part of the render's identity
        d["eta"] = {str(k): v for k, v in self.eta.items()}
        loras = self.lora_list()
        d["loras"] = [[x.path, x.scale] for x in loras]
        if loras and all(os.path.isfile(x.path) for x in loras):
            from .loading import lora_identity

            d["lora_files"] = lora_identity(loras)  # name, size, SHA-256 and scale: part of the render's identity
        d["resolved"] = {
            "statistical_matching": self.sm_on,
            "scale_aware_scheduling": self.sas_on,
            "shortcut": self.shortcut if self.method == "apt" and self.shortcut_steps is None else None,
            "upscale_steps": self.upscale_steps,
            "upscale_start_step": self.steps - self.upscale_steps,
        }
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> RenderConfig:
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        if "eta" in d:
            d["eta"] = {int(k): float(v) for k, v in d["eta"].items()}
        if isinstance(d.get("init_image"), dict):  # an identity record: the picture itself is not stored
            d["init_image"] = d["init_image"].get("name")
        return cls(**d)


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64-1


def device_problem(device) -> str | None:
    """Why `device` is not one of auto, cpu, cuda, cuda:N on this machine, or None when it is."""
    import re

    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", device):
        return f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N"
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"{device!r} is not available: this machine has no CUDA device (torch sees none); use cpu or auto"
    n = torch.cuda.device_count()
    if ":" in device and int(device.split(":")[1]) >= n:
        return f"{device!r} is not available: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}"
    return None


def parse_eta(text: str) -> dict[int, float]:
    """'2:2.0,3:3.0,4:3.5' -> {2: 2.0, 3: 3.0, 4: 3.5}; a single number applies to every phase."""
    text = text.strip()
    try:
        if ":" not in text:
            return {2: float(text)}
        out = {}
        for part in text.split(","):
            k, v = part.split(":")
            out[int(k)] = float(v)
        return out
    except ValueError:
        raise ConfigError("--eta", f"expected 'PHASE:ETA,...' (e.g. 2:2.0,3:3.0,4:3.5) or one number, got {text!r}") from None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(option: str, v, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(option, f"must be an integer >= {lo}, got {v!r}")


def _choice(option: str, v, allowed) -> None:
    if v not in allowed:
        raise ConfigError(option, f"unknown value {v!r}; allowed: {', '.join(allowed)}")
