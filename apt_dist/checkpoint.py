"""Checkpoints: a render that dies (driver crash, lost cluster) resumes where it was, with the same image.

What a checkpoint holds (format version 2, a `torch.save` dict of plain types and tensors):

  version, format     2, "apt-dist-checkpoint"
  config              the configuration fields that decide the image (not decoding or outputs)
  latents             every finished phase's latent, phase 1's (the reference z1) first
  shapes, dtype       each latent's shape as written, and their dtype
  generator           the random generator's state after the last finished phase
  in_phase            None, or a render stopped inside phase k = len(latents) + 1:
                      {"phase": k, "step": i, "x": the latent at the start of step i,
                       "noise": the phase's one noise draw (None in phase 1),
                       "generator": the generator's state at that point}
  sha256              of every tensor's bytes, in the order above

`load` trusts nothing in the file: the version, the keys and their types, the number of
latents (at most the plan's phases), each shape (the plan's for its phase), the dtype,
finite values and the checksum are all checked, and any mismatch is a one-line
ConfigError("--checkpoint", ...) that leaves the file as it was. Writes are atomic
(temporary file, fsync, rename); a save that fails mid-render warns once and the render
goes on (`Saver`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from .config import ConfigError, RenderConfig
from .outputs import remove_stale_temps, write_atomic

# Fields that act after sampling (decoding, outputs): a checkpoint stays valid across them.
_NOT_IMAGE = {"save_phases", "decode_tile", "decode_overlap", "decode_context"}
VERSION = 2
FORMAT = "apt-dist-checkpoint"
DTYPE = "float32"  # the driver's latents
_KEYS = {"format", "version", "config", "latents", "shapes", "dtype", "generator", "in_phase", "sha256"}
_IN_PHASE_KEYS = {"phase", "step", "x", "noise", "generator"}
_HINT = "remove it, or pass --restart to render from the start"

log = logging.getLogger("apt_dist")


def image_fields(config: RenderConfig) -> dict:
    d = config.to_dict()
    return {k: v for k, v in d.items() if k not in _NOT_IMAGE}


def _tensors(latents, generator, in_phase) -> list[torch.Tensor]:
    out = list(latents) + [generator]
    if in_phase is not None:
        out += [in_phase["x"]] + ([] if in_phase["noise"] is None else [in_phase["noise"]]) + [in_phase["generator"]]
    return out


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _state(generator) -> torch.Tensor:
    return generator.get_state() if isinstance(generator, torch.Generator) else generator.clone()


def save(path: str | os.PathLike, config: RenderConfig, latents: list[torch.Tensor], generator: torch.Generator,
         in_phase: dict | None = None) -> None:
    """Write the render's state atomically. `in_phase` (optional): {"phase", "step", "x", "noise", "generator"},
    the generator as a torch.Generator or its state; `noise` may be None in phase 1."""
    latents = [z.detach().to(torch.float32).clone() for z in latents]
    gen = _state(generator)
    rec = None
    if in_phase is not None:
        rec = {"phase": int(in_phase["phase"]), "step": int(in_phase["step"]),
               "x": in_phase["x"].detach().to(torch.float32).clone(),
               "noise": None if in_phase.get("noise") is None else in_phase["noise"].detach().to(torch.float32).clone(),
               "generator": _state(in_phase["generator"])}
    state = {"format": FORMAT, "version": VERSION, "config": image_fields(config), "latents": latents,
             "shapes": [list(z.shape) for z in latents], "dtype": DTYPE, "generator": gen, "in_phase": rec,
             "sha256": _digest(_tensors(latents, gen, rec))}
    write_atomic(Path(path), lambda f: torch.save(state, f))


class Saver:
    """Saves checkpoints at `path` for one render; a failing save warns once and the render goes on.

    Made when a render starts: it first removes the temporary files that killed drivers left
    beside `path` (ours only, of processes that are gone).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.failed = False
        remove_stale_temps(self.path)

    def save(self, config, latents, generator, in_phase=None) -> bool:
        try:
            save(self.path, config, latents, generator, in_phase)
            return True
        except Exception as e:  # a full disk, a folder gone: losing a checkpoint must not lose the render
            if not self.failed:
                log.warning("apt-dist: could not write the checkpoint %s (%s: %s); the render goes on without it",
                            self.path, type(e).__name__, e)
            self.failed = True
            return False


def _fail(path, message: str):
    raise ConfigError("--checkpoint", f"{str(path)!r} {message}; {_HINT}")


