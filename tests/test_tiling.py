"""Tile geometry and blending (pure); decoding with the VAE is in test_render."""

import torch

from apt_dist.tiling import decode_tiled, ramp, tile_starts


def test_tile_starts_cover_and_end_at_length():
    for length, tile, ov in [(100, 16, 4), (16, 16, 4), (10, 16, 4), (33, 16, 8), (64, 16, 0)]:
        starts = tile_starts(length, tile, ov)
        cover = torch.zeros(length)
        for s in starts:
            cover[s : s + tile] += 1
        assert (cover > 0).all()
        assert starts[-1] + min(tile, length) == length


def test_ramp_positive_and_flat_inside():
    w = ramp(32, 8, 8)
    assert (w > 0).all() and w.max() == 1
    assert torch.all(w[8:24] == 1)
    assert torch.equal(ramp(10, 0, 0), torch.ones(10, dtype=torch.float64))


def test_tiled_identity_decode_reproduces_input():
    """With a decoder that is a pure upsample, tiled blending must reproduce the whole decode exactly."""
    latent = torch.randn(1, 3, 37, 53)

    def up(tiles):
        return [t.repeat_interleave(2, 1).repeat_interleave(2, 2) for t in tiles]

    whole = up([latent[0]])[0][None]
    tiled = decode_tiled(latent, up, tile=16, overlap=4, scale=2)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)


def test_context_is_decoded_and_cropped_off():
    """Tiles get real surroundings (up to `context`, less at the image border) and only their own part is kept."""
    latent = torch.randn(1, 3, 30, 41)
    seen = []

    def up(tiles):
        seen.extend(t.shape[1:] for t in tiles)
        return [t.repeat_interleave(2, 1).repeat_interleave(2, 2) for t in tiles]

    whole = up([latent[0]])[0][None]
    seen.clear()
    tiled = decode_tiled(latent, up, tile=16, overlap=4, scale=2, context=5)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    expect_h = [16 + min(5, t) + min(5, 30 - t - 16) for t in tile_starts(30, 16, 4)]  # [21, 23, 21]
    expect_w = [16 + min(5, x0) + min(5, 41 - x0 - 16) for x0 in tile_starts(41, 16, 4)]
    assert [tuple(x) for x in seen] == [(h, w) for h in expect_h for w in expect_w]
