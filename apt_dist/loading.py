"""Loading the models users have: single-file checkpoints offline, LoRAs, a separate VAE, and clear failures.

* Single files (A1111/ComfyUI ``.safetensors``) load with diffusers' ``from_single_file``, given a local config folder
  that apt-dist writes in code (:func:`sdxl_config_folder`), so that neither the hub nor its cache is needed.  Single
  files hold no tokenizer: CLIP's BPE vocabulary comes from OpenAI's CLIP release on PyPI (``openai-clip``, which
  ships ``bpe_simple_vocab_16e6.txt.gz``), turned into ``vocab.json``/``merges.txt`` the way CLIP builds its own.
* LoRAs (:class:`Lora`) are loaded with diffusers' LoRA loaders (peft) and fused into the weights at their scale, then
  the LoRA layers are removed: a render runs plain modules.  The driver fuses them into its text encoders, every
  worker into its UNet (again after a restart: it rebuilds from the same :class:`~apt_dist.models.ModelSpec`).
* Every failure to load a model is a :class:`ModelLoadError`: one line, with exit code 2 (bad input) or 1 (runtime).
  :func:`check_source` finds the bad-input ones from configs and file headers, before any weights are loaded.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError

__all__ = [
    "Lora",
    "ModelLoadError",
    "check_source",
    "clip_bpe",
    "fuse_loras",
    "lora_identity",
    "parse_lora",
    "sdxl_config_folder",
    "write_sdxl_config_folder",
]


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, said in one line.  `exit_code`: 2 for bad input, 1 for a runtime failure."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the cause said
        self.exit_code = exit_code


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------------------
# LoRA descriptions
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lora:
    """One LoRA file and the scale it is fused at (1.0: as trained; 0: no effect)."""

    path: str
    scale: float = 1.0


def parse_lora(item) -> Lora:
    """'FILE[:SCALE]', (FILE, SCALE) or a Lora -> Lora.  Raises ValueError (one line) for anything else."""
    if isinstance(item, Lora):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        path, scale = item
    elif isinstance(item, str):
        path, scale = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a ':' that is part of the path
    else:
        raise ValueError(f"expected FILE[:SCALE], got {item!r}")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"the scale of {path!r} must be a number, got {scale!r}") from None
    if scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"the scale of {path!r} must be finite, got {scale!r}")
    if not isinstance(path, str) or not path:
        raise ValueError(f"expected FILE[:SCALE], got {item!r}")
    return Lora(os.path.expanduser(path), scale)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def lora_identity(loras) -> list[dict]:
    """What makes each LoRA part of a render's identity: file name, size, SHA-256 and scale."""
    out = []
    for lora in map(parse_lora, loras):
        st = os.stat(lora.path)
        out.append({"file": os.path.basename(lora.path), "size": st.st_size,
                    "sha256": _sha256(os.path.abspath(lora.path), st.st_size, st.st_mtime_ns), "scale": lora.scale})
    return out


def model_source(config, **overrides):
    """The picklable ModelSource (models.ModelSpec) a RenderConfig describes: what every worker builds."""
    from .models import ModelSpec

    kw = dict(name=config.model, dtype=config.dtype, device=config.device, loras=tuple(config.lora_list()),
              vae=config.vae, vae_dtype=config.vae_dtype, config=config.model_config, compile=config.compile)
    return ModelSpec(**(kw | overrides))


def prepare(config):
    """(ModelSource, ModelInfo, encode, None) for a render of `config`: the model checked before any weights load."""
    from .models import encode_prompt, model_info

    spec = model_source(config)
    check_source(spec)
    try:
        info = model_info(spec)
    except (ModelLoadError, ConfigError):  # already one line naming the option
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot read the configs of model {spec.name!r}: {_reason(e)}") from e

    def encode(prompt: str, negative_prompt: str, seed: int):
        return encode_prompt(spec, prompt, negative_prompt, seed=seed)

    return spec, info, encode, None


