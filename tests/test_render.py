"""The in-process renderer end to end with the tiny model."""

import pytest
import torch
from helpers import small_config

from apt_dist import RenderConfig, render
from apt_dist.executor import DeferredPatches, InProcessExecutor
from apt_dist.models import build_tiny_pipeline
from apt_dist.sampler import RenderError


@pytest.fixture(scope="module")
def executor():
    return InProcessExecutor()


@pytest.fixture(scope="module")
def base_result(executor):
    return render(small_config(), executor=executor, progress=False)


@pytest.mark.slow
def test_three_phases_non_square(base_result):
    r = base_result
    assert r.image.size == (384, 288)
    assert [(p.width, p.height) for p in r.phases] == [(128, 96), (256, 192), (384, 288)]
    assert r.latent.shape == (1, 4, 36, 48)


@pytest.mark.slow
def test_same_seed_is_bit_identical_other_seed_differs(executor, base_result):
    again = render(small_config(), executor=executor, progress=False)
    assert torch.equal(again.latent, base_result.latent)
    assert again.image.tobytes() == base_result.image.tobytes()
    other = render(small_config(seed=8), executor=executor, progress=False)
    assert other.image.tobytes() != base_result.image.tobytes()


@pytest.mark.slow
def test_plan_counts_equal_executor_counts_and_shortcut_timesteps(executor):
    cfg = RenderConfig(prompt="x", width=256, height=192, steps=50)  # APT defaults: T0 = 30
    seen = []
    r = render(cfg, executor=executor, progress=False, callback=lambda ph, i, t: seen.append((ph, i, t)))
    assert executor.stats.patch_evals == r.plan.unet_patch_evals == r.patch_evals
    assert executor.stats.unet_calls == r.plan.unet_calls
    for phase in (2,):
        steps = [(i, t) for ph, i, t in seen if ph == phase]
        assert len(steps) == 30
        assert steps[0] == (20, 581) and steps[-1] == (49, 1)
    assert len([s for s in seen if s[0] == 1]) == 50
    for ph_plan, ph_stats in zip(r.plan.phases, r.phases):
        assert ph_plan.patch_evals == ph_stats.patch_evals


@pytest.mark.slow
def test_methods_and_ablations_change_the_image(executor, base_result):
    base = base_result.latent
    for change in (dict(method="demofusion", shortcut_steps=None), dict(statistical_matching=False),
                   dict(scale_aware_scheduling=False), dict(scheduler="ddim"), dict(jitter=False)):
        r = render(small_config(**change), executor=executor, progress=False)
        assert torch.isfinite(r.latent).all()
        assert not torch.equal(r.latent, base), change


@pytest.mark.slow
def test_work_unit_shape_does_not_change_the_math(executor, base_result):
    """Batching/splitting the guidance halves only regroups UNet rows: same image to float tolerance."""
    r = render(small_config(view_batch_size=4, split_guidance=False), executor=executor, progress=False)
    torch.testing.assert_close(r.latent, base_result.latent, atol=1e-3, rtol=1e-3)


class OrderedExecutor(InProcessExecutor):
    """Runs every unit of a step, then delivers them in another order and grouping, as remote workers may:
    the sub-lattices first, then the windows in pairs, last window first (`backwards`) or in order."""

    def __init__(self, backwards: bool):
        super().__init__()
        self.backwards = backwards

    def _run_units(self, timestep, units, patches, crops, deliver):
        outs = []
        super()._run_units(timestep, units, patches, crops, lambda ks, o: outs.extend(o))
        windows = len(patches.head) if isinstance(patches, DeferredPatches) else len(patches)
        lattices = [k for k, u in enumerate(units) if u.patches[0] >= windows]
        rest = [k for k in range(len(units)) if k not in lattices]
        if self.backwards:
            rest.reverse()
        for group in [lattices] + [rest[j : j + 2] for j in range(0, len(rest), 2)]:
            if group:
                deliver(group, [outs[k] for k in group])


@pytest.mark.slow
def test_replies_in_any_order_and_grouping_give_the_same_image(base_result):
    for backwards in (False, True):
        r = render(small_config(), executor=OrderedExecutor(backwards), progress=False)
        assert torch.equal(r.latent, base_result.latent), backwards


class NaNExecutor(InProcessExecutor):
    def __init__(self, at_phase_step):
        super().__init__()
        self.calls, self.at = 0, at_phase_step

    def predict(self, timestep, patches, crops, then=None):
        self.calls += 1
        if self.calls == self.at:  # poison patch 0's prediction on its way to the sampler
            inner = then or (lambda ks, eps: list(eps))
            def then(ks, eps):
                return inner(ks, eps * float("nan") if 0 in ks else eps)
        return super().predict(timestep, patches, crops, then)


def test_nan_stops_the_render_naming_phase_and_step():
    cfg = small_config()
    # Phase 1 has 6 steps, phase 2 starts at step 2 (T0 = 4): call 8 is phase 2, step 3.
    with pytest.raises(RenderError, match=r"phase 2 at step 3"):
        render(cfg, executor=NaNExecutor(8), progress=False)


@pytest.mark.slow
def test_render_from_a_saved_pretrained_folder_equals_tiny(tmp_path, executor, base_result):
    build_tiny_pipeline().save_pretrained(tmp_path / "tiny-sdxl")
    r = render(small_config(model=str(tmp_path / "tiny-sdxl")), progress=False)
    assert r.image.tobytes() == base_result.image.tobytes()


def test_one_phase_at_native_size(executor):
    r = render(RenderConfig(prompt="x", width=128, height=64, steps=4), executor=executor, progress=False)
    assert r.image.size == (128, 64) and len(r.phases) == 1
