"""Statistical Matching gives every dilated sub-lattice the reference's statistics."""

import pytest
import torch
import torch.nn.functional as F

from apt_dist.geometry import lattice_offsets
from apt_dist.matching import ReferenceStats, standardize_to, statistical_matching


@pytest.mark.parametrize("s,shape", [(2, (32, 32)), (3, (48, 48)), (4, (64, 64)), (3, (48, 80)), (2, (37, 50))])
def test_sub_lattices_match_reference_per_channel(s, shape):
    g = torch.Generator().manual_seed(s)
    z1 = torch.randn(1, 4, 16, 16, generator=g) * torch.tensor([0.5, 1.0, 2.0, 0.8]).view(1, 4, 1, 1) + torch.tensor([0.1, -0.3, 0.0, 1.0]).view(1, 4, 1, 1)
    z = F.interpolate(z1, size=shape, mode="bicubic", align_corners=False) * 0.7 + 0.2  # a shifted upsample
    ref = ReferenceStats.of(z1)
    out = statistical_matching(z, ref, s, "channel")
    for a, b in lattice_offsets(s):
        sub = out[:, :, a::s, b::s]
        torch.testing.assert_close(sub.mean(dim=(0, 2, 3)), ref.channel_mean.flatten(), atol=1e-5, rtol=0)
        torch.testing.assert_close(sub.std(dim=(0, 2, 3)), ref.channel_std.flatten(), atol=1e-5, rtol=0)


def test_global_mode_matches_global_stats():
    z1 = torch.randn(1, 4, 16, 16) * 2 + 1
    z = torch.randn(1, 4, 48, 48)
    ref = ReferenceStats.of(z1)
    out = statistical_matching(z, ref, 3, "global")
    for a, b in lattice_offsets(3):
        sub = out[:, :, a::3, b::3]
        assert sub.mean().item() == pytest.approx(ref.mean.item(), abs=1e-5)
        assert sub.std().item() == pytest.approx(ref.std.item(), abs=1e-5)


def test_matching_keeps_the_structure_within_a_lattice():
    z = torch.randn(1, 4, 32, 32)
    out = statistical_matching(z, ReferenceStats.of(torch.randn(1, 4, 16, 16)), 2)
    # An affine map per sub-lattice and channel: correlation with the input stays 1.
    a = z[0, 0, 0::2, 0::2].flatten()
    b = out[0, 0, 0::2, 0::2].flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr.item() == pytest.approx(1.0, abs=1e-5)


def test_unknown_stats_mode():
    with pytest.raises(ValueError, match="sm_stats"):
        statistical_matching(torch.randn(1, 4, 8, 8), ReferenceStats.of(torch.randn(1, 4, 8, 8)), 2, "median")


def test_standardize_to():
    x = torch.randn(1, 4, 20, 20) * 3 + 2
    y = standardize_to(x, torch.tensor(0.5), torch.tensor(0.25))
    assert y.mean().item() == pytest.approx(0.5, abs=1e-5)
    assert y.std().item() == pytest.approx(0.25, abs=1e-5)
