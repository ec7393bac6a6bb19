"""Model loading for the APT/DemoFusion renderer.

Everything that touches diffusers/transformers model classes lives here:

* :class:`ModelSpec` - a small picklable description of which model to use, on which device and in which
  dtype (Ray workers rebuild their models from it).
* :func:`model_info` - cheap facts about a model, read from configs only (no weights are loaded).
* :func:`encode_prompt` - the two SDXL text encoders (CPU, float32), via diffusers'
  ``StableDiffusionXLPipeline.encode_prompt``.
* :class:`Denoiser` - one UNet replica plus the VAE, what an executor worker holds.
* built-in models: ``"tiny"`` (SDXL architecture, small random weights, made in code; for tests) and
  ``"sdxl-random"`` (the real SDXL-base architecture with deterministic random weights; for benchmarks).

Nothing here downloads anything for the built-in models; other names are resolved with the usual
``from_pretrained`` machinery (local diffusers folders, or hub ids, which need the hub cache or network).

diffusers/transformers are imported lazily so that ``import apt_dist.models`` (for :class:`ModelSpec`) stays cheap.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionXLPipeline

    from .schedules import SchedulerConfig

__all__ = [
    "BUILTIN_MODELS",
    "DTYPES",
    "Denoiser",
    "ModelInfo",
    "ModelSource",
    "ModelSpec",
    "PromptEmbeddings",
    "build_tiny_pipeline",
    "check_model_name",
    "encode_prompt",
    "model_info",
    "sdxl_unet_config",
    "sdxl_vae_config",
]

BUILTIN_MODELS = ("tiny", "sdxl-random")
DTYPES = ("auto", "float32", "float16", "bfloat16")
VAE_DTYPES = ("float32", "float16", "bfloat16")

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Fixed seeds of the built-in random weights (one per component, so components do not depend on build order).
_SEED_TINY_UNET = 1001
_SEED_TINY_VAE = 1002
_SEED_TINY_TEXT_ENCODER = 1003
_SEED_TINY_TEXT_ENCODER_2 = 1004
_SEED_SDXL_UNET = 2001
_SEED_SDXL_VAE = 2002


# ---------------------------------------------------------------------------------------------------------------------
# ModelSpec
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Which model, on which device, in which dtype.  Picklable; Ray workers rebuild their models from it.

    name:   "tiny" | "sdxl-random" | hub id | local diffusers folder | single .safetensors/.ckpt file
    dtype:  "auto" (float16 on cuda, float32 on cpu) | "float32" | "float16" | "bfloat16"
    device: "auto" ("cuda" if available, else "cpu") | "cpu" | "cuda" | "cuda:1" | ...
    """

    name: str = "tiny"
    dtype: str = "auto"
    device: str = "auto"
    loras: tuple = ()  # loading.Lora(path, scale) items (or 'FILE[:SCALE]' strings), fused in this order
    vae: str | None = None  # a separate VAE: a diffusers AutoencoderKL folder or a single .safetensors file
    vae_dtype: str = "float32"  # float32 | float16 | bfloat16 (float16 only for fp16-safe VAEs)
    config: str | None = None  # single files: a diffusers config folder (default: the built-in SDXL base one)
    compile: bool = False  # torch.compile the UNet (Denoiser)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"model name must be a non-empty string, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.vae_dtype not in VAE_DTYPES:
            raise ValueError(f"unknown VAE dtype {self.vae_dtype!r}; expected one of {', '.join(VAE_DTYPES)}")
        from .loading import parse_lora

        object.__setattr__(self, "loras", tuple(parse_lora(x) for x in self.loras))
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ValueError(f"invalid device {self.device!r}: {exc}") from None

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if self.torch_device().type == "cuda" else torch.float32
        return _TORCH_DTYPES[self.dtype]

    def torch_vae_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.vae_dtype]


# The name users of the Python API know it by: what every Ray worker builds its model from.
ModelSource = ModelSpec


def _looks_like_local_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.lower().endswith(_SINGLE_FILE_SUFFIXES)
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _is_single_file(name: str) -> bool:
    return name.lower().endswith(_SINGLE_FILE_SUFFIXES) and os.path.isfile(os.path.expanduser(name))


