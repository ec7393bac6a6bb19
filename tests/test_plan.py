"""The plan's arithmetic (no model): phases, shortcut, patch counts, barrier bounds."""

import pytest

from apt_dist.config import RenderConfig
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
    assert [ph.eta for ph in p.phases] == [0.5, 2.0, 3.0, 3.5, 3.5, 3.5]
    off = sdxl_plan(width=4096, height=4096, scale_aware_scheduling=False)
    assert {ph.eta for ph in off.phases} == {0.5}


def test_barrier_bounds_of_the_4096_plan():
    whole = sdxl_plan(width=4096, height=4096, split_guidance=False)
    split = sdxl_plan(width=4096, height=4096, split_guidance=True)
    assert whole.timing(8, 0.035)["bound_efficiency"] == pytest.approx(0.80, abs=0.01)
    assert whole.timing(16, 0.035)["bound_efficiency"] == pytest.approx(0.67, abs=0.01)
    assert split.timing(8, 0.035)["bound_efficiency"] == pytest.approx(0.90, abs=0.01)
    assert split.timing(16, 0.035)["bound_efficiency"] == pytest.approx(0.80, abs=0.01)
    assert split.timing(1, 0.035)["bound_efficiency"] == pytest.approx(1.0)


def test_small_render_is_one_phase():
    p = build_plan(RenderConfig(width=128, height=96), native=16, vae_scale=8)
    assert len(p.phases) == 1 and (p.phases[0].width, p.phases[0].height) == (128, 96)


def test_apt_dist_plan_is_the_function_even_after_the_sampler_is_imported():
    import apt_dist
    import apt_dist.sampler  # noqa: F401  (imports the planning module)
    from apt_dist import Plan, plan

    assert callable(plan) and apt_dist.plan is plan
    p = plan(RenderConfig(width=384, height=384))
    assert isinstance(p, Plan) and len(p.phases) == 3