def from_pipeline(pipe, config, executor=None):
    """(ModelSource, ModelInfo, encode, Denoiser) from a loaded StableDiffusionXLPipeline, used in this process.

    Its text encoders, UNet and VAE are used as they are (LoRAs already fused in them stay), its scheduler config
    and VAE config give the model's facts.  The UNet is moved to `config.device`/`config.dtype` where those are
    not "auto" (else it stays where it is), the VAE to `config.vae_dtype`.  A live pipeline cannot travel to Ray
    workers: they build their model from a ModelSource (`config.model` a folder or file), so `executor` must be
    an in-process one.
    """
    from .executor import InProcessExecutor
    from .models import Denoiser, _info_from_configs, encode_with

    if executor is not None and not isinstance(executor, InProcessExecutor):
        raise ValueError("pipe= is used in this process only; for Ray workers, save the pipeline "
                         "(pipe.save_pretrained(folder)) and render with model=folder")
    if config.loras or config.vae:
        raise ValueError("with pipe=, fuse LoRAs and set the VAE on the pipeline itself (loras/vae apply to model=)")
    unet, vae = pipe.unet, pipe.vae
    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    spec = model_source(config, name="<pipeline>",
                        device=str(unet.device) if config.device == "auto" else config.device,
                        dtype=names.get(unet.dtype, "float32") if config.dtype == "auto" else config.dtype)
    info = _info_from_configs(dict(unet.config), dict(vae.config), dict(pipe.scheduler.config),
                              bool(pipe.config.get("force_zeros_for_empty_prompt", True)))

    def encode(prompt: str, negative_prompt: str, seed: int):
        return encode_with(pipe, prompt, negative_prompt)

    return spec, info, encode, Denoiser(spec, unet=unet, vae=vae)


# ---------------------------------------------------------------------------------------------------------------------
# CLIP's BPE vocabulary and the built-in SDXL config folder
# ---------------------------------------------------------------------------------------------------------------------

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_CLIP_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges: a 49408-token vocabulary


def _bpe_path() -> Path:
    """CLIP's merges file, from a package that ships it (located without importing the package)."""
    import importlib.util

    for package in ("clip", "open_clip"):  # openai-clip (a dependency), or open_clip_torch where it is installed
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / _BPE_FILE
            if path.is_file():
                return path
    raise ModelLoadError(
        f"single-file checkpoints need CLIP's BPE vocabulary ({_BPE_FILE}), which the openai-clip package ships: "
        "pip install openai-clip", exit_code=1)


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP's (vocabulary, merges) as its own tokenizer builds them: 256 byte characters, the same with '</w>',
    one token per merge, then the two special tokens (49408 in all)."""
    from .models import _byte_unicode_chars

    lines = gzip.decompress(_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _CLIP_MERGES + 1]  # line 0 is a version header
    chars = _byte_unicode_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _clip_text_config(hidden: int, layers: int, heads: int, act: str, projection: int, with_projection: bool) -> dict:
    """A text encoder config as in stabilityai/stable-diffusion-xl-base-1.0 (its legacy bos/eos/pad ids included:
    transformers reads eos_token_id 2 as 'take the highest token id's position')."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }


def _tokenizer_files(pad_token: str) -> dict[str, dict]:
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    return {
        "tokenizer_config.json": {**special, "model_max_length": 77, "do_lower_case": True,
                                  "tokenizer_class": "CLIPTokenizer", "errors": "replace"},
        "special_tokens_map.json": special,
    }


def write_sdxl_config_folder(path: str | os.PathLike, unet: dict | None = None, vae: dict | None = None,
                             scheduler: dict | None = None, text_encoder: dict | None = None,
                             text_encoder_2: dict | None = None) -> Path:
    """Write a diffusers SDXL pipeline folder without weights: model_index.json, every component's config and both
    tokenizers (CLIP's vocabulary).  Defaults: stabilityai/stable-diffusion-xl-base-1.0's configs."""
    from .models import _sdxl_scheduler_config, sdxl_unet_config, sdxl_vae_config

    root = Path(path)
    configs = {
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **(unet or sdxl_unet_config())},
        "vae/config.json": {"_class_name": "AutoencoderKL", **(vae or sdxl_vae_config())},
        "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler",
                                            **(scheduler or _sdxl_scheduler_config())},
        "text_encoder/config.json": text_encoder or _clip_text_config(768, 12, 12, "quick_gelu", 768, False),
        "text_encoder_2/config.json": text_encoder_2 or _clip_text_config(1280, 32, 20, "gelu", 1280, True),
        "model_index.json": {
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    }
    # SDXL's second tokenizer pads with '!' (id 0), the first with the end token.
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        configs.update({f"{folder}/{name}": d for name, d in _tokenizer_files(pad).items()})
    vocab, merges = clip_bpe()
    for rel, d in configs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(d, indent=2))
    for folder in ("tokenizer", "tokenizer_2"):
        (root / folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (root / folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return root


@functools.lru_cache(maxsize=1)
def sdxl_config_folder() -> str:
    """The built-in SDXL base config folder, written once per process into a temporary folder."""
    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix="apt-dist-sdxl-config-")
    atexit.register(shutil.rmtree, folder, True)
    write_sdxl_config_folder(folder)
    return folder


def single_file_config(spec) -> str:
    """The config folder of a single-file model: the spec's own (`config`), else the built-in SDXL base one."""
    return spec.config if getattr(spec, "config", None) else sdxl_config_folder()


def single_file_pipeline(path: str, config: str, torch_dtype: torch.dtype, keep: tuple[str, ...]):
    """StableDiffusionXLPipeline.from_single_file with a local config folder, offline, loading only `keep`."""
    from diffusers import StableDiffusionXLPipeline

    from .models import _ALL_COMPONENTS

    skip = {c: None for c in _ALL_COMPONENTS if c not in keep and c != "scheduler"}
    try:
        return StableDiffusionXLPipeline.from_single_file(path, config=config, local_files_only=True,
                                                          torch_dtype=torch_dtype, **skip)
    except Exception as e:
        raise ModelLoadError(f"cannot load the single-file checkpoint {path!r} as SDXL: {_reason(e)}") from e


# ---------------------------------------------------------------------------------------------------------------------
# Checks before any weights are loaded
# ---------------------------------------------------------------------------------------------------------------------

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
_SDXL_FOLDER_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                      "text_encoder_2/config.json")


