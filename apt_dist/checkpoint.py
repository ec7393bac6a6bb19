"""Phase checkpoints: a render that dies (driver crash, lost cluster) resumes after its last finished phase.

After each phase the driver writes what the next phases need: every phase latent so far
(phase 1's is the reference z1), the random generator's state, and the configuration that
decides the image. Writes are atomic (temporary file, fsync, rename). Resuming restores
them and gives the same image, bit for bit, as an uninterrupted render.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ConfigError, RenderConfig
from .outputs import write_atomic

# Fields that act after sampling (decoding, outputs): a checkpoint stays valid across them.
_NOT_IMAGE = {"save_phases", "decode_tile", "decode_overlap", "decode_context"}
VERSION = 1


def image_fields(config: RenderConfig) -> dict:
    d = config.to_dict()
    return {k: v for k, v in d.items() if k not in _NOT_IMAGE}


def save(path: str | os.PathLike, config: RenderConfig, latents: list[torch.Tensor], generator: torch.Generator) -> None:
    path = Path(path)
    state = {"version": VERSION, "config": image_fields(config), "latents": [z.clone() for z in latents],
             "generator": generator.get_state()}
    write_atomic(path, lambda f: torch.save(state, f))


def load(path: str | os.PathLike, config: RenderConfig) -> dict | None:
    """The checkpoint at `path` if there is one; an error if it belongs to another render."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError("--checkpoint", f"{str(path)!r} is not a readable apt-dist checkpoint ({type(e).__name__})") from None
    if state.get("version") != VERSION:
        raise ConfigError("--checkpoint", f"{str(path)!r} has checkpoint version {state.get('version')}, expected {VERSION}")
    ours = image_fields(config)
    diff = sorted(k for k in set(ours) | set(state["config"]) if ours.get(k) != state["config"].get(k))
    if diff:
        raise ConfigError("--checkpoint", f"{str(path)!r} was written for another render (differs in: {', '.join(diff)}); "
                          "remove it or use another path")
    return state
