"""Phase sizes, window coverage, sub-lattice partition, blur."""

import pytest
import torch
import torch.nn.functional as F

from apt_dist.geometry import (
    WindowViews,
    count_local_windows,
    crop_pixels,
    dilation_factor,
    gaussian_blur,
    gaussian_kernel_1d,
    jitter_range,
    lattice_offsets,
    local_windows,
    phase_shapes,
)


def test_demofusion_phase_ladder():
    assert phase_shapes(512, 512, 128) == [(128, 128), (256, 256), (384, 384), (512, 512)]
    assert [dilation_factor(s, 128) for s in phase_shapes(512, 512, 128)] == [1, 2, 3, 4]


@pytest.mark.parametrize("h,w,n", [(48, 32, 16), (33, 71, 16), (1024, 256, 128), (2048, 2048, 128), (20, 17, 16)])
def test_phases_grow_and_end_at_target(h, w, n):
    shapes = phase_shapes(h, w, n)
    assert shapes[-1] == (h, w)
    assert max(shapes[0]) == n
    longs = [max(s) for s in shapes]
    assert longs == sorted(longs) and len(set(longs)) == len(longs)
    assert len(shapes) >= 2


def test_at_or_below_native_is_one_phase():
    assert phase_shapes(16, 12, 16) == [(16, 12)]
    assert phase_shapes(8, 8, 16) == [(8, 8)]


def _coverage(h, w, n, stride, gen):
    jr = jitter_range(n, stride)
    cover = torch.zeros(h + 2 * jr, w + 2 * jr)
    for win in local_windows(h, w, n, stride, gen):
        ys, xs = win.slices()
        assert win.top >= 0 and win.left >= 0
        assert ys.stop <= h + 2 * jr and xs.stop <= w + 2 * jr
        cover[ys, xs] += 1
    return cover[jr : jr + h, jr : jr + w]


@pytest.mark.parametrize("h,w,n,stride", [(32, 32, 16, 8), (48, 40, 16, 8), (37, 23, 16, 8), (256, 384, 128, 64), (48, 48, 16, 4), (10, 40, 16, 8)])
def test_local_windows_cover_every_position_at_every_jitter(h, w, n, stride):
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        assert (_coverage(h, w, n, stride, gen) > 0).all(), f"seed {seed}"
    assert (_coverage(h, w, n, stride, None) > 0).all()


def test_window_count_matches_demofusion():
    # (2s - 1)^2 windows at s x the native size with stride n/2.
    for s in (2, 3, 4):
        assert count_local_windows(128 * s, 128 * s, 128, 64) == (2 * s - 1) ** 2
        assert len(local_windows(128 * s, 128 * s, 128, 64, torch.Generator().manual_seed(0))) == (2 * s - 1) ** 2


def test_jitter_moves_windows_and_is_seeded():
    a = local_windows(64, 64, 16, 8, torch.Generator().manual_seed(1))
    b = local_windows(64, 64, 16, 8, torch.Generator().manual_seed(1))
    c = local_windows(64, 64, 16, 8, torch.Generator().manual_seed(2))
    plain = local_windows(64, 64, 16, 8, None)
    assert a == b and a != c and a != plain


def test_window_views_are_the_windows_of_the_latent_made_on_first_use():
    from apt_dist.executor import DeferredPatches, patch_shapes

    jr = jitter_range(16, 8)
    x = torch.nn.functional.pad(torch.randn(1, 4, 40, 48), (jr,) * 4)
    windows = local_windows(40, 48, 16, 8, torch.Generator().manual_seed(3))
    views = WindowViews(x, windows)
    dp = DeferredPatches(views, [(4, 20, 24)], lambda: [torch.zeros(4, 20, 24)])
    assert patch_shapes(dp)[: len(windows)] == [(4, 16, 16)] * len(windows)
    assert views._views == [None] * len(windows)  # shapes made no view
    k = len(windows) // 2
    ys, xs = windows[k].slices()
    assert torch.equal(dp[k], x[0, :, ys, xs]) and dp[k].data_ptr() == x[0, :, ys, xs].data_ptr()  # a view, no copy
    assert sum(v is not None for v in views._views) == 1 and views[k] is views[k]
    assert [torch.equal(views[j], x[0, :, w.top : w.top + 16, w.left : w.left + 16]) for j, w in enumerate(windows)] == [True] * len(windows)