def _check_safetensors(path: str, what: str) -> None:
    """Read a .safetensors header and check that the file holds every tensor it announces (a truncated download
    does not).  Cheap: only the header is read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{os.path.getsize(path)} bytes, too short for a header")
            n = int.from_bytes(head, "little")
            if n > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        have = os.path.getsize(path) - 8 - n
        if have < end:
            raise ValueError(f"truncated: {have} of {end} data bytes")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{what} {path!r} is not a readable .safetensors file ({_reason(e)})") from None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.name.split(".")[0] in _WEIGHT_NAMES
                  and p.suffix in (".safetensors", ".bin"))


def check_folder(path: str) -> None:
    """A diffusers SDXL pipeline folder: the configs and weights that apt-dist loads are there and readable."""
    root = Path(path)
    for rel in _SDXL_FOLDER_FILES:
        if not (root / rel).is_file():
            raise ModelLoadError(f"model folder {path!r} is not a diffusers SDXL pipeline: {rel} is missing")
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model folder {path!r}: model_index.json is not valid JSON ({_reason(e)})") from None
    for key in ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"):
        if not index.get(key) or index[key][0] is None:
            raise ModelLoadError(f"model folder {path!r} is not a diffusers SDXL pipeline: model_index.json has no {key!r}")
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if comp == "text_encoder" and (not index.get(comp) or index[comp][0] is None):
            continue  # the refiner has no first text encoder
        files = _weight_files(root / comp)
        if not files:
            raise ModelLoadError(f"model folder {path!r} has no weights in {comp}/ "
                                 f"(expected {_WEIGHT_NAMES[0] if comp in ('unet', 'vae') else 'model'}.safetensors)")
        for f in files:
            if f.suffix == ".safetensors":
                _check_safetensors(str(f), f"{comp} weights")


def check_hub_id(name: str) -> str:
    """A hub id must be in the local Hugging Face cache (apt-dist never downloads): its snapshot folder."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"model {name!r} is neither a local folder or file nor in the Hugging Face cache ({type(e).__name__}); "
            f"download it first (hf download {name}) or pass a diffusers folder or a .safetensors file") from None


