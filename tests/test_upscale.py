"""Upscaling an existing picture (`apt-dist upscale`, RenderConfig.init_image, render(init_latent=...)).

The tiny VAE has random weights, so an encode-then-decode round trip says nothing about the
code (it does not reproduce a picture); what is tested is that the tiled encode agrees with
an untiled encode to float32 rounding, that the latents follow diffusers' convention, and that
the upscaling path is the very code of a render (bit-identical from a render's own phase 1).
"""

import copy
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from helpers import small_config
from PIL import Image

from apt_dist import cli, render
from apt_dist.config import ConfigError, RenderConfig
from apt_dist.executor import InProcessExecutor
from apt_dist.init_image import MAX_INPUT_PIXELS, fit_image, load_image, prepare_pixels, scaled_size
from apt_dist.models import Denoiser, ModelSpec, build_tiny_pipeline, encode_prompt, model_info
from apt_dist.planning import build_plan
from apt_dist.reference import reference_render
from apt_dist.sampler import encode_image
from apt_dist.tiling import encode_tiled

TINY = ModelSpec("tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def denoiser():
    return Denoiser(TINY)


def _smooth_pixels(h: int, w: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([torch.sin(3 * x) * 0.8, torch.cos(2 * y) * 0.7, x * y])[None]


def _picture(path, w: int, h: int, mode: str = "RGB", fmt: str = "PNG"):
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([128 + 100 * np.sin(x / 13), 128 + 100 * np.cos(y / 9), 60 + 0 * x], -1).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        a = np.full((h, w), 255, np.uint8)
        a[: h // 4, : w // 4] = 0  # a transparent corner
        im = Image.fromarray(np.dstack([rgb, a]), "RGBA")
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


# ---- encoding -------------------------------------------------------------------------------------------------


def test_tiled_encode_agrees_with_untiled_encode_to_float32_rounding(denoiser):
    """The production encode (sampler.encode_image: shared encoder GroupNorm statistics, 16 latents of context)
    in 3 x 4 tiles gives the untiled encode's latents; without either part it does not."""
    image = _smooth_pixels(320, 448)  # latents 40 x 56; 448 px <= the statistics pass's 512: the image's own
    whole = denoiser.encode(image)
    cfg = RenderConfig(decode_tile=16, decode_overlap=4)
    tiled = encode_image(image, InProcessExecutor(denoiser), cfg, denoiser.info)
    # Measured (torch 2.13 CPU): 7e-7 max on latents up to 0.26, float32 rounding in other groupings.
    torch.testing.assert_close(tiled, whole, rtol=0, atol=5e-6)
    stats = denoiser.encoder_group_norm_stats(image)

    def fn(norm_stats):
        return lambda tiles: [denoiser.encode(t[None], norm_stats=norm_stats)[0] for t in tiles]

    no_sync = (encode_tiled(image, fn(None), 16, 4, 8, 16) - whole).abs().max().item()
    no_context = (encode_tiled(image, fn(stats), 16, 4, 8, 0) - whole).abs().max().item()
    assert no_sync > 0.05 and no_context > 0.05, (no_sync, no_context)  # measured 0.40 and 0.11


def test_encode_is_the_latent_distributions_mode_scaled_like_diffusers(denoiser):
    image = _smooth_pixels(64, 96)
    vae = build_tiny_pipeline().vae
    with torch.no_grad():
        posterior = vae.encode(image).latent_dist
    want = posterior.mean * vae.config.scaling_factor
    torch.testing.assert_close(denoiser.encode(image), want, rtol=0, atol=1e-6)
    assert torch.equal(denoiser.encode(image), denoiser.encode(image))  # the mode: no sampling


def test_encode_uses_the_vaes_latents_mean_and_std_where_its_config_has_them(denoiser):
    d = copy.copy(denoiser)
    d.vae = copy.deepcopy(denoiser.vae)
    mean, std = [0.5, -0.2, 0.1, 0.3], [2.0, 1.5, 0.5, 1.0]
    d.vae.register_to_config(latents_mean=mean, latents_std=std)
    image = _smooth_pixels(64, 64)
    with torch.no_grad():
        mode = d.vae.encode(image).latent_dist.mode()
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    z = d.encode(image)
    torch.testing.assert_close(z, (mode - m) * d.vae.config.scaling_factor / s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d._vae_input(z), mode, rtol=1e-5, atol=1e-5)  # decode's inverse


# ---- the image-to-image start ----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,strength", [(50, 0.3), (50, 0.75), (30, 1.0), (7, 0.5), (10, 0.05), (20, 0.0)])
def test_phase_one_start_step_is_diffusers_img2img(steps, strength):
    """Phase 1's steps and first timestep are those of StableDiffusionXLImg2ImgPipeline.get_timesteps."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    tiny = build_tiny_pipeline()
    pipe = StableDiffusionXLImg2ImgPipeline(**{k: v for k, v in tiny.components.items()
                                               if k not in ("image_encoder", "feature_extractor")})
    pipe.scheduler = copy.deepcopy(tiny.scheduler)
    pipe.scheduler.set_timesteps(steps)
    timesteps, n = pipe.get_timesteps(steps, strength, "cpu")
    info = model_info(TINY)  # the plan only: the model's facts, no weights
    cfg = RenderConfig(steps=steps, init_strength=strength, width=128, height=128)
    p1 = build_plan(cfg, info.native_window, info.vae_scale, info.scheduler, from_image=True).phases[0]
    assert p1.steps == n
    if n:
        assert p1.start_timestep == int(timesteps[0])


@pytest.mark.slow
def test_init_latent_of_a_renders_own_phase_one_reproduces_it_bit_identically():
    ex = InProcessExecutor()
    cfg = small_config(width=256, height=192)
    first = render(cfg, executor=ex, progress=False)
    again = render(cfg, executor=ex, progress=False, init_latent=first.phase_latents[0])
    assert again.plan.phases[0].steps == 0 and again.phases[0].patch_evals == 0  # no phase-1 sampling
    assert torch.equal(again.latent, first.latent)
    assert again.image.tobytes() == first.image.tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("scheduler,strength", [("euler", 0.5), ("ddim", 0.0), ("ddim", 1.0)])
def test_production_equals_reference_for_an_upscale(scheduler, strength, denoiser):
    cfg = small_config(width=256, height=192, scheduler=scheduler, init_strength=strength)
    info = denoiser.info
    p1 = build_plan(cfg, info.native_window, info.vae_scale, info.scheduler, from_image=True).phases[0]
    picture = torch.nn.functional.interpolate(_smooth_pixels(48, 64), size=(p1.height, p1.width), mode="bilinear")
    z = denoiser.encode(picture)
    result = render(cfg, executor=InProcessExecutor(denoiser), progress=False, init_latent=z)
    embeds = encode_prompt(TINY, cfg.prompt, cfg.negative_prompt, seed=cfg.seed)
    phases = reference_render(cfg, denoiser, embeds, init_latent=z)
    assert result.plan.phases[0].steps == int(cfg.steps * strength)
    torch.testing.assert_close(result.phase_latents[0], phases[0], rtol=0, atol=2e-4)
    torch.testing.assert_close(result.latent, phases[-1], rtol=0, atol=2e-4)
    if strength == 0:
        assert torch.equal(result.phase_latents[0], z)


def test_init_latent_of_the_wrong_shape_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"init_latent must be phase 1's latent.*\[1, 4, 12, 16\]"):
        render(small_config(width=256, height=192), init_latent=torch.zeros(1, 4, 16, 16), progress=False)


# ---- the picture: size, fit, conversions ------------------------------------------------------------------------


def test_scale_puts_phase_one_at_the_native_size_with_the_pictures_aspect():
    assert scaled_size((1024, 768), 4, 128, 8) == (4096, 3072)  # SDXL: 1024 x 768 -> 4096 x 3072
    assert scaled_size((600, 800), 2, 16, 8) == (192, 256)  # tiny, portrait
    info_native, vae = 16, 8
    w, h = scaled_size((200, 150), 3, info_native, vae)
    cfg = RenderConfig(width=w, height=h)
    phases = build_plan(cfg, info_native, vae).phases
    assert len(phases) == 3 and (phases[0].width, phases[0].height) == (128, 96)


def test_crop_and_pad_fit_the_target_aspect_centred():
    im = Image.new("RGB", (200, 100), (0, 0, 0))
    im.paste((255, 0, 0), (50, 0, 150, 100))  # a red centre square
    crop = fit_image(im, (256, 256), "crop")
    assert crop.size == (100, 100) and crop.getextrema() == ((255, 255), (0, 0), (0, 0))
    pad = fit_image(im, (256, 256), "pad")
    assert pad.size == (200, 200)
    assert pad.getpixel((0, 0)) == (255, 255, 255) and pad.getpixel((100, 100)) == (255, 0, 0)
    assert pad.getpixel((0, 50)) == (0, 0, 0)  # the picture, in the middle band


def test_transparency_is_composited_on_white_and_said(tmp_path):
    im, notes = load_image(_picture(tmp_path / "a.png", 64, 48, "RGBA"))
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
    assert notes == [f"{str(tmp_path / 'a.png')!r} has transparency (an alpha channel): composited on white"]
    opaque, notes = load_image(Image.new("RGBA", (8, 8), (10, 20, 30, 255)))
    assert opaque.getpixel((0, 0)) == (10, 20, 30) and not notes  # nothing to say


def test_sixteen_bit_and_cmyk_pictures_are_converted_and_said(tmp_path):
    arr = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 31).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    im, notes = load_image(tmp_path / "g16.png")
    assert im.mode == "RGB" and "16-bit" in notes[0] and "converted to 8-bit RGB" in notes[0]
    assert im.getpixel((63, 31))[0] == round(int(arr[31, 63]) / 257)
    _picture(tmp_path / "c.jpg", 32, 32, "CMYK", "JPEG")
    im, notes = load_image(tmp_path / "c.jpg")
    assert im.mode == "RGB" and notes and "CMYK image: converted to RGB" in notes[0]


def test_prepare_pixels_resizes_to_phase_one_in_minus_one_to_one(tmp_path):
    cfg = RenderConfig(width=256, height=192, init_image=str(_picture(tmp_path / "p.png", 200, 150)))
    p1 = build_plan(cfg, 16, 8).phases[0]
    x = prepare_pixels(cfg, p1)
    assert x.shape == (1, 3, 96, 128) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


# ---- bad input ---------------------------------------------------------------------------------------------------


def _png_header_only(path, w: int, h: int):
    """A PNG whose header says w x h (its pixels are never read): a huge picture without the bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _upscale(args, capsys):
    try:
        code = cli.main(["upscale", *map(str, args)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    _, err = capsys.readouterr()
    return code, err


@pytest.fixture
def no_models(monkeypatch):
    from apt_dist import models, sampler

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "Denoiser", boom)
    monkeypatch.setattr(models, "encode_prompt", boom)
    monkeypatch.setattr(sampler, "render", boom)


@pytest.mark.parametrize("case,expect", [
    ("not_an_image", "is not an image file Pillow can read"),
    ("missing", "does not exist"),
    ("absurdly_large", f"is 12000x12000 = 144000000 pixels, more than the {MAX_INPUT_PIXELS} (MAX_INPUT_PIXELS, 2**27)"),
    ("beyond_pillows_bound", f"is too large to read: more than {MAX_INPUT_PIXELS} pixels (MAX_INPUT_PIXELS, 2**27)"),
    ("larger_than_target", "300x300 is larger than the target 256x256"),
    ("other_aspect", "does not have the aspect of the target 256x256"),
    ("crop_larger_than_target", "after --crop) is larger than the target 256x256"),
    ("scale_and_width", "--scale: give --scale or --width/--height, not both"),
    ("width_only", "--height: give both --width and --height"),
    ("strength", "--init-strength: must be a number in [0, 1]"),
    ("scale_5", "argument --scale: invalid choice: 5"),
])
def test_bad_input_exits_2_with_one_line(case, expect, tmp_path, capsys, no_models):
    pic = _picture(tmp_path / "in.png", 128, 96)
    args = {
        "not_an_image": [tmp_path / "notes.png"],
        "missing": [tmp_path / "nope.png"],
        "absurdly_large": [_png_header_only(tmp_path / "huge.png", 12000, 12000)],
        "beyond_pillows_bound": [_png_header_only(tmp_path / "huger.png", 20000, 20000)],  # Pillow refuses it first
        "larger_than_target": [_picture(tmp_path / "sq.png", 300, 300), "--scale", "2"],
        "other_aspect": [pic, "--width", "256", "--height", "256"],
        "crop_larger_than_target": [_picture(tmp_path / "w.png", 400, 300), "--width", "256", "--height", "256", "--crop", "center"],
        "scale_and_width": [pic, "--scale", "2", "--width", "256"],
        "width_only": [pic, "--width", "256"],
        "strength": [pic, "--init-strength", "1.5"],
        "scale_5": [pic, "--scale", "5"],
    }[case]
    (tmp_path / "notes.png").write_text("not a picture")
    code, err = _upscale([*args, "--out", tmp_path / "o.png", "--no-progress"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and expect in err, err


def test_zero_sized_picture_is_refused():
    with pytest.raises(ConfigError, match=r"IMAGE: the given image is zero-sized \(0x0 pixels\)"):
        RenderConfig(init_image=Image.new("RGB", (0, 0))).validate()


# ---- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_upscale_command_writes_the_target_size_and_records_the_picture(tmp_path, capsys):
    import hashlib

    pic = _picture(tmp_path / "in.png", 128, 96, "RGBA")  # with transparency: said on stderr, and it goes on
    out = tmp_path / "big.png"
    code, err = _upscale([pic, "--prompt", "a harbour", "--scale", "2", "--steps", "4", "--shortcut-steps", "2",
                          "--driver-threads", "1", "--no-progress", "--out", out], capsys)
    assert code == 0, err
    assert "composited on white" in err
    img = Image.open(out)
    assert img.size == (256, 192)
    record = json.loads(img.text["input_image"])
    assert record == {"name": "in.png", "width": 128, "height": 96, "bytes": pic.stat().st_size,
                      "sha256": hashlib.sha256(pic.read_bytes()).hexdigest(), "of": "file"}
    cfg = json.loads(img.text["apt_dist_config"])
    assert cfg["init_image"] == record and cfg["init_strength"] == 0.0 and cfg["init_fit"] == "exact"
    assert json.loads(img.text["phases"]) == ["128x96", "256x192"]


@pytest.mark.slow
def test_non_square_picture_with_crop_center(tmp_path, capsys):
    pic = _picture(tmp_path / "wide.png", 200, 120)
    out = tmp_path / "sq.png"
    code, err = _upscale([pic, "--width", "256", "--height", "256", "--crop", "center", "--steps", "3",
                          "--shortcut-steps", "2", "--driver-threads", "1", "--no-progress", "--out", out], capsys)
    assert code == 0, err
    img = Image.open(out)
    assert img.size == (256, 256)
    assert json.loads(img.text["apt_dist_config"])["init_fit"] == "crop"


@pytest.mark.slow
def test_a_checkpoint_resumes_only_with_the_same_picture(tmp_path):
    pic = _picture(tmp_path / "in.png", 128, 96)
    cfg = small_config(width=256, height=192, steps=3, shortcut_steps=2, init_image=str(pic))
    ckpt = tmp_path / "run.ckpt"
    first = render(cfg, progress=False, checkpoint=str(ckpt))
    again = render(cfg, progress=False, checkpoint=str(ckpt))
    assert again.resumed_phases == 2 and torch.equal(again.latent, first.latent)
    _picture(pic, 128, 96, "L")  # another picture under the same name
    with pytest.raises(ConfigError, match=r"--checkpoint: .* was written for another render \(differs in: init_image\)"):
        render(cfg, progress=False, checkpoint=str(ckpt))
