"""Tiled VAE decoding with GroupNorm statistics shared by all tiles ("GroupNorm sync").

Denoiser.group_norm_stats runs the decoder once on the whole (downsampled) latent and records every decoder
GroupNorm's per-group input mean/var; Denoiser.decode(..., norm_stats=...) normalises every tile with those instead
of the tile's own statistics, so tiles decoded apart get the tones of the whole image.
"""

import pickle

import pytest
import torch

from apt_dist.models import Denoiser, ModelSpec, build_tiny_pipeline
from apt_dist.tiling import decode_tiled

TINY = ModelSpec("tiny", device="cpu", dtype="float32")
SCALE = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny VAE's ops are ~ms each: with 2 intra-op threads on a shared 2-core box, thread wake-ups dominate
    # (~1 s per 16x16 tile decode under load vs ~15 ms on one thread).  Restored afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def denoiser() -> Denoiser:
    return Denoiser(TINY)


def _smooth_latent(h: int = 40, w: int = 56) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return (torch.stack([torch.sin(2 * x), torch.cos(3 * y), x * y, x + y]) * 0.8)[None]


def _tiled(denoiser: Denoiser, latent: torch.Tensor, norm_stats, tile: int = 16, overlap: int = 4, context: int = 0) -> torch.Tensor:
    def decode_fn(tiles):
        return [denoiser.decode(t[None], norm_stats=norm_stats)[0] for t in tiles]

    return decode_tiled(latent, decode_fn, tile, overlap, SCALE, context)


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    e = (a - b).abs()
    return e.mean().item(), e.max().item()


def test_tiled_decode_with_shared_stats_and_context_matches_whole_decode(denoiser):
    """Tiles normalised with the whole image's GroupNorm statistics and decoded with 8 latents of context
    reproduce a whole decode; either part alone does not (each tile's own statistics change its tones, and
    zero padding at a tile's edge reaches ~13 latents into the tiny decoder)."""
    latent = _smooth_latent()  # [1, 4, 40, 56]: 3 x 5 tiles of 16 with overlap 4
    whole = denoiser.decode(latent)
    stats = denoiser.group_norm_stats(latent)  # 56 <= max_side 64: statistics of the very image decoded
    both = _diff(_tiled(denoiser, latent, stats, context=8), whole)
    no_sync = _diff(_tiled(denoiser, latent, None, context=8), whole)
    no_context = _diff(_tiled(denoiser, latent, stats, context=0), whole)
    # Measured (torch 2.13 CPU): both 0.0000 mean / 0.0001 max; no sync 0.147 / 1.60; no context 0.021 / 0.54.
    assert both[0] < 1e-3 and both[1] < 1e-2, both
    assert no_sync[0] > 0.05 and no_context[1] > 0.1, (no_sync, no_context)


def test_decode_without_norm_stats_is_unchanged(denoiser):
    x = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(0)) * 4
    vae = build_tiny_pipeline().vae
    with torch.no_grad():
        ref = vae.decode(x / vae.config.scaling_factor, return_dict=False)[0].clamp(-1, 1)
    out = denoiser.decode(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(denoiser.decode(x, norm_stats=None), out, rtol=0, atol=0)


def test_full_size_stats_reproduce_plain_decode_exactly(denoiser):
    latent = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(1)) * 3
    stats = denoiser.group_norm_stats(latent, max_side=10**6)  # no downsampling: the image's own statistics
    plain = denoiser.decode(latent)
    torch.testing.assert_close(denoiser.decode(latent, norm_stats=stats), plain, rtol=0, atol=1e-5)
    # every row of a batch uses the same (given) statistics
    both = denoiser.decode(torch.cat([latent, latent]), norm_stats=stats)
    torch.testing.assert_close(both, torch.cat([plain, plain]), rtol=0, atol=1e-5)


def test_group_norm_stats_shapes_names_and_picklable(denoiser):
    stats = denoiser.group_norm_stats(_smooth_latent(16, 24))
    norms = {f"decoder.{n}": m for n, m in denoiser.vae.decoder.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert set(stats) == set(norms) and "decoder.conv_norm_out" in stats
    for name, (mean, var) in stats.items():
        groups = norms[name].num_groups
        for t in (mean, var):
            assert t.shape == (groups,) and t.dtype == torch.float32 and t.device.type == "cpu"
        assert (var >= 0).all()
    back = pickle.loads(pickle.dumps(stats))
    assert all(torch.equal(back[k][0], stats[k][0]) and torch.equal(back[k][1], stats[k][1]) for k in stats)
    # numpy arrays (e.g. after a trip through Ray) work like tensors
    latent = _smooth_latent(8, 8)
    as_numpy = {k: (m.numpy(), v.numpy()) for k, (m, v) in stats.items()}
    torch.testing.assert_close(denoiser.decode(latent, norm_stats=as_numpy), denoiser.decode(latent, norm_stats=stats))


def test_group_norm_stats_runs_the_decoder_at_a_bounded_size(denoiser):
    seen: list[tuple[int, ...]] = []
    handle = denoiser.vae.decoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        big = torch.randn(1, 4, 400, 600, generator=torch.Generator().manual_seed(2))
        stats = denoiser.group_norm_stats(big, max_side=16)
        small = torch.randn(1, 4, 10, 12)
        denoiser.group_norm_stats(small, max_side=16)
    finally:
        handle.remove()
    assert seen == [(1, 4, 11, 16), (1, 4, 10, 12)]  # one decoder pass each; small latents are not resampled
    # and they are usable for decoding tiles of the big latent
    tile = denoiser.decode(big[:, :, :8, :8], norm_stats=stats)
    assert tile.shape == (1, 3, 64, 64) and torch.isfinite(tile).all()


def test_patched_group_norms_are_restored(denoiser):
    norms = [m for m in denoiser.vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stats = denoiser.group_norm_stats(latent)
    plain = denoiser.decode(latent)
    denoiser.decode(latent, norm_stats=stats)
    assert not any("forward" in vars(m) for m in norms)
    # an error inside the patched decode (wrong channel count reaches conv_in) still restores every module
    with pytest.raises(RuntimeError):
        denoiser.decode(torch.randn(1, 3, 8, 8), norm_stats=stats)
    assert not any("forward" in vars(m) for m in norms)
    # statistics of another model are refused before anything is patched
    with pytest.raises(ValueError, match="norm_stats"):
        denoiser.decode(latent, norm_stats={"decoder.nope": stats["decoder.conv_norm_out"]})
    with pytest.raises(ValueError, match="norm_stats"):
        denoiser.decode(latent, norm_stats={k: (m[:1], v[:1]) for k, (m, v) in stats.items()})
    assert not any("forward" in vars(m) for m in norms)
    torch.testing.assert_close(denoiser.decode(latent), plain, rtol=0, atol=0)