def _vae_config_of(spec) -> dict:
    """The VAE config of `spec`'s base model (without its --vae)."""
    from diffusers import AutoencoderKL

    from .models import _is_single_file, _resolve, _tiny_vae_config, sdxl_vae_config

    if spec.name == "tiny":
        return _tiny_vae_config()
    if spec.name == "sdxl-random":
        return sdxl_vae_config()
    if _is_single_file(spec.name):
        return dict(AutoencoderKL.load_config(single_file_config(spec), subfolder="vae"))
    return dict(AutoencoderKL.load_config(_resolve(spec.name), subfolder="vae"))


def _unet_config_of(spec) -> dict:
    from diffusers import UNet2DConditionModel

    from .models import _is_single_file, _resolve, _tiny_unet_config, sdxl_unet_config

    if spec.name == "tiny":
        return _tiny_unet_config()
    if spec.name == "sdxl-random":
        return sdxl_unet_config()
    path = single_file_config(spec) if _is_single_file(spec.name) else _resolve(spec.name)
    return dict(UNet2DConditionModel.load_config(path, subfolder="unet"))


def vae_config(spec) -> tuple[dict, str, str | None]:
    """(config, folder, subfolder) of the spec's separate VAE: a folder with config.json, a pipeline folder's vae/,
    or a single file (read with the base model's VAE config)."""
    from diffusers import AutoencoderKL

    path = os.path.expanduser(spec.vae)
    if os.path.isdir(path):
        for sub in (None, "vae"):
            if os.path.isfile(os.path.join(path, sub or "", "config.json")):
                cfg = dict(AutoencoderKL.load_config(path, subfolder=sub))
                files = _weight_files(Path(path) / (sub or ""))
                if not files:
                    raise ModelLoadError(f"--vae folder {spec.vae!r} has no diffusion_pytorch_model.safetensors")
                for f in files:
                    if f.suffix == ".safetensors":
                        _check_safetensors(str(f), "--vae weights")
                return cfg, path, sub
        raise ModelLoadError(f"--vae folder {spec.vae!r} is not a diffusers AutoencoderKL folder: config.json is missing")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            _check_safetensors(path, "--vae file")
        return _vae_config_of(spec), path, None
    raise ModelLoadError(f"--vae {spec.vae!r} does not exist (a diffusers VAE folder or a .safetensors file)")


def check_vae_fits(vae_cfg: dict, unet_cfg: dict, what: str) -> None:
    latent = int(vae_cfg.get("latent_channels", 4))
    need = int(unet_cfg.get("in_channels", 4))
    scale = 2 ** (len(vae_cfg.get("block_out_channels", (64,))) - 1)
    if latent != need or scale != 8:
        raise ModelLoadError(f"{what} does not fit the model: it has {latent} latent channels and a scale of {scale}, "
                             f"the UNet needs {need} latent channels at scale 8")


def _lora_state_dict(lora: Lora, unet_config: dict | None):
    from diffusers import StableDiffusionXLPipeline

    if not os.path.isfile(lora.path):
        raise ModelLoadError(f"--lora {lora.path!r} does not exist")
    if lora.path.endswith(".safetensors"):
        _check_safetensors(lora.path, "--lora file")
    try:
        state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(lora.path, unet_config=unet_config)
    except Exception as e:
        raise ModelLoadError(f"--lora {lora.path!r} is not a LoRA diffusers can read ({_reason(e)})") from None
    if not state_dict or not all("lora" in k for k in state_dict):
        raise ModelLoadError(f"--lora {lora.path!r} holds no LoRA weights (keys without 'lora')")
    return state_dict, alphas


