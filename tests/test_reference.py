"""The production sampler against the plain reference sampler (apt_dist/reference.py), which defines the image.

Tolerance: the latents (values up to about 25) agree to 2e-4 absolute. The two do the same
arithmetic in another grouping: the production sampler sends UNet rows in work units (guidance
halves apart, several views per call) and guides with one lerp, where the reference runs
[uncond, cond] for one patch per call and guides as u + g (c - u). float32 convolutions and
matmuls round differently with the batch they run in, so single predictions differ in the last
bits (~1e-7 relative), and tens of steps carry that to about 4e-5 at most (measured). Every
change to the method that tests/mutation_check.py makes moves the latent by far more.
"""

import pytest
import torch
from helpers import small_config

from apt_dist import render
from apt_dist.executor import InProcessExecutor
from apt_dist.models import Denoiser, ModelSpec, encode_prompt
from apt_dist.reference import reference_render

ATOL = 2e-4

# Each dimension the issue names is covered: method, scheduler, square and not, jitter, 2 and 3 phases,
# guidance halves split or batched, and views per UNet call.
CASES = {
    "apt_euler_3phases_nonsquare": {},
    "demofusion_ddim_2phases_square_nojitter_batched": {"method": "demofusion", "shortcut_steps": None, "scheduler": "ddim",
                                                            "width": 256, "height": 256, "jitter": False, "split_guidance": False,
                                                            "view_batch_size": 4},
    "apt_ddim_3phases_square_views3": {"scheduler": "ddim", "width": 384, "height": 384, "split_guidance": False,
                                           "view_batch_size": 3},
    "demofusion_euler_2phases_nonsquare_views2": {"method": "demofusion", "shortcut_steps": None, "width": 256, "height": 192,
                                                      "view_batch_size": 2},
    "apt_euler_global_stats_nojitter": {"width": 256, "height": 256, "jitter": False, "sm_stats": "global"},
}


@pytest.fixture(scope="module")
def denoiser():
    return Denoiser(ModelSpec("tiny"))


def reference(cfg, denoiser):
    embeds = encode_prompt(ModelSpec(cfg.model, cfg.dtype, cfg.device), cfg.prompt, cfg.negative_prompt, seed=cfg.seed)
    return reference_render(cfg, denoiser, embeds)


def assert_same_image(latent, ref):
    assert latent.shape == ref.shape
    torch.testing.assert_close(latent, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(CASES))
def test_production_equals_reference(name, denoiser):
    cfg = small_config(**CASES[name])
    result = render(cfg, executor=InProcessExecutor(denoiser), progress=False)
    phases = reference(cfg, denoiser)
    assert len(result.plan.phases) == len(phases) == (2 if cfg.width == 256 else 3)
    assert_same_image(result.latent, phases[-1])


def test_reference_draws_every_phase_from_the_seed(denoiser):
    a = reference(small_config(width=256, height=256, steps=3, shortcut_steps=2), denoiser)
    b = reference(small_config(width=256, height=256, steps=3, shortcut_steps=2), denoiser)
    c = reference(small_config(width=256, height=256, steps=3, shortcut_steps=2, seed=8), denoiser)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[-1], c[-1], atol=1e-2)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_workers_equal_reference(denoiser):
    from apt_dist import RayExecutor

    cfg = small_config()
    with RayExecutor(num_workers=2) as ex:
        result = render(cfg, executor=ex, progress=False)
    assert_same_image(result.latent, reference(cfg, denoiser)[-1])


def test_v_prediction_trailing_zero_snr_model_equals_reference(tmp_path):
    """A model with its own scheduler config (v-prediction, trailing spacing, zero terminal SNR), three phases."""
    from test_model_schedulers import MODEL_CONFIGS, save_tiny_with_scheduler

    folder = save_tiny_with_scheduler(tmp_path / "vpred", *MODEL_CONFIGS["v-trailing-zero-snr"])
    denoiser = Denoiser(ModelSpec(folder))
    assert denoiser.info.scheduler.prediction_type == "v_prediction"
    cfg = small_config(model=folder)
    result = render(cfg, executor=InProcessExecutor(denoiser), progress=False)
    assert_same_image(result.latent, reference(cfg, denoiser)[-1])