def test_crop_coordinates_are_top_left_pixels():
    plain = local_windows(64, 64, 16, 8, None)
    jr = jitter_range(16, 8)
    crops = [crop_pixels(w, jr, 8) for w in plain]
    assert crops[0] == (0, 0)
    assert crops[1] == (0, 8 * 8)


@pytest.mark.parametrize("d,h,w", [(2, 32, 32), (3, 48, 48), (4, 64, 64), (3, 37, 50)])
def test_dilated_sub_lattices_cover_each_position_exactly_once(d, h, w):
    cover = torch.zeros(h, w)
    for a, b in lattice_offsets(d):
        cover[a::d, b::d] += 1
    assert torch.equal(cover, torch.ones(h, w))
    assert len(lattice_offsets(d)) == d * d


def test_gaussian_blur_keeps_constants_and_smooths():
    x = torch.full((1, 4, 10, 10), 3.0)
    torch.testing.assert_close(gaussian_blur(x, 5, 1.0), x)
    y = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(y, 5, 1.0).std() < y.std()
    assert torch.equal(gaussian_blur(y, 1, 1.0), y)


def _depthwise_2d_gaussian(kernel_size: int, sigma: float, channels: int) -> torch.Tensor:
    """DemoFusion's kernel: the outer product of the 1-D taps, one copy per channel."""
    g = torch.tensor(gaussian_kernel_1d(kernel_size, sigma), dtype=torch.float64)
    return (g[:, None] * g[None, :]).to(torch.float32).expand(channels, 1, kernel_size, kernel_size).contiguous()


@pytest.mark.parametrize("kernel_size,sigma", [(3, 0.8), (7, 1.5), (5, 0.3)])
def test_gaussian_blur_equals_a_depthwise_2d_convolution_of_the_edge_replicated_latent(kernel_size, sigma):
    """Our separable blur is DemoFusion's 2-D depthwise kernel applied to the latent padded by edge replication."""
    x = torch.randn(1, 4, 37, 29, generator=torch.Generator().manual_seed(1))
    p = kernel_size // 2
    expected = F.conv2d(F.pad(x, (p, p, p, p), mode="replicate"), _depthwise_2d_gaussian(kernel_size, sigma, 4), groups=4)
    torch.testing.assert_close(gaussian_blur(x, kernel_size, sigma), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel_size,sigma", [(3, 0.8), (5, 1.0)])
def test_gaussian_blur_agrees_with_demofusions_zero_padded_blur_inside_and_not_at_the_border(kernel_size, sigma):
    """DemoFusion blurs with F.conv2d(padding=kernel_size // 2), zero padding: the same inside, darker at the
    border (towards 0), where we replicate the edge (README: "Where apt-dist differs from DemoFusion's code")."""
    x = torch.rand(1, 4, 24, 20, generator=torch.Generator().manual_seed(2)) + 1.0  # values in [1, 2)
    p = kernel_size // 2
    theirs = F.conv2d(x, _depthwise_2d_gaussian(kernel_size, sigma, 4), padding=p, groups=4)
    ours = gaussian_blur(x, kernel_size, sigma)
    torch.testing.assert_close(ours[..., p:-p, p:-p], theirs[..., p:-p, p:-p], rtol=0, atol=1e-6)
    border = torch.ones(24, 20, dtype=torch.bool)
    border[p:-p, p:-p] = False
    assert (ours - theirs)[..., border].min() > 1e-2  # theirs is darker at every border position
