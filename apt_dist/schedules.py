"""Noise schedules and stateless scheduler steps (Euler, DDIM).

Everything here is a pure function of tensors and a `NoiseSchedule` table, in the
style of k-diffusion: no step counters, no hidden state. diffusers' scheduler
objects keep a step index, which breaks when hundreds of patches are stepped at
the same timestep (ALGORITHM.md, "Schedulers"); these functions are tested
against diffusers' EulerDiscreteScheduler and DDIMScheduler instead.

Scale-aware Scheduling (APT) is `sas_betas`: a beta table whose growth is set
by `eta`; eta = 0.5 is SDXL's own `scaled_linear` table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULERS = ("euler", "ddim")


def sas_betas(num_train_timesteps: int, beta_start: float, beta_end: float, eta: float) -> torch.Tensor:
    """Scale-aware beta table: beta_t = (b0^eta + t/(T-1) * (bT^eta - b0^eta)) ** (1/eta).

    Computed in float64; eta = 0.5 reproduces `scaled_linear`, larger eta adds noise faster.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    t = torch.arange(num_train_timesteps, dtype=torch.float64) / (num_train_timesteps - 1)
    lo, hi = beta_start**eta, beta_end**eta
    return (lo + t * (hi - lo)) ** (1.0 / eta)


def leading_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> torch.Tensor:
    """SDXL's 'leading' spacing: 50 steps of 1000 give 981, 961, ..., 1."""
    ratio = num_train_timesteps // num_inference_steps
    ts = (torch.arange(num_inference_steps, dtype=torch.float64) * ratio).round().flip(0) + steps_offset
    return ts.to(torch.long)


@dataclass(frozen=True)
class NoiseSchedule:
    """One phase's tables. Step i runs at timesteps[i] and moves to step i + 1."""

    kind: str  # "euler" | "ddim"
    timesteps: torch.Tensor  # long [N]
    alphas_cumprod: torch.Tensor  # float32 [T]
    sigmas: torch.Tensor  # float32 [N + 1], Euler's sigma at each step, then 0
    alpha_t: torch.Tensor  # float32 [N], alphas_cumprod at timesteps[i]
    alpha_prev: torch.Tensor  # float32 [N], alphas_cumprod at DDIM's previous timestep
    num_train_timesteps: int

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())


def make_schedule(
    kind: str,
    num_inference_steps: int,
    betas: torch.Tensor,
    steps_offset: int = 1,
) -> NoiseSchedule:
    """Tables for `kind` over a beta table (float64 [T]), leading spacing, as diffusers builds them."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; allowed: {', '.join(SCHEDULERS)}")
    T = int(betas.numel())
    # diffusers keeps alphas_cumprod in float32; so do we, so the steps match it closely.
    alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float32), dim=0)
    ts = leading_timesteps(num_inference_steps, T, steps_offset)
    sig = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    sigmas = torch.cat([sig[ts], torch.zeros(1)]).to(torch.float32)
    # DDIM: previous timestep t - T/N; below 0 it is alphas_cumprod[0] (SDXL: set_alpha_to_one=False).
    prev = ts - T // num_inference_steps
    alpha_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], alphas_cumprod[0])
    return NoiseSchedule(kind, ts, alphas_cumprod, sigmas, alphas_cumprod[ts], alpha_prev, T)


def init_noise_sigma(s: NoiseSchedule) -> float:
    """Scale of the pure-noise start latent (diffusers' `init_noise_sigma`, leading spacing)."""
    if s.kind == "euler":
        return float((s.sigmas.max() ** 2 + 1) ** 0.5)
    return 1.0


def scale_model_input(s: NoiseSchedule, x: torch.Tensor, i: int) -> torch.Tensor:
    """What the UNet sees at step i: Euler works in sigma space, so divide by sqrt(sigma^2 + 1)."""
    divisor = input_divisor(s, i)
    return x if divisor is None else x / divisor


def input_divisor(s: NoiseSchedule, i: int) -> torch.Tensor | None:
    """`scale_model_input` as a divisor (for `torch.div(..., out=)`); None where the input is the latent itself."""
    return (s.sigmas[i] ** 2 + 1) ** 0.5 if s.kind == "euler" else None


def add_noise(s: NoiseSchedule, z0: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
    """The noised latent of step i (the forward process at timesteps[i])."""
    if s.kind == "euler":
        return torch.add(z0, eps, alpha=float(s.sigmas[i]))  # z0 + sigma * eps in one pass
    a = s.alpha_t[i]
    return a**0.5 * z0 + (1 - a) ** 0.5 * eps


def step(s: NoiseSchedule, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
    """One deterministic step from timesteps[i] to the next, for an epsilon-predicting model."""
    x = x.to(torch.float32)
    eps = eps.to(torch.float32)
    if s.kind == "euler":
        # diffusers' x + (x - x0) / sigma * dt with x0 = x - sigma * eps, i.e. x + dt * eps: one pass, not five
        # (the driver steps every patch of every timestep; equal to diffusers within float rounding, tested).
        return torch.add(x, eps, alpha=float(s.sigmas[i + 1] - s.sigmas[i]))
    a, a_prev = s.alpha_t[i], s.alpha_prev[i]
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def cosine_factor(t: int, num_train_timesteps: int = 1000) -> float:
    """DemoFusion's cosine weight: 1 at t = T (pure noise), 0 at t = 0."""
    return 0.5 * (1 + math.cos(math.pi * (num_train_timesteps - t) / num_train_timesteps))
