"""An existing picture as the start of a render (`apt-dist upscale`): read, checked, fitted, resized.

The picture takes the place of phase 1's result: it is fitted to the target's aspect
(`init_fit`), resized to the plan's phase-1 size and encoded with the VAE
(`sampler.encode`, tiled like the decode). Everything here is CPU work on the picture
(Pillow), without a model. Bad input is a one-line ConfigError naming IMAGE; what can be
mended (transparency, 16 bits, CMYK) is converted and said once, as a warning.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import ConfigError

OPTION = "IMAGE"  # how messages name the picture (the upscale command's argument; RenderConfig.init_image)
# The largest picture read: 2**27 pixels (e.g. 16384 x 8192), checked on the file's header before decoding, like
# Pillow's MAX_IMAGE_PIXELS. An upscale's input is never larger than its target, and targets stay well below.
MAX_INPUT_PIXELS = 2**27
PAD_COLOUR = (255, 255, 255)  # --pad, and what transparency is composited on

log = logging.getLogger("apt_dist")


def _name(src) -> str:
    return repr(str(src)) if isinstance(src, (str, os.PathLike)) else "the given image"


def _open(src) -> tuple[Image.Image, bool]:
    """The picture, opened lazily (header only), and whether this call opened it (then the caller closes it)."""
    if isinstance(src, Image.Image):
        return src, False
    if not isinstance(src, (str, os.PathLike)):
        raise ConfigError(OPTION, f"must be a PIL.Image or the path of an image file, got {type(src).__name__}")
    path = os.path.expanduser(src)
    if not os.path.exists(path):
        raise ConfigError(OPTION, f"{_name(src)} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(OPTION, f"{_name(src)} is not a file")
    try:
        with warnings.catch_warnings():  # our own bound applies (MAX_INPUT_PIXELS), not Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path), True
    except Image.DecompressionBombError:
        raise ConfigError(OPTION, f"{_name(src)} is too large to read: more than {MAX_INPUT_PIXELS} pixels "
                                  f"(MAX_INPUT_PIXELS, 2**27)") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        why = "not an image file Pillow can read" if isinstance(e, UnidentifiedImageError) else f"unreadable ({type(e).__name__}: {e})"
        raise ConfigError(OPTION, f"{_name(src)} is {why}; expected a PNG, JPEG, WebP, TIFF, ... picture") from None


def _check_size(src, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ConfigError(OPTION, f"{_name(src)} is zero-sized ({width}x{height} pixels)")
    if width * height > MAX_INPUT_PIXELS:
        raise ConfigError(OPTION, f"{_name(src)} is {width}x{height} = {width * height} pixels, more than the "
                                  f"{MAX_INPUT_PIXELS} (MAX_INPUT_PIXELS, 2**27) apt-dist reads")


def check_image(src) -> tuple[int, int]:
    """(width, height) of a readable picture of a sane size; ConfigError otherwise. Reads the header only."""
    im, opened = _open(src)
    try:
        _check_size(src, *im.size)
        return im.size
    finally:
        if opened:
            im.close()


def load_image(src) -> tuple[Image.Image, list[str]]:
    """The picture as 8-bit RGB, and what was converted to get there (one sentence each)."""
    im, opened = _open(src)
    try:
        _check_size(src, *im.size)
        try:
            im.load()
        except Exception as e:
            raise ConfigError(OPTION, f"{_name(src)} cannot be decoded ({type(e).__name__}: {e}); is it truncated?") from None
        rgb, notes = _to_rgb(im, _name(src))
        return (rgb.copy() if rgb is im else rgb), notes  # never the file's image, which is closed here
    finally:
        if opened:
            im.close()


def _to_rgb(im: Image.Image, name: str) -> tuple[Image.Image, list[str]]:
    notes = []
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit greyscale (Pillow reads 16-bit PNGs as I;16 or I): to 8 bits. "F": float pixels in 0..255.
        arr = np.asarray(im, dtype=np.float64)
        if mode != "F":
            arr = arr / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        notes.append(f"{name} is a {'32-bit float' if mode == 'F' else '16-bit'} greyscale image ({mode}): converted to 8-bit RGB")
    elif mode == "CMYK":
        im = im.convert("RGB")
        notes.append(f"{name} is a CMYK image: converted to RGB (without colour management)")
    if mode == "P" and "transparency" in im.info or mode in ("PA", "La"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa"):
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append(f"{name} has transparency (an alpha channel): composited on white")
        background = Image.new("RGBA", rgba.size, PAD_COLOUR + (255,))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im, notes


def fitted_size(size: tuple[int, int], target: tuple[int, int], fit: str) -> tuple[int, int]:
    """The picture's size after fitting it to the target's aspect: "crop" (the largest centred part of that
    aspect), "pad" (the smallest frame of that aspect around it) or "exact" (as it is)."""
    (w, h), (tw, th) = size, target
    if fit == "exact" or w * th == h * tw:
        return w, h
    wider = w * th > h * tw
    if fit == "crop":
        return (max(1, round(h * tw / th)), h) if wider else (w, max(1, round(w * th / tw)))
    return (w, max(1, round(w * th / tw))) if wider else (max(1, round(h * tw / th)), h)


def fit_image(im: Image.Image, target: tuple[int, int], fit: str) -> Image.Image:
    """`im` cropped (centre) or padded (white, centred) to `fitted_size`."""
    fw, fh = fitted_size(im.size, target, fit)
    w, h = im.size
    if (fw, fh) == (w, h):
        return im
    left, top = (w - fw) // 2, (h - fh) // 2
    if fit == "crop":
        return im.crop((left, top, left + fw, top + fh))
    canvas = Image.new("RGB", (fw, fh), PAD_COLOUR)
    canvas.paste(im, (-left, -top))
    return canvas


def scaled_size(size: tuple[int, int], scale: int, native_window: int, vae_scale: int) -> tuple[int, int]:
    """`--scale`: phase 1 at the model's native size (long side = the native window, the picture's aspect),
    the target `scale` times that, in pixels. The plan's phase 1 is then exactly that native size."""
    w, h = size
    n = native_window
    w1, h1 = (n, max(1, round(n * h / w))) if w >= h else (max(1, round(n * w / h)), n)
    return w1 * scale * vae_scale, h1 * scale * vae_scale


