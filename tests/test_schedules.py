"""Schedules and stateless steps, against diffusers' own schedulers."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from apt_dist import schedules as S

SDXL = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, timestep_spacing="leading")


def test_sas_eta_half_is_sdxl_scaled_linear():
    ours = S.sas_betas(1000, 0.00085, 0.012, 0.5)
    theirs = EulerDiscreteScheduler(**SDXL).betas.to(torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("eta", [1.0, 2.0, 3.0, 3.5])
def test_larger_eta_adds_more_noise_at_every_t(eta):
    base = torch.cumprod(1 - S.sas_betas(1000, 0.00085, 0.012, 0.5), 0)
    sas = torch.cumprod(1 - S.sas_betas(1000, 0.00085, 0.012, eta), 0)
    # Same endpoints of the beta table, but the signal left (alphas_cumprod) is smaller for every t > 0.
    assert torch.all(sas[1:] < base[1:])
    assert torch.isclose(sas[0], base[0])


def test_eta_must_be_positive():
    with pytest.raises(ValueError):
        S.sas_betas(1000, 0.00085, 0.012, 0.0)


def test_leading_timesteps():
    ts = S.leading_timesteps(50)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50
    assert int(ts[50 - 30]) == 581  # the APT shortcut's first timestep
    ref = EulerDiscreteScheduler(**SDXL)
    ref.set_timesteps(50)
    assert torch.equal(ts, ref.timesteps.to(torch.long))


def _trajectory(kind, ref, steps=50, seed=0):
    """Run our stateless steps and diffusers' scheduler side by side on the same eps stream."""
    betas = S.sas_betas(1000, 0.00085, 0.012, 0.5)
    sched = S.make_schedule(kind, steps, betas)
    ref.set_timesteps(steps)
    assert torch.equal(sched.timesteps, ref.timesteps.to(torch.long))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 4, 8, 8, generator=g) * S.init_noise_sigma(sched)
    assert S.init_noise_sigma(sched) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    ours, theirs = x0.clone(), x0.clone()
    for i, t in enumerate(ref.timesteps):
        # A model that depends on its input, so errors would compound.
        eps = torch.tanh(S.scale_model_input(sched, ours, i)) + 0.1 * torch.randn(ours.shape, generator=g)
        torch.testing.assert_close(S.scale_model_input(sched, ours, i), ref.scale_model_input(theirs, t), rtol=1e-5, atol=1e-6)
        ours = S.step(sched, ours, eps, i)
        theirs = ref.step(eps, t, theirs).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    return ours


def test_euler_matches_diffusers_over_50_steps():
    _trajectory("euler", EulerDiscreteScheduler(**SDXL))


def test_ddim_matches_diffusers_over_50_steps():
    _trajectory("ddim", DDIMScheduler(**SDXL, clip_sample=False, set_alpha_to_one=False))


@pytest.mark.parametrize("kind,cls", [("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)])
def test_add_noise_matches_diffusers(kind, cls):
    extra = {} if kind == "euler" else dict(clip_sample=False, set_alpha_to_one=False)
    ref = cls(**SDXL, **extra)
    ref.set_timesteps(50)
    sched = S.make_schedule(kind, 50, S.sas_betas(1000, 0.00085, 0.012, 0.5))
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for i in (0, 20, 49):
        t = ref.timesteps[i : i + 1]
        torch.testing.assert_close(S.add_noise(sched, z, eps, i), ref.add_noise(z, eps, t), rtol=1e-5, atol=1e-6)


def test_steps_are_stateless():
    """Stepping many patches at one timestep in any order gives the same result (no step counter)."""
    sched = S.make_schedule("euler", 50, S.sas_betas(1000, 0.00085, 0.012, 2.0))
    xs = [torch.randn(4, 8, 8) for _ in range(5)]
    eps = [torch.randn(4, 8, 8) for _ in range(5)]
    forward = [S.step(sched, x, e, 20) for x, e in zip(xs, eps)]
    backward = [S.step(sched, x, e, 20) for x, e in reversed(list(zip(xs, eps)))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)


def test_cosine_factor():
    assert S.cosine_factor(1000) == pytest.approx(1.0)
    assert S.cosine_factor(0) == pytest.approx(0.0)
    assert S.cosine_factor(500) == pytest.approx(0.5)