def _resolve(name: str) -> str:
    """Expand '~' for names that exist locally; hub ids are returned unchanged."""
    expanded = os.path.expanduser(name)
    return expanded if os.path.exists(expanded) else name


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` (one-line message) for a name that looks like a local path but does not exist.

    Built-in names are fine; a plain "org/name" that does not exist locally is taken as a hub id (allowed).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in BUILTIN_MODELS:
        return
    if _looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise ValueError(
            f"model {name!r} looks like a local path but does not exist "
            f"(built-in models: {', '.join(BUILTIN_MODELS)}; hub ids look like 'org/name')"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Configs of the built-in models
# ---------------------------------------------------------------------------------------------------------------------


def sdxl_unet_config() -> dict:
    """The UNet config of stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json), ~2.57 B parameters."""
    return {
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    }


def sdxl_vae_config() -> dict:
    """The VAE config of stabilityai/stable-diffusion-xl-base-1.0 (vae/config.json)."""
    return {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def _sdxl_scheduler_config() -> dict:
    """The scheduler config of stabilityai/stable-diffusion-xl-base-1.0 (EulerDiscreteScheduler, leading spacing)."""
    from .schedules import SDXL_SCHEDULER_DICT

    return dict(SDXL_SCHEDULER_DICT)


# The tiny text encoders: hidden sizes 32 and 64 (SDXL: 768 and 1280), pooled/projection dim 32 (SDXL: 1280).
_TINY_TEXT_HIDDEN = (32, 64)
_TINY_POOLED_DIM = 32
_TINY_TIME_EMBED_DIM = 8


def _tiny_unet_config() -> dict:
    # Like diffusers' own SDXL test components (2 levels, first without attention, like SDXL's first level), with
    # one resnet/transformer per level to keep a forward at ~10 ms on a small CPU.
    return {
        "sample_size": 16,  # native window: 16 latents = 128 px
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_head_dim": [2, 4],  # (number of heads, diffusers' legacy naming)
        "transformer_layers_per_block": [1, 1],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _TINY_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * _TINY_TIME_EMBED_DIM + _TINY_POOLED_DIM,
        "cross_attention_dim": sum(_TINY_TEXT_HIDDEN),
        "norm_num_groups": 8,
    }


def _tiny_vae_config() -> dict:
    # FOUR blocks, so the VAE scale factor is 8 like SDXL's.
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 128,
        "scaling_factor": 0.13025,
        "force_upcast": True,
        # No mid-block self-attention: with random weights it acts as a whole-tile average, which no tiled
        # decode can reproduce; SDXL's trained attention is close to local, which is what makes tiling work there.
        "mid_block_add_attention": False,
    }


def _byte_unicode_chars() -> list[str]:
    """GPT-2/CLIP ``bytes_to_unicode``: the 256 printable characters that stand for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_vocab() -> dict[str, int]:
    """A byte-level CLIP vocabulary without merges: every byte char, every byte char + '</w>', and the two specials."""
    chars = _byte_unicode_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the highest id, like real CLIP (49407)
    return vocab


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    # In transformers 5, CLIPTokenizer is tokenizers-backed and accepts an in-memory vocabulary: nothing is read
    # from disk or the hub.
    return CLIPTokenizer(vocab=_tiny_vocab(), merges=[], model_max_length=77)


def _tiny_text_config(hidden: int, act: str):
    from transformers import CLIPTextConfig

    vocab = _tiny_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=_TINY_POOLED_DIM,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch inside a forked RNG, so that the caller's global RNG state is left untouched."""
    fork_devices: list[int] = []
    if device is not None and device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move/cast a module, casting only when needed.

    diffusers 0.42's ``ModelMixin.to`` logs "There are modules in ... that should be kept in float32: []" on *every*
    call with a dtype (its ``_keep_in_fp32_modules or []`` is never None), so only pass a dtype when one is needed,
    and then cast with ``torch.nn.Module.to`` (UNet2DConditionModel/AutoencoderKL keep no modules in float32).
    """
    params = list(module.parameters())
    if params and any(p.dtype != dtype for p in params if p.is_floating_point()):
        torch.nn.Module.to(module, dtype=dtype)
    if params and any(p.device != device for p in params):
        module.to(device)
    return module


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


@functools.lru_cache(maxsize=1)
def build_tiny_pipeline() -> StableDiffusionXLPipeline:
    """The built-in 'tiny' model: SDXL architecture with small deterministic random weights, made in code.

    Cached per process: treat the returned pipeline as read-only (``copy.deepcopy`` its modules before changing
    them; :class:`Denoiser` does).  Building it leaves the global torch RNG state untouched.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cpu = torch.device("cpu")
    with _seeded(_SEED_TINY_UNET), _default_dtype(torch.float32), torch.device(cpu):
        unet = UNet2DConditionModel(**_tiny_unet_config())
    with _seeded(_SEED_TINY_VAE), _default_dtype(torch.float32), torch.device(cpu):
        vae = AutoencoderKL(**_tiny_vae_config())
    with _seeded(_SEED_TINY_TEXT_ENCODER), _default_dtype(torch.float32), torch.device(cpu):
        text_encoder = CLIPTextModel(_tiny_text_config(_TINY_TEXT_HIDDEN[0], "quick_gelu"))
    with _seeded(_SEED_TINY_TEXT_ENCODER_2), _default_dtype(torch.float32), torch.device(cpu):
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(_TINY_TEXT_HIDDEN[1], "gelu"))

    pipe = StableDiffusionXLPipeline(
        vae=_frozen(vae),
        text_encoder=_frozen(text_encoder),
        text_encoder_2=_frozen(text_encoder_2),
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(),
        unet=_frozen(unet),
        scheduler=EulerDiscreteScheduler.from_config(_sdxl_scheduler_config()),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_random(cls: Any, config: dict, seed: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Instantiate a diffusers model with deterministic random weights directly on `device` in `dtype`."""
    with _seeded(seed, device), _default_dtype(dtype), torch.device(device):
        model = cls.from_config(config)
    return _frozen(_place(model, device, dtype))


# ---------------------------------------------------------------------------------------------------------------------
# ModelInfo
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """Cheap facts about a model, read from configs only (no weights loaded)."""

    native_window: int  # unet.config.sample_size, in latents: tiny 16, SDXL 128
    vae_scale: int  # 2 ** (len(vae.config.block_out_channels) - 1): 8 for both
    latent_channels: int  # 4
    vae_scaling_factor: float  # SDXL 0.13025
    scheduler: SchedulerConfig  # the model's scheduler config, checked (schedules.py)
    force_zeros_for_empty_prompt: bool  # SDXL base: True

    @property
    def beta_start(self) -> float:
        return self.scheduler.beta_start

    @property
    def beta_end(self) -> float:
        return self.scheduler.beta_end

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.num_train_timesteps


def _info_from_configs(unet_cfg: dict, vae_cfg: dict, sched_cfg: dict, force_zeros: bool) -> ModelInfo:
    """Raises schedules.UnsupportedScheduler for a scheduler config apt-dist cannot follow."""
    from .schedules import SchedulerConfig

    return ModelInfo(
        native_window=int(unet_cfg.get("sample_size", 128)),
        vae_scale=2 ** (len(vae_cfg.get("block_out_channels", (64,))) - 1),
        latent_channels=int(unet_cfg.get("in_channels", vae_cfg.get("latent_channels", 4))),
        vae_scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)),
        scheduler=SchedulerConfig.from_dict(sched_cfg),
        force_zeros_for_empty_prompt=bool(force_zeros),
    )


def _load_model_index(name: str) -> dict:
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(name))


def model_info(spec: ModelSpec) -> ModelInfo:
    """Cheap facts about `spec`'s model, from configs only (hub ids: works only if the configs are cached/reachable)."""
    name = spec.name
    if name == "tiny":
        return _info_from_configs(_tiny_unet_config(), _tiny_vae_config(), _sdxl_scheduler_config(), True)
    if name == "sdxl-random" or (_is_single_file(name) and not spec.config):
        return _info_from_configs(sdxl_unet_config(), sdxl_vae_config(), _sdxl_scheduler_config(), True)
    check_model_name(name)

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from .config import ConfigError
    from .schedules import UnsupportedScheduler

    path = spec.config if _is_single_file(name) else _resolve(name)
    unet_cfg = UNet2DConditionModel.load_config(path, subfolder="unet")
    vae_cfg = AutoencoderKL.load_config(path, subfolder="vae")
    sched_cfg = EulerDiscreteScheduler.load_config(path, subfolder="scheduler")
    index = _load_model_index(path)
    try:
        return _info_from_configs(unet_cfg, vae_cfg, sched_cfg, index.get("force_zeros_for_empty_prompt", True))
    except UnsupportedScheduler as e:  # bad input: the CLI exits 2, before any weights load
        raise ConfigError("--model", f"{name}: {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Prompt encoding
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor  # float32 CPU [2, 77, D]; row 0 = negative (unconditional), row 1 = prompt
    pooled: torch.Tensor  # float32 CPU [2, P]


_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_DENOISER_COMPONENTS = ("unet", "vae")
_ALL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _text_pipeline(spec: ModelSpec) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline holding only the text encoders and tokenizers of `spec` (CPU, float32), with the
    spec's LoRAs fused."""
    if spec.name == "tiny" and not spec.loras:
        # Wraps the cached tiny modules (cheap; follows build_tiny_pipeline's cache).  They are only run forward,
        # under no_grad, so they are never mutated.
        src = build_tiny_pipeline()
        components = {c: getattr(src, c) for c in _TEXT_COMPONENTS}
        return _make_text_pipeline(components, bool(src.config.force_zeros_for_empty_prompt))
    return _loaded_text_pipeline(spec.name, spec.config, spec.loras)


@functools.lru_cache(maxsize=2)
def _loaded_text_pipeline(name: str, config: str | None, loras: tuple) -> StableDiffusionXLPipeline:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from . import loading

    if name == "tiny":  # with LoRAs: fused into copies, never into the cached modules
        src = build_tiny_pipeline()
        components = {c: copy.deepcopy(getattr(src, c)) for c in _TEXT_COMPONENTS}
        force_zeros = bool(src.config.force_zeros_for_empty_prompt)
    elif _is_single_file(name):
        folder = config or loading.sdxl_config_folder()
        src = loading.single_file_pipeline(os.path.expanduser(name), folder, torch.float32, keep=_TEXT_COMPONENTS)
        components = {c: getattr(src, c, None) for c in _TEXT_COMPONENTS}
        force_zeros = bool(src.config.get("force_zeros_for_empty_prompt", True))
    else:
        path = _resolve(name)
        index = _load_model_index(path)
        classes = {
            "text_encoder": CLIPTextModel,
            "text_encoder_2": CLIPTextModelWithProjection,
            "tokenizer": CLIPTokenizer,
            "tokenizer_2": CLIPTokenizer,
        }
        components = {}
        try:
            for comp, cls in classes.items():
                entry = index.get(comp)
                if entry is None or (isinstance(entry, (list, tuple)) and entry[0] is None):
                    components[comp] = None  # e.g. the SDXL refiner has no first text encoder
                elif comp.startswith("tokenizer"):
                    components[comp] = cls.from_pretrained(path, subfolder=comp)
                else:
                    components[comp] = cls.from_pretrained(path, subfolder=comp, dtype=torch.float32)  # transformers 5: `dtype`
        except Exception as e:
            raise loading.ModelLoadError(f"cannot load the text encoders of {name!r}: {loading._reason(e)}") from e
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
    loading.fuse_loras(loras, text_encoder=components["text_encoder"], text_encoder_2=components["text_encoder_2"])
    return _make_text_pipeline(components, force_zeros)


def _make_text_pipeline(components: dict, force_zeros: bool) -> StableDiffusionXLPipeline:
    from diffusers import StableDiffusionXLPipeline

    for comp in ("text_encoder", "text_encoder_2"):
        if components[comp] is not None:
            components[comp] = _frozen(_place(components[comp], torch.device("cpu"), torch.float32))
    pipe = StableDiffusionXLPipeline(
        vae=None,
        unet=None,
        scheduler=None,
        force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_embeddings(prompt: str, negative_prompt: str, seed: int) -> PromptEmbeddings:
    """'sdxl-random': deterministic random tensors of SDXL shapes, determined by (seed, prompt text)."""

    def draw(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + zlib.crc32(text.encode())) % 2**63)
        return torch.randn(77, 2048, generator=g), torch.randn(1280, generator=g)

    cond, cond_pooled = draw(prompt)
    if negative_prompt == "":  # SDXL base: force_zeros_for_empty_prompt
        uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(cond_pooled)
    else:
        uncond, uncond_pooled = draw("\x00negative\x00" + negative_prompt)
    return PromptEmbeddings(torch.stack([uncond, cond]), torch.stack([uncond_pooled, cond_pooled]))


@torch.no_grad()
def encode_prompt(spec: ModelSpec, prompt: str, negative_prompt: str = "", seed: int = 0) -> PromptEmbeddings:
    """Encode (negative, prompt) with the model's two text encoders, on CPU in float32.

    Uses diffusers' ``StableDiffusionXLPipeline.encode_prompt`` on a pipeline holding only the text encoders
    (unet=None, vae=None): penultimate hidden states of both encoders concatenated, pooled output of text_encoder_2,
    zeros for the negative when ``negative_prompt == ""`` and the model's ``force_zeros_for_empty_prompt``.
    `seed` is only used by "sdxl-random" (which has no text encoders).
    """
    if spec.name == "sdxl-random":
        return _random_embeddings(prompt, negative_prompt, seed)
    check_model_name(spec.name)
    # One cached text pipeline serves every render of this process, and render_many runs several at once: its
    # fast tokenizers keep their padding and truncation settings as state, so one encode at a time.
    with _ENCODE_LOCK:
        pipe = _text_pipeline(spec)
        return encode_with(pipe, prompt, negative_prompt)


_ENCODE_LOCK = threading.Lock()


@torch.no_grad()
def encode_with(pipe, prompt: str, negative_prompt: str = "") -> PromptEmbeddings:
    """:func:`encode_prompt` with a given pipeline's text encoders (CPU float32 results)."""
    # diffusers zeroes the negative only for negative_prompt=None; "" would be encoded as a real empty prompt.
    encoder = pipe.text_encoder_2 if pipe.text_encoder_2 is not None else pipe.text_encoder
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt,
        device=next(encoder.parameters()).device,  # CPU for apt-dist's own; a user's pipeline may be on a GPU
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=negative_prompt if negative_prompt != "" else None,
    )
    return PromptEmbeddings(
        prompt_embeds=torch.cat([negative_embeds, prompt_embeds]).to(device="cpu", dtype=torch.float32).contiguous(),
        pooled=torch.cat([negative_pooled, pooled]).to(device="cpu", dtype=torch.float32).contiguous(),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Shared GroupNorm statistics for tiled VAE decoding ("GroupNorm sync")
# ---------------------------------------------------------------------------------------------------------------------


def _decoder_group_norms(vae: torch.nn.Module) -> dict[str, torch.nn.GroupNorm]:
    """Every ``torch.nn.GroupNorm`` on the VAE's decode path, by qualified name relative to the VAE.

    The decode path is ``post_quant_conv`` (a 1x1 conv, no norm) and ``decoder``; only the decoder holds GroupNorms
    (resnet norm1/norm2, the mid-block attention's group_norm, conv_norm_out).
    """
    return {f"decoder.{name}": m for name, m in vae.decoder.named_modules() if isinstance(m, torch.nn.GroupNorm)}


def _encoder_group_norms(vae: torch.nn.Module) -> dict[str, torch.nn.GroupNorm]:
    """Every ``torch.nn.GroupNorm`` on the VAE's encode path (``encoder``; ``quant_conv`` is a 1x1 conv), by name."""
    return {f"encoder.{name}": m for name, m in vae.encoder.named_modules() if isinstance(m, torch.nn.GroupNorm)}


@contextlib.contextmanager
def _recording_group_norm_stats(norms: dict[str, torch.nn.GroupNorm], out: dict) -> Iterator[None]:
    """Record each GroupNorm input's per-group (mean, biased var) of batch row 0 into `out` (forward pre-hooks)."""

    def hook_for(name: str):
        def hook(module: torch.nn.GroupNorm, args) -> None:
            if name in out:
                raise RuntimeError(f"GroupNorm {name!r} ran twice in one decoder pass; shared statistics need one call each")
            x = args[0]
            var, mean = torch.var_mean(x[:1].reshape(module.num_groups, -1).to(torch.float32), dim=1, correction=0)
            out[name] = (mean.to("cpu"), var.to("cpu"))

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in norms.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fixed_stats_group_norm_forward(module: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor):
    """A GroupNorm forward that normalises with the given per-group mean/var (then eps and affine as usual)."""
    groups, channels = module.num_groups, module.num_channels
    per = channels // groups

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[1] != channels:
            raise ValueError(f"GroupNorm expected {channels} channels, got input of shape {tuple(x.shape)}")
        m = mean.to(device=x.device, dtype=torch.float32).repeat_interleave(per)
        rstd = torch.rsqrt(var.to(device=x.device, dtype=torch.float32) + module.eps).repeat_interleave(per)
        # y = (x - mean) * rstd * weight + bias, folded into one per-channel scale and shift: y = x * scale + shift
        scale = rstd
        shift = -m * rstd
        if module.affine:
            w, b = module.weight.to(torch.float32), module.bias.to(torch.float32)
            scale = scale * w
            shift = shift * w + b
        view = (1, channels) + (1,) * (x.ndim - 2)
        return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))

    return forward


@contextlib.contextmanager
def _shared_group_norm(norms: dict[str, torch.nn.GroupNorm], stats: dict) -> Iterator[None]:
    """Temporarily make every GroupNorm in `norms` normalise with `stats` instead of its input's own statistics.

    Patches the forward of these module instances only (not ``torch.nn.GroupNorm``), restoring it on exit, also
    when the body raises.
    """
    missing = sorted(set(norms) - set(stats))
    extra = sorted(set(stats) - set(norms))
    if missing or extra:
        raise ValueError(
            f"norm_stats do not match this VAE's decoder GroupNorms (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); compute them with group_norm_stats of the same model"
        )
    given: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in norms.items():
        mean, var = (torch.as_tensor(t) for t in stats[name])  # tensors, or numpy arrays after a trip through Ray
        given[name] = (mean, var)
        if tuple(mean.shape) != (module.num_groups,) or tuple(var.shape) != (module.num_groups,):
            raise ValueError(
                f"norm_stats[{name!r}] must be two [{module.num_groups}] tensors, got {tuple(mean.shape)} and {tuple(var.shape)}"
            )
    saved: list[tuple[torch.nn.Module, bool, Any]] = []
    try:
        for name, module in norms.items():
            had_own = "forward" in module.__dict__
            saved.append((module, had_own, module.__dict__.get("forward")))
            module.forward = _fixed_stats_group_norm_forward(module, *given[name])
        yield
    finally:
        for module, had_own, previous in reversed(saved):
            if had_own:
                module.forward = previous
            else:
                del module.forward


# ---------------------------------------------------------------------------------------------------------------------
# Denoiser
# ---------------------------------------------------------------------------------------------------------------------


COMPILE_RECOMPILE_LIMIT = 64  # distinct UNet input shapes a render may compile (a 16K poster has about 40)


def compile_unet(unet: torch.nn.Module):
    """torch.compile the UNet with static shapes: one graph per input shape (rows, h, w), which are fixed within a
    phase. Inductor's on-disk caches (TORCHINDUCTOR_CACHE_DIR, default ~/.cache/apt-dist/inductor here) make a
    second render, in another process, skip the compile of the shapes it has seen."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "apt-dist", "inductor"))
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * COMPILE_RECOMPILE_LIMIT)
    return torch.compile(unet, dynamic=False, fullgraph=False)


def _downsampled_whole(x: torch.Tensor, max_side: int, what: str, shape: str) -> torch.Tensor:
    """One whole image [1, C, H, W], area-averaged down so that its long side is at most `max_side` (as it is when
    it already is): the input of a GroupNorm-statistics pass, whose memory is then bounded whatever the image."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"{what} must be one whole image {shape}, got shape {tuple(x.shape)}")
    if int(max_side) < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    h, w = x.shape[-2:]
    if max(h, w) <= max_side:
        return x
    f = max_side / max(h, w)
    size = (max(1, min(max_side, round(h * f))), max(1, min(max_side, round(w * f))))
    return torch.nn.functional.interpolate(x, size=size, mode="area")


class Denoiser:
    """One UNet replica (spec device/dtype) plus the VAE (spec device, spec vae_dtype): what a worker holds.

    `unet`/`vae`: modules to use instead of loading the spec's (``render(config, pipe=...)``); they are used as
    they are (any LoRA already fused), only moved to the spec's device and dtype.
    """

    def __init__(self, spec: ModelSpec, unet: torch.nn.Module | None = None, vae: torch.nn.Module | None = None,
                 channels_last: bool | None = None):
        """`channels_last`: the UNet's convolutions in NHWC layout (None: on CUDA, where cuDNN's fast
        float16/bfloat16 kernels want it; on CPU it measured no faster)."""
        from . import loading

        self.spec = spec
        self.device = spec.torch_device()
        self.dtype = spec.torch_dtype()
        self.vae_dtype = spec.torch_vae_dtype()
        self.info = model_info(spec) if unet is None else None  # None: the modules of a given pipeline
        if unet is None:
            unet, own_vae = self._load(spec)
            loading.fuse_loras(spec.loras, unet=unet)
            if vae is None:
                vae = loading.load_vae(spec, self.vae_dtype) if spec.vae else own_vae
        self.unet = _frozen(_place(unet, self.device, self.dtype))
        # SDXL's VAE overflows in float16: float32 unless asked (fp16-fixed VAEs).
        self.vae = _frozen(_place(vae, self.device, self.vae_dtype))
        if channels_last if channels_last is not None else self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
        self._unet_call = compile_unet(self.unet) if spec.compile else self.unet
        self.compile_seconds = 0.0  # summed wall time of the calls that compiled a new shape
        self._compiled_shapes: set = set()

    def _load(self, spec: ModelSpec) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from . import loading

        name, want_vae = spec.name, not spec.vae
        if name == "tiny":
            src = build_tiny_pipeline()
            # never touch the cached pipeline's modules
            return copy.deepcopy(src.unet), copy.deepcopy(src.vae) if want_vae else None
        if name == "sdxl-random":
            unet = _build_random(UNet2DConditionModel, sdxl_unet_config(), _SEED_SDXL_UNET, self.device, self.dtype)
            vae = _build_random(AutoencoderKL, sdxl_vae_config(), _SEED_SDXL_VAE, self.device, torch.float32) if want_vae else None
            return unet, vae
        if _is_single_file(name):
            keep = _DENOISER_COMPONENTS if want_vae else ("unet",)
            pipe = loading.single_file_pipeline(os.path.expanduser(name), loading.single_file_config(spec), self.dtype, keep)
            return pipe.unet, pipe.vae
        check_model_name(name)
        path = _resolve(name)
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=self.dtype)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32) if want_vae else None
        except Exception as e:
            raise loading.ModelLoadError(f"cannot load the UNet/VAE of {name!r}: {loading._reason(e)}") from e
        return unet, vae

    @torch.no_grad()
    def predict(
        self,
        latents: torch.Tensor,
        timestep: int,
        crops: list[tuple[int, int]],
        branches: list[int],
        embeds: PromptEmbeddings,
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Raw UNet noise prediction, float32 CPU [B, C, h, w].

        latents: float32 [B, C, h, w], the already scaled model input.  Row b is conditioned on prompt row
        ``branches[b]`` (0 uncond, 1 cond) and on SDXL time_ids ``[H, W, crop_top, crop_left, H, W]`` with
        ``(H, W) = original_size`` and ``(crop_top, crop_left) = crops[b]``, all in pixels.
        """
        if latents.ndim != 4:
            raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}")
        batch = latents.shape[0]
        if len(crops) != batch or len(branches) != batch:
            raise ValueError(f"need one crop and one branch per row: {batch} rows, {len(crops)} crops, {len(branches)} branches")
        dev, dt = self.device, self.dtype
        index = torch.as_tensor(list(branches), dtype=torch.long)
        encoder_hidden_states = embeds.prompt_embeds.index_select(0, index).to(device=dev, dtype=dt)
        text_embeds = embeds.pooled.index_select(0, index).to(device=dev, dtype=dt)
        height, width = (int(v) for v in original_size)
        # float32 time_ids: the UNet's Timesteps projection computes in float32 anyway, and float16 would round
        # pixel offsets above 2048.
        time_ids = torch.tensor(
            [[height, width, int(top), int(left), height, width] for top, left in crops], dtype=torch.float32, device=dev
        )
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(device=dev)
        else:
            t = torch.tensor(timestep, device=dev, dtype=torch.long if float(timestep).is_integer() else torch.float32)
        t0 = time.perf_counter()
        noise = self._unet_call(
            latents.to(device=dev, dtype=dt),
            t,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]
        out = noise.to(device="cpu", dtype=torch.float32)
        if self._unet_call is not self.unet and tuple(latents.shape) not in self._compiled_shapes:
            self._compiled_shapes.add(tuple(latents.shape))
            self.compile_seconds += time.perf_counter() - t0
        return out

    def _vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents -> what ``vae.decode`` takes (un-scale, and un-normalise where the VAE has latents_mean/std)."""
        cfg = self.vae.config
        z = latents.to(device=self.device, dtype=torch.float32)  # un-scaled in float32, then cast for the VAE
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            z = z * std_t / cfg.scaling_factor + mean_t
        else:
            z = z / cfg.scaling_factor
            if getattr(cfg, "shift_factor", None) is not None:
                z = z + cfg.shift_factor
        return z.to(self.vae_dtype)

    @torch.no_grad()
    def group_norm_stats(self, latents: torch.Tensor, max_side: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-group (mean, var) of every decoder GroupNorm's input, for decoding `latents` in tiles that share them.

        latents: float32 [1, C, h, w], the whole image.  The decoder runs once on the latent downsampled (area
        average) so that its long side is at most `max_side` latents (no resampling when it already is), so memory
        is bounded by `max_side`, not by the image.  Returns {GroupNorm name inside the VAE: (mean [G], var [G])},
        CPU float32, biased variance like GroupNorm's; small and picklable.  Pass it to :meth:`decode`.
        """
        z = _downsampled_whole(latents.to(device=self.device, dtype=torch.float32), max_side, "latents", "[1, C, h, w]")
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with _recording_group_norm_stats(_decoder_group_norms(self.vae), stats):
            self.vae.decode(self._vae_input(z), return_dict=False)
        return stats

    def _model_latents(self, z: torch.Tensor) -> torch.Tensor:
        """What ``vae.encode`` gives -> model latents: the inverse of :meth:`_vae_input`, in float32 on the CPU."""
        cfg = self.vae.config
        z = z.to(torch.float32)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean, dtype=torch.float32, device=z.device).view(1, -1, 1, 1)
            std_t = torch.tensor(std, dtype=torch.float32, device=z.device).view(1, -1, 1, 1)
            z = (z - mean_t) * cfg.scaling_factor / std_t
        else:
            if getattr(cfg, "shift_factor", None) is not None:
                z = z - cfg.shift_factor
            z = z * cfg.scaling_factor
        return z.to(device="cpu")

    @torch.no_grad()
    def encoder_group_norm_stats(self, images: torch.Tensor, max_side: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`group_norm_stats` for the encoder: per-group (mean, var) of every encoder GroupNorm's input.

        images: float32 [1, 3, H, W] in [-1, 1], the whole image; it is encoded once, downsampled (area average)
        so that its long side is at most `max_side` pixels. Pass the result to :meth:`encode`.
        """
        x = _downsampled_whole(images.to(device=self.device, dtype=torch.float32), max_side, "images", "[1, 3, H, W]")
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with _recording_group_norm_stats(_encoder_group_norms(self.vae), stats):
            self.vae.encode(x.to(self.vae_dtype))
        return stats

    @torch.no_grad()
    def encode(self, images: torch.Tensor, norm_stats: dict | None = None) -> torch.Tensor:
        """float32 [B, 3, H, W] images in [-1, 1] -> float32 CPU [B, C, H/vae_scale, W/vae_scale] model latents.

        The latent distribution's mean (its mode), so encoding is deterministic; scaled by the VAE's
        `scaling_factor`, and normalised with its `latents_mean`/`latents_std` where its config has them.
        norm_stats: None, or :meth:`encoder_group_norm_stats` of the whole image these are tiles of.
        """
        x = images.to(device=self.device, dtype=self.vae_dtype)
        shared = contextlib.nullcontext() if norm_stats is None else _shared_group_norm(_encoder_group_norms(self.vae), norm_stats)
        with shared:
            z = self.vae.encode(x).latent_dist.mode()
        return self._model_latents(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, norm_stats: dict | None = None) -> torch.Tensor:
        """float32 [B, C, h, w] latents -> float32 CPU [B, 3, h*vae_scale, w*vae_scale] images in [-1, 1].

        norm_stats: None, or :meth:`group_norm_stats` of the whole image these latents are tiles of: every decoder
        GroupNorm then normalises with those statistics instead of the tile's own (same ones for every row), so
        tiles decoded apart match in tone.
        """
        z = self._vae_input(latents)
        if norm_stats is None:
            image = self.vae.decode(z, return_dict=False)[0]
        else:
            with _shared_group_norm(_decoder_group_norms(self.vae), norm_stats):
                image = self.vae.decode(z, return_dict=False)[0]
        return image.clamp(-1.0, 1.0).to(device="cpu", dtype=torch.float32)
