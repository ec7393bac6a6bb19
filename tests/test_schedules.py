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


# Scheduler configs as models ship them; each is run with both steps against diffusers' class made from it.
CONFIGS = {
    "epsilon-leading (SDXL base)": S.SDXL_SCHEDULER_DICT,
    "epsilon-trailing": {**S.SDXL_SCHEDULER_DICT, "timestep_spacing": "trailing", "steps_offset": 0},
    "v-trailing-zero-snr": {**S.SDXL_SCHEDULER_DICT, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
                            "rescale_betas_zero_snr": True},
    "epsilon-linspace": {**S.SDXL_SCHEDULER_DICT, "timestep_spacing": "linspace"},
    "linear-betas": {**S.SDXL_SCHEDULER_DICT, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "sample-trailing": {**S.SDXL_SCHEDULER_DICT, "timestep_spacing": "trailing", "prediction_type": "sample"},
    "ddim-alpha-one-clip": {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                            "beta_end": 0.012, "clip_sample": True, "clip_sample_range": 1.5, "set_alpha_to_one": True,
                            "steps_offset": 1},
}
CLASSES = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}


def _pair(kind, name, steps):
    d = CONFIGS[name]
    ref = CLASSES[kind].from_config({k: v for k, v in d.items() if k != "_class_name"})
    ref.set_timesteps(steps)
    return S.make_schedule(kind, steps, S.SchedulerConfig.from_dict(d)), ref


def _trajectory(sched, ref, seed=0):
    """Run our stateless steps and diffusers' scheduler side by side on the same model-output stream.

    Both compute in float32 in a different order of operations (e.g. the one-pass Euler step). One step on the
    same input agrees to float32 rounding (rtol 1e-5 with atol 1e-6); the whole sequence compounds those
    roundings through a model that depends on its input, so it is held to rtol 1e-4 (atol 1e-4 near 0)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 4, 8, 8, generator=g) * S.init_noise_sigma(sched)
    assert S.init_noise_sigma(sched) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    ours, theirs = x0.clone(), x0.clone()
    for i, t in enumerate(ref.timesteps):
        # A model that depends on its input, so errors would compound.
        out = torch.tanh(S.scale_model_input(sched, ours, i)) + 0.1 * torch.randn(ours.shape, generator=g)
        their_in = ref.scale_model_input(theirs, t)
        torch.testing.assert_close(S.scale_model_input(sched, theirs, i), their_in, rtol=1e-5, atol=1e-6)
        one = S.step(sched, theirs, out, i)
        ours = S.step(sched, ours, out, i)
        theirs = ref.step(out, t, theirs).prev_sample
        torch.testing.assert_close(one, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    return ours


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["euler", "ddim"])
@pytest.mark.parametrize("steps", [50, 7])
def test_steps_match_diffusers(kind, name, steps):
    sched, ref = _pair(kind, name, steps)
    assert sched.timesteps.dtype == ref.timesteps.dtype and torch.equal(sched.timesteps, ref.timesteps)
    assert [S.model_timestep(sched, i) for i in range(steps)] == pytest.approx(ref.timesteps.tolist(), abs=0)
    if kind == "euler":
        assert torch.equal(sched.sigmas, ref.sigmas)
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    _trajectory(sched, ref)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kind", ["euler", "ddim"])
def test_add_noise_matches_diffusers(kind, name):
    sched, ref = _pair(kind, name, 50)
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for i in (0, 20, 49):
        t = ref.timesteps[i : i + 1]
        torch.testing.assert_close(S.add_noise(sched, z, eps, i), ref.add_noise(z, eps, t), rtol=1e-5, atol=1e-6)


def test_linspace_euler_has_fractional_timesteps_and_interpolated_sigmas():
    sched, _ = _pair("euler", "epsilon-linspace", 7)
    ts = [S.model_timestep(sched, i) for i in range(7)]
    assert ts[0] == 999 and isinstance(ts[0], int) and isinstance(ts[1], float)  # 999 * 5/6 = 832.5
    full = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    lo = int(ts[1])
    assert full[lo] < sched.sigmas[1] < full[lo + 1]


def test_init_noise_sigma_depends_on_spacing():
    lead, _ = _pair("euler", "epsilon-leading (SDXL base)", 50)
    trail, _ = _pair("euler", "epsilon-trailing", 50)
    assert S.init_noise_sigma(lead) == pytest.approx(float((lead.sigmas[0] ** 2 + 1) ** 0.5))
    assert S.init_noise_sigma(trail) == pytest.approx(float(trail.sigmas[0]))
    assert S.init_noise_sigma(S.make_schedule("ddim", 50)) == 1.0


def test_zero_snr_rescale_matches_diffusers_and_ends_at_zero():
    from diffusers.schedulers.scheduling_euler_discrete import rescale_zero_terminal_snr

    betas = S.phase_betas(S.SDXL_SCHEDULER)
    ours = S.rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(ours, rescale_zero_terminal_snr(betas), rtol=0, atol=0)
    assert torch.cumprod(1 - ours, 0)[-1] == 0
    euler, _ = _pair("euler", "v-trailing-zero-snr", 10)
    assert euler.alphas_cumprod[-1] == 2**-24 and S.init_noise_sigma(euler) == pytest.approx(4096, rel=1e-4)


def test_phase_betas_own_table_is_diffusers_and_eta_is_the_family_exponent():
    for name in ("epsilon-leading (SDXL base)", "linear-betas"):
        cfg = S.SchedulerConfig.from_dict(CONFIGS[name])
        ref = EulerDiscreteScheduler.from_config(CONFIGS[name])
        assert torch.equal(S.phase_betas(cfg), ref.betas)
        own_eta = 0.5 if cfg.beta_schedule == "scaled_linear" else 1.0  # the family member that is the model's table
        torch.testing.assert_close(S.phase_betas(cfg, own_eta), ref.betas, rtol=1e-5, atol=1e-9)
    # The zero-SNR rescale comes after Scale-aware Scheduling's table.
    zsnr = S.SchedulerConfig.from_dict(CONFIGS["v-trailing-zero-snr"])
    sas = S.phase_betas(zsnr, 2.0)
    torch.testing.assert_close(sas, S.rescale_zero_terminal_snr(S.sas_betas(1000, 0.00085, 0.012, 2.0).float()))
    assert torch.cumprod(1 - sas, 0)[-1] == 0


def test_steps_are_stateless():
    """Stepping many patches at one timestep in any order gives the same result (no step counter)."""
    sched = S.make_schedule("euler", 50, eta=2.0)
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
