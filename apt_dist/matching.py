"""Statistical Matching (APT) and the global renormalisations of DemoFusion.

Pure functions of tensors [B, C, H, W]. Standard deviations are torch's default
(unbiased), the same definition on both sides of every match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import lattice_offsets

SM_STATS = ("channel", "global")


@dataclass(frozen=True)
class ReferenceStats:
    """Statistics of the phase-1 reference latent z1."""

    channel_mean: torch.Tensor  # [1, C, 1, 1]
    channel_std: torch.Tensor  # [1, C, 1, 1]
    mean: torch.Tensor  # scalar
    std: torch.Tensor  # scalar

    @classmethod
    def of(cls, z: torch.Tensor) -> ReferenceStats:
        return cls(
            channel_mean=z.mean(dim=(0, 2, 3), keepdim=True),
            channel_std=z.std(dim=(0, 2, 3), keepdim=True),
            mean=z.mean(),
            std=z.std(),
        )


def standardize_to(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dims=None) -> torch.Tensor:
    """Shift and scale x so its mean/std over `dims` (all when None) become `mean`/`std`."""
    # Two reductions, not torch.std_mean: on CPU that is several times slower than mean() and std().
    if dims is None:
        return (x - x.mean()) / x.std() * std + mean
    return (x - x.mean(dim=dims, keepdim=True)) / x.std(dim=dims, keepdim=True) * std + mean


def statistical_matching(z: torch.Tensor, ref: ReferenceStats, d: int, stats: str = "channel") -> torch.Tensor:
    """Give every d x d dilated sub-lattice of the upsampled latent the reference's statistics.

    Bicubic upsampling shifts the mean and variance of each dilated patch away from
    what the model produced at the native size; APT moves them back (paper, eq. for
    d~_0^k). `stats="channel"` matches per channel, `"global"` over all channels.
    """
    if stats not in SM_STATS:
        raise ValueError(f"unknown sm_stats {stats!r}; allowed: {', '.join(SM_STATS)}")
    out = z.clone()
    for a, b in lattice_offsets(d):
        sub = z[:, :, a::d, b::d]
        if stats == "channel":
            out[:, :, a::d, b::d] = standardize_to(sub, ref.channel_mean, ref.channel_std, dims=(0, 2, 3))
        else:
            out[:, :, a::d, b::d] = standardize_to(sub, ref.mean, ref.std)
    return out