def _check_lora_fits(lora: Lora, state_dict: dict, modules: dict[str, torch.nn.Module]) -> None:
    """Every LoRA layer names a Linear/Conv layer of the model with its input and output sizes."""
    bad = []
    for key, t in state_dict.items():
        if ".lora_A." not in key and ".lora_B." not in key and ".lora.down." not in key and ".lora.up." not in key:
            continue
        comp, _, rest = key.partition(".")
        model = modules.get(comp)
        if model is None:
            bad.append(f"{key} (this model has no {comp})")
            continue
        layer_name = rest.replace(".lora.down.weight", "").replace(".lora.up.weight", "")
        layer_name = layer_name.replace(".lora_A.weight", "").replace(".lora_B.weight", "").replace(".processor", "")
        layer = _find_module(model, layer_name)
        if layer is None:
            bad.append(f"{comp}.{layer_name} (no such layer)")
            continue
        w = getattr(layer, "weight", None)
        if w is None or w.ndim < 2:
            bad.append(f"{comp}.{layer_name} (not a linear or conv layer)")
            continue
        down = ".lora_A." in key or ".lora.down." in key
        got, want = (t.shape[1], w.shape[1]) if down else (t.shape[0], w.shape[0])
        if got != want:
            bad.append(f"{comp}.{layer_name} ({'input' if down else 'output'} {got}, the model's {want})")
    if bad:
        uniq = list(dict.fromkeys(bad))
        more = f" and {len(uniq) - 3} more" if len(uniq) > 3 else ""
        raise ModelLoadError(f"--lora {lora.path!r} does not fit this model: {'; '.join(uniq[:3])}{more}")


def _find_module(model: torch.nn.Module, name: str):
    named = dict(model.named_modules())
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        if candidate in named:
            return named[candidate]
    return None


def _meta_unet(unet_cfg: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_cfg)


def _meta_text_encoders(spec) -> dict:
    """The spec's text encoders on the meta device (no memory), for checking LoRA layers against them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models import _TINY_TEXT_HIDDEN, _is_single_file, _resolve, _tiny_text_config

    out = {}
    for comp, cls, i in (("text_encoder", CLIPTextModel, 0), ("text_encoder_2", CLIPTextModelWithProjection, 1)):
        if spec.name == "tiny":
            cfg = _tiny_text_config(_TINY_TEXT_HIDDEN[i], "quick_gelu" if i == 0 else "gelu")
        else:
            path = single_file_config(spec) if _is_single_file(spec.name) else _resolve(spec.name)
            if not os.path.isfile(os.path.join(path, comp, "config.json")):
                continue
            cfg = CLIPTextConfig.from_pretrained(path, subfolder=comp)
        with torch.device("meta"):
            out[comp] = cls(cfg)
    return out


def check_source(spec, text_encoders: dict | None = None) -> None:
    """Everything about `spec` that can be wrong with the user's files, found from configs and file headers before
    any weights load: the folder's layout, truncated weights, a hub id not in the cache, a LoRA that does not fit
    (checked against a UNet on the meta device, and the given text encoders), a VAE of another latent size."""
    from .models import BUILTIN_MODELS, _is_single_file, _looks_like_local_path

    name = spec.name
    if name not in BUILTIN_MODELS:
        path = os.path.expanduser(name)
        if _is_single_file(name):
            if path.endswith(".safetensors"):
                _check_safetensors(path, "model file")
            if spec.config and not os.path.isfile(os.path.join(spec.config, "model_index.json")):
                raise ModelLoadError(f"--model-config {spec.config!r} is not a diffusers config folder: "
                                     "model_index.json is missing")
        elif os.path.isdir(path):
            check_folder(path)
        elif os.path.exists(path):
            raise ModelLoadError(f"model {name!r} is a file but not a .safetensors/.ckpt/.bin checkpoint")
        elif not _looks_like_local_path(name):
            check_folder(check_hub_id(name))
    if not (spec.vae or spec.loras):
        return
    try:
        unet_cfg = _unet_config_of(spec)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot read the UNet config of {name!r} ({_reason(e)})") from None
    if spec.vae:
        cfg, _, _ = vae_config(spec)
        check_vae_fits(cfg, unet_cfg, f"--vae {spec.vae!r}")
    if spec.loras:
        if text_encoders is None and spec.name != "sdxl-random":
            text_encoders = _meta_text_encoders(spec)
        modules = {"unet": _meta_unet(unet_cfg), **(text_encoders or {})}
        for lora in map(parse_lora, spec.loras):
            state_dict, _ = _lora_state_dict(lora, unet_cfg)
            if name == "sdxl-random":  # no text encoders: only the UNet's layers can be checked
                state_dict = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
            _check_lora_fits(lora, state_dict, modules)


# ---------------------------------------------------------------------------------------------------------------------
# Loading: a separate VAE, LoRAs fused
# ---------------------------------------------------------------------------------------------------------------------


def load_vae(spec, dtype: torch.dtype):
    """The spec's separate VAE (a folder or a single file), offline."""
    from diffusers import AutoencoderKL

    cfg, path, sub = vae_config(spec)
    try:
        if os.path.isdir(path):
            return AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype, local_files_only=True)
        with tempfile.TemporaryDirectory(prefix="apt-dist-vae-") as folder:
            os.makedirs(os.path.join(folder, "vae"))
            with open(os.path.join(folder, "vae", "config.json"), "w") as f:
                json.dump({"_class_name": "AutoencoderKL", **cfg}, f)
            return AutoencoderKL.from_single_file(path, config=folder, subfolder="vae", torch_dtype=dtype,
                                                  local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot load --vae {spec.vae!r}: {_reason(e)}") from e


def fuse_loras(loras, unet=None, text_encoder=None, text_encoder_2=None, unet_config: dict | None = None) -> None:
    """Fuse each LoRA into the given modules at its scale, in order, then drop the LoRA layers (weights stay fused).

    Modules that are None are skipped (the driver passes its text encoders, a worker its UNet).  LoRA keys for a
    module that is not passed are ignored here: :func:`check_source` checks them against the whole model.
    """
    from diffusers import StableDiffusionXLPipeline

    loras = [parse_lora(x) for x in loras]
    if not loras:
        return
    present = {k: m for k, m in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
               if m is not None}
    if not present:
        return
    holder = StableDiffusionXLPipeline(vae=None, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                       tokenizer=None, tokenizer_2=None, scheduler=None, add_watermarker=False)
    config = unet_config if unet_config is not None else (dict(unet.config) if unet is not None else None)
    for i, lora in enumerate(loras):
        state_dict, alphas = _lora_state_dict(lora, config)
        name = f"apt_dist_lora_{i}"
        try:
            if unet is not None and any(k.startswith("unet.") for k in state_dict):
                holder.load_lora_into_unet(state_dict, network_alphas=alphas, unet=unet, adapter_name=name, _pipeline=holder)
            if unet is not None and _has_lora_layers(unet):
                holder.fuse_lora(components=["unet"], lora_scale=lora.scale, adapter_names=[name])
                unet.unload_lora()
            for comp in ("text_encoder", "text_encoder_2"):
                if comp in present:
                    _fuse_text_encoder_lora(present[comp], state_dict, alphas, comp, lora.scale, name)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"--lora {lora.path!r} could not be applied ({_reason(e)})") from e


