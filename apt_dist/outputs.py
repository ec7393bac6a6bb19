"""Images out: tensor to PIL, and PNGs written atomically with the render's metadata."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin


def to_pil(image: torch.Tensor) -> Image.Image:
    """[1 or none, 3, H, W] in [-1, 1] -> RGB PIL image."""
    if image.dim() == 4:
        image = image[0]
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, mode="RGB")


def png_metadata(prompt: str, seed: int, config_json: str, extra: dict | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("prompt", prompt)
    info.add_text("seed", str(seed))
    info.add_itxt("apt_dist_config", config_json)
    for k, v in (extra or {}).items():
        info.add_itxt(k, v if isinstance(v, str) else json.dumps(v))
    return info


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call `write(binary_file)` on a temporary file beside `path`, fsync it, then rename it into place.

    A crash leaves either the old file or the new one, never half of one. The file gets the
    permissions of any newly created file (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")  # the pid: see remove_stale_temps
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files beside `path` that write_atomic left in a process that is gone (killed mid-write).

    Only this user's files, and only those whose writer (the pid in the name) no longer runs.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    head = f".{path.name}."
    for name in names:
        if not (name.startswith(head) and name.endswith(".tmp")):
            continue
        pid = name[len(head):-4].split("-", 1)[0]
        f = parent / name
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        try:
            if f.lstat().st_uid == os.getuid() and f.is_file():
                f.unlink()
                removed.append(f)
        except FileNotFoundError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (someone else's counts as running)."""
    if pid <= 0:
        return True  # not a pid we can judge: leave its files alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_png_atomic(image: Image.Image, path: str | os.PathLike, pnginfo: PngImagePlugin.PngInfo | None = None) -> Path:
    return write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=pnginfo))


def check_output_path(path: str | os.PathLike) -> str | None:
    """Why `path` cannot take the output PNG, or None when it can (checked before any work)."""
    if Path(path).suffix.lower() != ".png":
        return f"must end in .png, got {str(path)!r}"
    return check_writable_file(path)


def check_writable_file(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written (atomically, beside itself) at `path`, or None when it can."""
    p = Path(path)
    if p.is_dir():
        return f"{str(path)!r} is a directory"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return f"folder {str(parent)!r} does not exist"
    if not os.access(parent, os.W_OK):
        return f"folder {str(parent)!r} is not writable"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{str(path)!r} exists and is not writable"
    return None


def write_result(result, out: str | os.PathLike) -> list[Path]:
    """Write a RenderResult's image (and its phase images, `<stem>.phaseK.png`) with metadata."""
    from . import __version__

    cfg = result.config
    # Every phase of the plan: a resumed render's too, not only the phases it rendered itself.
    extra = {"apt_dist_version": __version__, "phases": [f"{p.width}x{p.height}" for p in result.plan.phases],
             "scheduler": result.plan.scheduler}  # what --scheduler auto resolved to
    if cfg.init_image is not None:  # an upscale: the picture it started from
        from .init_image import identity

        extra["input_image"] = identity(cfg.init_image)
    info = png_metadata(cfg.prompt, cfg.seed, cfg.to_json(), extra)
    out = Path(out)
    paths = [save_png_atomic(result.image, out, info)]
    for k, img in enumerate(result.phase_images[:-1], start=1):
        paths.append(save_png_atomic(img, out.with_name(f"{out.stem}.phase{k}.png"), info))
    return paths