def check_fit(config, first_phase) -> None:
    """Refuse a picture larger than the target, or of another aspect without init_fit crop/pad.

    The aspect agrees when it differs by at most one latent at phase 1's size (sizes are multiples of 8 px)."""
    target = (config.width, config.height)
    size = check_image(config.init_image)
    fw, fh = fitted_size(size, target, config.init_fit)
    w1, h1 = first_phase.latent_width, first_phase.latent_height
    if config.init_fit == "exact" and abs(w1 * size[1] - h1 * size[0]) > max(size):
        raise ConfigError(OPTION, f"{size[0]}x{size[1]} (aspect {size[0] / size[1]:.3f}) does not have the aspect of the "
                                  f"target {target[0]}x{target[1]} ({target[0] / target[1]:.3f}); pass --crop center or "
                                  "--pad (init_fit='crop' or 'pad'), or a target of the picture's aspect (--scale)")
    if fw > target[0] or fh > target[1]:
        what = f"{size[0]}x{size[1]}" + (f" ({fw}x{fh} after --{'crop' if config.init_fit == 'crop' else 'pad'})"
                                         if (fw, fh) != size else "")
        raise ConfigError(OPTION, f"{what} is larger than the target {target[0]}x{target[1]}: upscaling makes a picture "
                                  "larger; choose a larger --scale or --width/--height, or shrink the picture first")


def prepare_pixels(config, first_phase) -> torch.Tensor:
    """The picture, converted, fitted and resized (Lanczos) to phase 1's size: float32 [1, 3, H1, W1] in [-1, 1]."""
    im, notes = load_image(config.init_image)
    for note in notes:
        log.warning("%s", note)
    im = fit_image(im, (config.width, config.height), config.init_fit)
    size = (first_phase.width, first_phase.height)
    if im.size != size:
        im = im.resize(size, Image.LANCZOS)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy())
    return (arr / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()


def identity(src) -> dict:
    """What the render records of its picture: file name, pixel size, and the SHA-256 of the file (of the mode,
    size and pixels for a PIL.Image given in Python)."""
    if isinstance(src, Image.Image):
        h = hashlib.sha256(f"{src.mode} {src.size}".encode())
        h.update(src.tobytes())
        name = os.path.basename(getattr(src, "filename", "") or "") or None
        return {"name": name, "width": src.size[0], "height": src.size[1], "sha256": h.hexdigest(), "of": "pixels"}
    path = os.path.expanduser(src)
    st = os.stat(path)
    return dict(_file_identity(os.path.abspath(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _file_identity(path: str, size: int, mtime_ns: int) -> tuple:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    width, height = check_image(path)
    return (("name", os.path.basename(path)), ("width", width), ("height", height), ("bytes", size),
            ("sha256", h.hexdigest()), ("of", "file"))