def _fuse_text_encoder_lora(model, state_dict: dict, alphas: dict | None, prefix: str, scale: float, name: str) -> None:
    """diffusers' text-encoder LoRA loading, through peft directly: transformers 5's own adapter integration asks for
    a peft release newer than PyPI has.  The same steps: the keys under `prefix`, in peft's naming, a LoraConfig from
    their ranks and alphas, inject, load, fuse at `scale`, remove the LoRA layers."""
    from diffusers.loaders.lora_base import fuse_text_encoder_lora
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs, recurse_remove_peft_layers
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    sd = {k.removeprefix(prefix + "."): v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    if not sd:
        return
    sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
    if not hasattr(model, "text_model"):  # CLIPTextModel is flattened in transformers 5; LoRA files are older
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    rank = {k: v.shape[1] for k, v in sd.items() if k.endswith("lora_B.weight")}
    if alphas is not None:
        alphas = {k.removeprefix(prefix + "."): v for k, v in alphas.items() if k.split(".")[0] == prefix} or None
    inject_adapter_in_model(LoraConfig(**get_peft_kwargs(rank, alphas, sd, is_unet=False)), model, adapter_name=name)
    result = set_peft_model_state_dict(model, sd, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelLoadError(f"LoRA layers that fit no {prefix} layer: {', '.join(unexpected[:3])}")
    fuse_text_encoder_lora(model, lora_scale=scale, adapter_names=[name])
    recurse_remove_peft_layers(model)


def _has_lora_layers(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())
