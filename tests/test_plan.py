"""The plan's arithmetic (no model): phases, shortcut, patch counts, barrier bounds."""

import pytest

from apt_dist import schedules as S
from apt_dist.config import ConfigError, RenderConfig
from apt_dist.planning import build_plan


def sdxl_plan(**kw):
    return build_plan(RenderConfig(**kw), native=128, vae_scale=8)


def test_4096_apt_and_demofusion_counts():
    apt = sdxl_plan(width=4096, height=4096)
    demo = sdxl_plan(width=4096, height=4096, method="demofusion")
    assert apt.unet_patch_evals == 3410
    assert demo.unet_patch_evals == 5650
    assert [p.patches_per_step for p in apt.phases] == [1, 13, 34, 65]


def test_shortcut_starts_every_upscaling_phase_at_581():
    p = sdxl_plan(width=3072, height=2048)
    assert p.phases[0].steps == 50 and p.phases[0].start_timestep == 981
    for ph in p.phases[1:]:
        assert ph.steps == 30 and ph.start_step == 20 and ph.start_timestep == 581
    demo = sdxl_plan(width=3072, height=2048, method="demofusion")
    assert all(ph.steps == 50 and ph.start_timestep == 981 for ph in demo.phases)


def test_eta_per_phase():
    p = sdxl_plan(width=128 * 8 * 6, height=128 * 8 * 6)
    assert [ph.eta for ph in p.phases] == [None, 2.0, 3.0, 3.5, 3.5, 3.5]  # None: the model's own table
    off = sdxl_plan(width=4096, height=4096, scale_aware_scheduling=False)
    assert {ph.eta for ph in off.phases} == {None}


def test_barrier_bounds_of_the_4096_plan():
    whole = sdxl_plan(width=4096, height=4096, view_batch_size=1, split_guidance=False)
    split = sdxl_plan(width=4096, height=4096, view_batch_size=1, split_guidance=True)
    assert whole.timing(8, 0.035)["bound_efficiency"] == pytest.approx(0.80, abs=0.01)
    assert whole.timing(16, 0.035)["bound_efficiency"] == pytest.approx(0.67, abs=0.01)
    assert split.timing(8, 0.035)["bound_efficiency"] == pytest.approx(0.90, abs=0.01)
    assert split.timing(16, 0.035)["bound_efficiency"] == pytest.approx(0.80, abs=0.01)
    assert split.timing(1, 0.035)["bound_efficiency"] == pytest.approx(1.0)


def test_small_render_is_one_phase():
    p = build_plan(RenderConfig(width=128, height=96), native=16, vae_scale=8)
    assert len(p.phases) == 1 and (p.phases[0].width, p.phases[0].height) == (128, 96)


@pytest.mark.parametrize("steps,upscale", [(50, 30), (10, 6), (4, 2), (1, 1), (25, 15)])
def test_shortcut_is_a_fraction_of_the_steps(steps, upscale):
    p = sdxl_plan(width=2048, height=2048, steps=steps)
    assert p.phases[1].steps == upscale and p.phases[1].start_step == steps - upscale == round(0.4 * steps)
    assert p.shortcut == 0.6 and p.to_dict()["upscale_steps"] == upscale


def test_shortcut_steps_override_the_fraction_and_demofusion_runs_all():
    p = sdxl_plan(width=2048, height=2048, steps=10, shortcut=0.6, shortcut_steps=3)
    assert p.phases[1].steps == 3 and p.phases[1].start_step == 7 and p.shortcut is None
    assert sdxl_plan(width=2048, height=2048, steps=10, shortcut=0.3).phases[1].steps == 3
    assert sdxl_plan(width=2048, height=2048, steps=10, method="demofusion").phases[1].steps == 10
    # A tiny fraction still runs one step.
    assert sdxl_plan(width=2048, height=2048, steps=10, shortcut=0.01).phases[1].steps == 1


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_shortcut_must_be_in_0_1(bad):
    with pytest.raises(ConfigError, match="--shortcut"):
        RenderConfig(shortcut=bad).validate()


def test_plan_uses_the_model_s_timesteps():
    trailing = S.SchedulerConfig.from_dict({**S.SDXL_SCHEDULER_DICT, "timestep_spacing": "trailing"})
    p = build_plan(RenderConfig(width=2048, height=2048, steps=10), 128, 8, trailing)
    assert p.phases[0].start_timestep == 999 and p.phases[1].start_timestep == 599  # trailing: 999, 899, ..., 99
    linspace = S.SchedulerConfig.from_dict({**S.SDXL_SCHEDULER_DICT, "timestep_spacing": "linspace"})
    p = build_plan(RenderConfig(width=2048, height=2048, steps=7), 128, 8, linspace)
    assert p.phases[1].start_step == 3 and p.phases[1].start_timestep == 499.5  # 999 * 3 / 6: fractional for Euler
    ddim = build_plan(RenderConfig(width=2048, height=2048, steps=7, scheduler="ddim"), 128, 8, linspace)
    assert ddim.phases[1].start_timestep == 500 and ddim.scheduler == "ddim"  # DDIM rounds (half to even)


