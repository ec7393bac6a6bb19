"""Tiled VAE decoding and encoding: overlapping latent tiles, coded independently, blended smoothly.

The tile geometry and the blend are pure functions; the decoding (encoding) itself goes
through an executor, so workers can share the tiles. Memory on a worker is bounded by the
tile size, whatever the image size. Both directions cut the same tiles of the latent grid
(an encoder tile is the pixels over a latent tile), with the same context and blend.
"""

from __future__ import annotations

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of size `tile` covering [0, length), stepping tile - overlap; the last snaps to the end."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def ramp(size: int, fade_start: int, fade_end: int) -> torch.Tensor:
    """1-D blend weight: rises over `fade_start` samples, falls over `fade_end`, 1 between; never 0."""
    w = torch.ones(size, dtype=torch.float64)
    if fade_start > 0:
        w[:fade_start] = torch.minimum(w[:fade_start], (torch.arange(fade_start) + 0.5) / fade_start)
    if fade_end > 0:
        w[size - fade_end :] = torch.minimum(w[size - fade_end :], (torch.arange(fade_end).flip(0) + 0.5) / fade_end)
    return w


def _tiles(h: int, w: int, tile: int, overlap: int, context: int):
    """Latent boxes (top, left, th, tw) covering h x w, and each box's context margins (top, bottom, left, right)."""
    tops, lefts = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    boxes = [(t, x0, min(tile, h), min(tile, w)) for t in tops for x0 in lefts]
    margins = [(min(context, t), min(context, h - t - th), min(context, x0), min(context, w - x0 - tw)) for t, x0, th, tw in boxes]
    return boxes, margins


def _blend(parts: list[torch.Tensor], boxes, h: int, w: int, overlap: int, scale: int) -> torch.Tensor:
    """Weighted sum of tiles [K, th*scale, tw*scale] placed at `boxes` (latent units), over the summed weights."""
    out = torch.zeros(parts[0].shape[0], h * scale, w * scale, dtype=torch.float64)
    weight = torch.zeros(1, h * scale, w * scale, dtype=torch.float64)
    fade = overlap * scale
    for (t, x0, th, tw), part in zip(boxes, parts):
        wy = ramp(th * scale, fade if t > 0 else 0, fade if t + th < h else 0)
        wx = ramp(tw * scale, fade if x0 > 0 else 0, fade if x0 + tw < w else 0)
        wt = (wy[:, None] * wx[None, :])[None]
        ys, xs = slice(t * scale, (t + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
        out[:, ys, xs] += part.to(torch.float64) * wt
        weight[:, ys, xs] += wt
    return (out / weight).to(torch.float32)[None]


def decode_tiled(latent: torch.Tensor, decode_fn, tile: int, overlap: int, scale: int, context: int = 0) -> torch.Tensor:
    """Decode [1, C, h, w] latents to [1, 3, h*scale, w*scale] through `decode_fn(list of [C, th, tw]) -> list of [3, ...]`.

    Each tile is decoded with up to `context` latents of its real surroundings (the
    decoder's convolutions reach that far), which are cropped off again. Each tile is
    then weighted by a ramp that fades over the overlap on every side that has a
    neighbour, and the weighted sum is divided by the summed weights, so seams blend
    and the borders of the image keep full weight.
    """
    _, _, h, w = latent.shape
    boxes, margins = _tiles(h, w, tile, overlap, context)
    padded = decode_fn([latent[0, :, t - mt : t + th + mb, x0 - ml : x0 + tw + mr] for (t, x0, th, tw), (mt, mb, ml, mr) in zip(boxes, margins)])
    images = [img[:, mt * scale : mt * scale + th * scale, ml * scale : ml * scale + tw * scale]
              for img, (t, x0, th, tw), (mt, mb, ml, mr) in zip(padded, boxes, margins)]
    return _blend(images, boxes, h, w, overlap, scale)


def encode_tiled(image: torch.Tensor, encode_fn, tile: int, overlap: int, scale: int, context: int = 0) -> torch.Tensor:
    """Encode a [1, 3, H, W] image (H, W multiples of `scale`) to [1, C, H/scale, W/scale] latents through
    `encode_fn(list of [3, th*scale, tw*scale]) -> list of [C, th, tw]`.

    The mirror of `decode_tiled`: the latent grid is cut into the same tiles; each tile's
    pixels go to the encoder with `context` latents' worth of surrounding pixels, whose
    latents are cropped off again, and the tiles blend over their overlap.
    """
    _, _, height, width = image.shape
    if height % scale or width % scale:
        raise ValueError(f"image size {width}x{height} is not a multiple of the VAE scale {scale}")
    h, w = height // scale, width // scale
    boxes, margins = _tiles(h, w, tile, overlap, context)
    s = scale
    padded = encode_fn([image[0, :, (t - mt) * s : (t + th + mb) * s, (x0 - ml) * s : (x0 + tw + mr) * s]
                        for (t, x0, th, tw), (mt, mb, ml, mr) in zip(boxes, margins)])
    latents = [z[:, mt : mt + th, ml : ml + tw] for z, (t, x0, th, tw), (mt, mb, ml, mr) in zip(padded, boxes, margins)]
    return _blend(latents, boxes, h, w, overlap, 1)
