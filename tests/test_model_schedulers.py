"""Models with their own scheduler configs: phase 1 equals diffusers' pipeline; multi-phase renders; refusals."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from apt_dist import RenderConfig, render
from apt_dist import schedules as S
from apt_dist.models import build_tiny_pipeline

SDXL = S.SDXL_SCHEDULER_DICT
# The configs of the parity test: class and scheduler config as a model folder ships them.
MODEL_CONFIGS = {
    "epsilon-leading": (EulerDiscreteScheduler, SDXL),  # SDXL base
    "epsilon-trailing": (EulerDiscreteScheduler, {**SDXL, "timestep_spacing": "trailing", "steps_offset": 0}),
    "v-trailing-zero-snr": (EulerDiscreteScheduler, {**SDXL, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
                                                     "rescale_betas_zero_snr": True}),
    "ddim-v-trailing-zero-snr": (DDIMScheduler, {**SDXL, "_class_name": "DDIMScheduler", "timestep_spacing": "trailing",
                                                 "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                                                 "set_alpha_to_one": False, "clip_sample": False}),
}


def save_tiny_with_scheduler(folder, cls, config: dict) -> str:
    """The tiny pipeline saved as a diffusers folder whose scheduler is `cls` with `config`."""
    src = build_tiny_pipeline()
    components = dict(src.components)
    components["scheduler"] = cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
    StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedulers")
    return {name: save_tiny_with_scheduler(root / name, cls, cfg) for name, (cls, cfg) in MODEL_CONFIGS.items()}


def test_saved_folders_carry_their_scheduler_config(folders):
    from apt_dist.models import ModelSpec, model_info

    info = model_info(ModelSpec(folders["ddim-v-trailing-zero-snr"]))
    sc = info.scheduler
    assert (sc.class_name, sc.prediction_type, sc.timestep_spacing, sc.rescale_betas_zero_snr) == (
        "DDIMScheduler", "v_prediction", "trailing", True)
    assert model_info(ModelSpec(folders["epsilon-leading"])).scheduler == S.SDXL_SCHEDULER


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_phase_one_equals_diffusers_pipeline(folders, name):
    """A one-phase render at the native size is diffusers' StableDiffusionXLPipeline on the same folder.

    Same initial noise (apt-dist's draw: a generator seeded with the render seed, randn of the latent shape;
    diffusers scales it by init_noise_sigma itself), same guidance, same steps. Tolerance atol 1e-4 + rtol 1e-4:
    both run the same float32 UNet, but apt-dist runs the two guidance branches as separate batch-1 calls and
    steps with its own stateless functions, so the two differ by float32 rounding, compounded over the steps
    (the v-prediction models start at sigma 4096, where one float32 ulp is 5e-4 and shrinks with sigma)."""
    folder, steps, guidance, seed = folders[name], 6, 5.0, 11
    cfg = RenderConfig(prompt="a lighthouse", width=128, height=128, model=folder, steps=steps,
                       guidance_scale=guidance, seed=seed, dtype="float32", device="cpu")
    ours = render(cfg, progress=False).latent

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is MODEL_CONFIGS[name][0]
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    theirs = pipe(prompt="a lighthouse", height=128, width=128, num_inference_steps=steps, guidance_scale=guidance,
                  latents=latents, output_type="latent", guidance_rescale=0.0).images
    assert ours.abs().max() > 0.1  # a real latent, not zeros
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_multi_phase_render_is_seeded_and_deterministic(folders, name):
    cfg = RenderConfig(prompt="a lighthouse", width=384, height=288, model=folders[name], steps=4, seed=3,
                       dtype="float32", device="cpu")
    a = render(cfg, progress=False)
    assert len(a.phases) == 3 and [p.steps for p in a.phases] == [4, 2, 2]  # shortcut 0.6 of 4 steps: 2
    assert torch.isfinite(a.latent).all()
    b = render(cfg, progress=False)
    assert torch.equal(a.latent, b.latent)
    import dataclasses

    c = render(dataclasses.replace(cfg, seed=4), progress=False)
    assert not torch.equal(a.latent, c.latent)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "apt_dist", *args], capture_output=True, text=True, timeout=120, check=False)


UNSUPPORTED = [
    ({"prediction_type": "flow"}, "scheduler config prediction_type='flow' is not supported; supported: epsilon, v_prediction, sample"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2' is not supported; supported: scaled_linear, linear"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas=True is not supported; supported: false"),
    ({"thresholding": True}, "thresholding=True is not supported; supported: false"),
    ({"timestep_spacing": "karras"}, "timestep_spacing='karras' is not supported; supported: leading, trailing, linspace"),
    ({"trained_betas": [0.001] * 1000}, "trained_betas"),
    ({"_class_name": "DPMSolverMultistepScheduler"}, "--scheduler: the model's scheduler is DPMSolverMultistepScheduler"),
]


def _folder_with(tmp_path, change: dict) -> str:
    folder = save_tiny_with_scheduler(tmp_path / "m", EulerDiscreteScheduler, SDXL)
    path = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return folder


@pytest.mark.parametrize("change,message", UNSUPPORTED, ids=[next(iter(c)) for c, _ in UNSUPPORTED])
def test_unsupported_scheduler_config_stops_a_render_before_any_model_loads(tmp_path, capsys, no_models, change, message):
    from apt_dist import cli

    folder = _folder_with(tmp_path, change)
    capsys.readouterr()  # saving the folder writes progress bars
    assert cli.main(["render", "--model", folder, "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("apt-dist render: error: --"), err


def test_unsupported_scheduler_config_through_apt_dist_plan_is_one_line_and_exit_2(tmp_path):
    r = _cli("plan", "--model", _folder_with(tmp_path, {"prediction_type": "flow"}))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        (f"apt-dist plan: error: --model: {tmp_path / 'm'}: scheduler config prediction_type='flow' is not supported; "
         "supported: epsilon, v_prediction, sample")]


def test_other_scheduler_class_runs_with_an_explicit_step(tmp_path, capsys):
    from apt_dist import cli

    folder = _folder_with(tmp_path, {"_class_name": "DPMSolverMultistepScheduler"})
    capsys.readouterr()
    assert cli.main(["plan", "--model", folder, "--scheduler", "ddim", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scheduler"] == "ddim"


@pytest.mark.parametrize("extra,upscale", [({}, 6), ({"shortcut_steps": 3}, 3), ({"shortcut": 0.3}, 3)])
def test_apt_with_10_steps_runs_the_shortcut_s_share_in_each_upscaling_phase(extra, upscale):
    seen = []
    cfg = RenderConfig(prompt="x", width=256, height=192, steps=10, **extra)
    r = render(cfg, progress=False, callback=lambda ph, i, t: seen.append((ph, i)))
    assert [i for ph, i in seen if ph == 1] == list(range(10))
    assert [i for ph, i in seen if ph == 2] == list(range(10 - upscale, 10))
    assert r.config.to_dict()["resolved"]["upscale_steps"] == upscale  # what the PNG metadata records