def test_scheduler_auto_follows_the_model_s_class_and_refuses_others():
    ddim_model = S.SchedulerConfig.from_dict({**S.SDXL_SCHEDULER_DICT, "_class_name": "DDIMScheduler"})
    assert build_plan(RenderConfig(width=128, height=128), 16, 8, ddim_model).scheduler == "ddim"
    assert build_plan(RenderConfig(width=128, height=128), 16, 8).scheduler == "euler"
    dpm = S.SchedulerConfig.from_dict({**S.SDXL_SCHEDULER_DICT, "_class_name": "DPMSolverMultistepScheduler"})
    with pytest.raises(ConfigError, match=r"^--scheduler: .*DPMSolverMultistepScheduler.*--scheduler euler\|ddim"):
        build_plan(RenderConfig(width=128, height=128), 16, 8, dpm)
    assert build_plan(RenderConfig(width=128, height=128, scheduler="euler"), 16, 8, dpm).scheduler == "euler"


def test_apt_dist_plan_is_the_function_even_after_the_sampler_is_imported():
    import apt_dist
    import apt_dist.sampler
    from apt_dist import Plan, plan

    assert callable(plan) and apt_dist.plan is plan
    p = plan(RenderConfig(width=384, height=384))
    assert isinstance(p, Plan) and len(p.phases) == 3


def _optimum(weights, workers):
    """The least makespan of any assignment (brute force)."""
    import itertools

    best = float("inf")
    for who in itertools.product(range(workers), repeat=len(weights)):
        loads = [0.0] * workers
        for w, j in zip(weights, who):
            loads[j] += w
        best = min(best, max(loads))
    return best if weights else 0.0


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_lpt_makespan_is_the_optimum_for_equal_units_and_one_remainder(workers):
    from apt_dist.executor import makespan

    for n in range(7):
        for rest in range(1, 8):  # a remainder of 1-7 patches next to units of 8
            weights = [8.0] * n + [float(rest)]
            assert makespan(weights, workers) == _optimum(weights, workers), (weights, workers)
            assert makespan(weights, workers) == (-(-n // workers) * 8 if n % workers else n // workers * 8 + rest)


def test_lpt_makespan_is_the_optimum_when_no_worker_gets_two_units():
    import random

    from apt_dist.executor import makespan

    rng = random.Random(0)
    for _ in range(50):
        workers = rng.randint(1, 5)
        weights = [float(rng.randint(1, 16)) for _ in range(rng.randint(0, workers))]
        assert makespan(weights, workers) == _optimum(weights, workers) == max(weights, default=0.0)


def test_lpt_makespan_is_within_a_third_of_the_optimum_but_not_always_it():
    import random

    from apt_dist.executor import makespan

    rng = random.Random(1)
    for _ in range(200):
        workers = rng.randint(2, 3)
        weights = [float(rng.randint(1, 16)) for _ in range(rng.randint(workers + 1, 7))]
        opt = _optimum(weights, workers)
        assert opt <= makespan(weights, workers) <= opt * 4 / 3
    assert makespan([3, 3, 2, 2, 2], 2) == 7 and _optimum([3, 3, 2, 2, 2], 2) == 6  # so no lower bound in general


def test_lpt_shares_of_equal_units_differ_by_at_most_one_the_larger_first():
    from apt_dist.executor import lpt_shares

    shares = lpt_shares([1.0] * 10, 4)
    assert [len(s) for s in shares] == [3, 3, 2, 2]
    assert sorted(i for s in shares for i in s) == list(range(10))
    assert [len(s) for s in lpt_shares([0.0] * 5, 3)] == [2, 2, 1]  # weightless items too (VAE tiles)


def test_barrier_of_the_4096_plan_with_8_patches_per_call():
    p = sdxl_plan(width=4096, height=4096, view_batch_size=8, split_guidance=False)
    # The last phase's 65 patches (one shape) are 8 calls of 8 and one of 1: on 8 workers one of them takes 8 + 1.
    assert p.phases[-1].unit_rows == (16,) * 8 + (2,)
    assert [ph.unit_rows for ph in p.phases[:3]] == [(2,), (16, 10), (16,) * 4 + (4,)]
    t8, t16 = p.timing(8, 0.048), p.timing(16, 0.048)
    assert t8["step_patch_times"] == [1, 8, 8, 9] and t16["step_patch_times"] == [1, 8, 8, 8]
    assert t8["barrier_s"] == pytest.approx((50 * 1 + 30 * (8 + 8 + 9)) * 0.048)
    assert t16["barrier_s"] == pytest.approx((50 * 1 + 30 * (8 + 8 + 8)) * 0.048)
    assert p.timing(1, 0.048)["barrier_s"] == pytest.approx(p.timing(1, 0.048)["ideal_s"])