def load(path: str | os.PathLike, config: RenderConfig, plan=None, latent_channels: int | None = None) -> dict | None:
    """The validated checkpoint at `path`, or None if there is none; ConfigError if it cannot be trusted.

    `plan` (a plan.Plan) gives each phase's latent size and step range; without it only what
    needs no plan is checked. Returns {"latents", "generator", "in_phase"}.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        _fail(path, f"is not a readable apt-dist checkpoint ({type(e).__name__})")
    if not isinstance(state, dict):
        _fail(path, f"is not an apt-dist checkpoint (holds a {type(state).__name__}, not a dict)")
    if state.get("version") != VERSION or state.get("format") != FORMAT:
        _fail(path, f"has checkpoint format {state.get('format')!r} version {state.get('version')!r}, expected {FORMAT!r} {VERSION}")
    if set(state) != _KEYS:
        missing, extra = sorted(_KEYS - set(state)), sorted(map(str, set(state) - _KEYS))
        _fail(path, "has " + "; ".join(([f"missing keys {', '.join(missing)}"] if missing else [])
                                       + ([f"unknown keys {', '.join(extra)}"] if extra else [])))
    if not isinstance(state["config"], dict):
        _fail(path, "has a config that is not a dict")
    ours = image_fields(config)
    diff = sorted(k for k in set(ours) | set(state["config"]) if ours.get(k) != state["config"].get(k))
    if diff:
        raise ConfigError("--checkpoint", f"{str(path)!r} was written for another render (differs in: {', '.join(map(str, diff))}); "
                          "remove it, use another path, or pass --restart")
    latents, shapes, gen = state["latents"], state["shapes"], state["generator"]
    if not isinstance(latents, list) or not all(isinstance(z, torch.Tensor) for z in latents):
        _fail(path, "has latents that are not a list of tensors")
    if not latents and state["in_phase"] is None:  # a render stopped inside phase 1 has only its in-phase record
        _fail(path, "has no latent")
    if not (isinstance(shapes, list) and len(shapes) == len(latents)
            and all(isinstance(s, list) and all(isinstance(v, int) for v in s) for s in shapes)):
        _fail(path, "has shapes that are not one list of integers per latent")
    if state["dtype"] != DTYPE:
        _fail(path, f"has dtype {state['dtype']!r}, expected {DTYPE!r}")
    if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
        _fail(path, "has a generator state that is not a byte tensor")
    _check_generator(path, gen, "generator")
    phases = plan.phases if plan is not None else None
    if phases is not None and len(latents) > len(phases):
        _fail(path, f"holds {len(latents)} phase latents but this render has {len(phases)} phases")
    channels = latent_channels if latent_channels is not None else latents[0].shape[1] if latents and latents[0].dim() == 4 else None
    for k, (z, s) in enumerate(zip(latents, shapes), start=1):
        if list(z.shape) != s:
            _fail(path, f"has a phase {k} latent of shape {list(z.shape)} but records {s}")
        want = None if phases is None else [1, channels, phases[k - 1].latent_height, phases[k - 1].latent_width]
        _check_tensor(path, z, f"phase {k} latent", want)
    rec = state["in_phase"]
    if rec is not None:
        if not isinstance(rec, dict) or set(rec) != _IN_PHASE_KEYS:
            _fail(path, f"has an in-phase record that is not a dict of {', '.join(sorted(_IN_PHASE_KEYS))}")
        k, i = rec["phase"], rec["step"]
        if not (isinstance(k, int) and isinstance(i, int)):
            _fail(path, "has an in-phase record whose phase or step is not an integer")
        if k != len(latents) + 1:
            _fail(path, f"has an in-phase record of phase {k} after {len(latents)} finished phases (expected phase {len(latents) + 1})")
        want = None
        if phases is not None:
            if k > len(phases):
                _fail(path, f"has an in-phase record of phase {k} but this render has {len(phases)} phases")
            ph = phases[k - 1]
            if not ph.start_step <= i < ph.start_step + ph.steps:
                _fail(path, f"has an in-phase record at step {i}, outside phase {k}'s steps "
                            f"{ph.start_step}..{ph.start_step + ph.steps - 1}")
            want = [1, channels, ph.latent_height, ph.latent_width]
        _check_tensor(path, rec["x"], f"in-phase latent (phase {k}, step {i})", want)
        if rec["noise"] is None:
            if k != 1:
                _fail(path, f"has an in-phase record of phase {k} without its noise draw")
        else:
            _check_tensor(path, rec["noise"], f"in-phase noise (phase {k})", want or list(rec["x"].shape))
        if not isinstance(rec["generator"], torch.Tensor) or rec["generator"].dtype != torch.uint8:
            _fail(path, "has an in-phase generator state that is not a byte tensor")
        _check_generator(path, rec["generator"], "in-phase generator")
    if not isinstance(state["sha256"], str) or state["sha256"] != _digest(_tensors(latents, gen, rec)):
        _fail(path, "fails its SHA-256 check (its tensors changed after it was written)")
    return {"latents": latents, "generator": gen, "in_phase": rec}


def _check_tensor(path, t, what: str, shape: list | None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(path, f"has a {what} that is not a tensor")
    if str(t.dtype).removeprefix("torch.") != DTYPE:
        _fail(path, f"has a {what} of dtype {str(t.dtype).removeprefix('torch.')}, expected {DTYPE}")
    if shape is not None and list(t.shape) != shape:
        _fail(path, f"has a {what} of shape {list(t.shape)}, but this render's is {shape}")
    if not torch.isfinite(t).all():
        _fail(path, f"has a {what} with non-finite values (NaN or inf)")


def _check_generator(path, state: torch.Tensor, what: str) -> None:
    try:
        torch.Generator().set_state(state)
    except Exception:
        _fail(path, f"has a {what} state that a CPU generator does not take")
