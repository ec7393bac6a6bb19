"""Tests of apt_dist.models: the built-in tiny SDXL, prompt encoding, the Denoiser, loading a saved folder."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from apt_dist import models
from apt_dist.models import (
    BUILTIN_MODELS,
    DTYPES,
    Denoiser,
    ModelInfo,
    ModelSpec,
    PromptEmbeddings,
    build_tiny_pipeline,
    check_model_name,
    encode_prompt,
    model_info,
    sdxl_unet_config,
    sdxl_vae_config,
)
from apt_dist.schedules import SDXL_SCHEDULER

TINY = ModelSpec("tiny", "float32", "cpu")


@pytest.fixture(scope="module")
def tiny_denoiser() -> Denoiser:
    return Denoiser(TINY)


@pytest.fixture(scope="module")
def tiny_embeds() -> PromptEmbeddings:
    return encode_prompt(TINY, "a lighthouse at dusk")


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_pipeline().save_pretrained(str(path))
    return str(path)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------------
# ModelSpec / check_model_name
# --------------------------------------------------------------------------------------------------------------------


def test_model_spec_defaults_and_resolution():
    spec = ModelSpec()
    assert (spec.name, spec.dtype, spec.device) == ("tiny", "auto", "auto")
    assert pickle.loads(pickle.dumps(spec)) == spec
    cpu = ModelSpec(device="cpu")
    assert cpu.torch_device() == torch.device("cpu")
    assert cpu.torch_dtype() == torch.float32  # auto on cpu
    assert ModelSpec(dtype="bfloat16", device="cpu").torch_dtype() == torch.bfloat16
    assert ModelSpec(dtype="float16", device="cuda:1").torch_device() == torch.device("cuda", 1)
    assert ModelSpec(device="cuda").torch_dtype() == torch.float16  # auto on cuda
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ModelSpec().torch_device().type == expected
    assert BUILTIN_MODELS == ("tiny", "sdxl-random")
    assert DTYPES == ("auto", "float32", "float16", "bfloat16")
    with pytest.raises(ValueError):
        ModelSpec(dtype="float64")
    with pytest.raises(ValueError):
        ModelSpec(device="gpu7")


def test_check_model_name(tmp_path):
    for name in BUILTIN_MODELS:
        check_model_name(name)
    check_model_name("org/name")  # a hub id: not checked locally
    check_model_name(str(tmp_path))  # an existing folder
    existing = tmp_path / "model.safetensors"
    existing.write_bytes(b"")
    check_model_name(str(existing))
    for bad in ("./nope", "/nope/x", "x.safetensors", "~/no-such-model-dir-xyz", "a/b/c", "m.ckpt"):
        with pytest.raises(ValueError) as info:
            check_model_name(bad)
        assert bad in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        check_model_name("")


# --------------------------------------------------------------------------------------------------------------------
# The tiny model
# --------------------------------------------------------------------------------------------------------------------


def test_tiny_build_is_deterministic_and_keeps_global_rng():
    first = build_tiny_pipeline()
    assert build_tiny_pipeline() is first  # cached per process
    weights = {name: _state(getattr(first, name)) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    rng_before = torch.get_rng_state()
    build_tiny_pipeline.cache_clear()
    try:
        second = build_tiny_pipeline()
        assert torch.equal(torch.get_rng_state(), rng_before)  # building leaves the global RNG alone
        assert second is not first
        for name, state in weights.items():
            other = getattr(second, name).state_dict()
            assert state.keys() == other.keys()
            for key, value in state.items():
                assert torch.equal(value, other[key]), f"{name}.{key} differs between builds"
    finally:
        build_tiny_pipeline.cache_clear()
    # and the weights are random, not constant
    conv = weights["unet"]["conv_in.weight"]
    assert conv.std() > 0


def test_tiny_architecture_matches_model_info():
    pipe = build_tiny_pipeline()
    info = model_info(TINY)
    assert info == ModelInfo(
        native_window=16,
        vae_scale=8,
        latent_channels=4,
        vae_scaling_factor=0.13025,
        scheduler=SDXL_SCHEDULER,
        force_zeros_for_empty_prompt=True,
    )
    assert pipe.unet.config.sample_size == info.native_window
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.tokenizer.model_max_length == 77
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_diffusers_pipeline_runs_with_tiny_components():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    shared = build_tiny_pipeline()
    components = dict(shared.components)
    components["scheduler"] = EulerDiscreteScheduler.from_config(shared.scheduler.config)  # do not touch the cached one
    pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    latents = pipe(
        "a cat", num_inference_steps=2, height=128, width=128, output_type="latent", generator=generator
    ).images
    assert latents.shape == (1, 4, 16, 16)
    assert torch.isfinite(latents).all()
    images = pipe("a cat", num_inference_steps=2, height=128, width=128, output_type="pt").images
    assert images.shape == (1, 3, 128, 128)


# --------------------------------------------------------------------------------------------------------------------
# encode_prompt
# --------------------------------------------------------------------------------------------------------------------


def test_tokenizer_is_offline_and_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_tiny_pipeline().tokenizer
    ids = tok("A cat, on a mat!", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0].item() == tok.bos_token_id and tok.eos_token_id in ids[0].tolist()
    assert tok.decode(ids[0], skip_special_tokens=True) == "a cat , on a mat !"
    tok.save_pretrained(str(tmp_path))
    again = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids2 = again("A cat, on a mat!", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ids2)


def test_encode_prompt_shapes_zeros_and_determinism(tiny_embeds):
    e = tiny_embeds
    assert e.prompt_embeds.shape == (2, 77, 96) and e.pooled.shape == (2, 32)
    assert e.prompt_embeds.dtype == torch.float32 and e.pooled.dtype == torch.float32
    assert e.prompt_embeds.device.type == "cpu"
    assert torch.count_nonzero(e.prompt_embeds[0]) == 0 and torch.count_nonzero(e.pooled[0]) == 0
    assert e.prompt_embeds[1].abs().sum() > 0 and e.pooled[1].abs().sum() > 0
    again = encode_prompt(TINY, "a lighthouse at dusk")
    assert torch.equal(again.prompt_embeds, e.prompt_embeds) and torch.equal(again.pooled, e.pooled)
    other = encode_prompt(TINY, "a red bicycle")
    assert not torch.allclose(other.prompt_embeds[1], e.prompt_embeds[1])
    assert not torch.allclose(other.pooled[1], e.pooled[1])
    negative = encode_prompt(TINY, "a lighthouse at dusk", negative_prompt="blurry")
    assert torch.equal(negative.prompt_embeds[1], e.prompt_embeds[1])
    assert negative.prompt_embeds[0].abs().sum() > 0
    assert not torch.allclose(negative.prompt_embeds[0], negative.prompt_embeds[1])


def test_encode_prompt_matches_manual_sdxl_encoding():
    """Independent check of the SDXL recipe: penultimate hidden states of both encoders, pooled of text_encoder_2."""
    pipe = build_tiny_pipeline()
    e = encode_prompt(TINY, "a cat", negative_prompt="a dog")
    for row, text in ((0, "a dog"), (1, "a cat")):
        hidden = []
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        torch.testing.assert_close(e.prompt_embeds[row], torch.cat(hidden, dim=-1)[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(e.pooled[row], out.text_embeds[0], rtol=0, atol=1e-6)


def test_encode_prompt_equals_full_pipeline_encode_prompt(tiny_embeds):
    """Same numbers as diffusers' own StableDiffusionXLPipeline.encode_prompt on the full tiny pipeline."""
    pipe = build_tiny_pipeline()
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt("a lighthouse at dusk", device=torch.device("cpu"))
    assert torch.equal(tiny_embeds.prompt_embeds, torch.cat([npe, pe]))
    assert torch.equal(tiny_embeds.pooled, torch.cat([npooled, pooled]))


def test_sdxl_random_embeddings():
    spec = ModelSpec("sdxl-random", "float32", "cpu")
    e = encode_prompt(spec, "a cat", seed=3)
    assert e.prompt_embeds.shape == (2, 77, 2048) and e.pooled.shape == (2, 1280)
    assert e.prompt_embeds.dtype == torch.float32
    assert torch.count_nonzero(e.prompt_embeds[0]) == 0
    again = encode_prompt(spec, "a cat", seed=3)
    assert torch.equal(again.prompt_embeds, e.prompt_embeds) and torch.equal(again.pooled, e.pooled)
    assert not torch.equal(encode_prompt(spec, "a cat", seed=4).prompt_embeds[1], e.prompt_embeds[1])
    assert encode_prompt(spec, "a cat", "ugly", seed=3).prompt_embeds[0].abs().sum() > 0
    assert model_info(spec).native_window == 128 and model_info(spec).vae_scaling_factor == 0.13025


# --------------------------------------------------------------------------------------------------------------------
# Denoiser
# --------------------------------------------------------------------------------------------------------------------


def _latents(batch: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


def test_denoiser_does_not_share_modules_with_cached_pipeline(tiny_denoiser):
    pipe = build_tiny_pipeline()
    assert tiny_denoiser.unet is not pipe.unet and tiny_denoiser.vae is not pipe.vae
    assert tiny_denoiser.unet.conv_in.weight.data_ptr() != pipe.unet.conv_in.weight.data_ptr()
    assert not any(p.requires_grad for p in tiny_denoiser.unet.parameters())
    assert not tiny_denoiser.unet.training and not tiny_denoiser.vae.training
    assert tiny_denoiser.info == model_info(TINY)


def test_predict_shapes_and_dtype(tiny_denoiser, tiny_embeds):
    x = _latents(3, 16)
    out = tiny_denoiser.predict(x, 999, [(0, 0)] * 3, [0, 1, 1], tiny_embeds, (128, 128))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and out.std() > 0
    # a non-square window works too
    wide = tiny_denoiser.predict(torch.randn(1, 4, 16, 24), 500, [(0, 64)], [1], tiny_embeds, (128, 192))
    assert wide.shape == (1, 4, 16, 24)
    with pytest.raises(ValueError):
        tiny_denoiser.predict(x, 999, [(0, 0)] * 2, [0, 1, 1], tiny_embeds, (128, 128))


def test_predict_uses_crop_conditioning(tiny_denoiser, tiny_embeds):
    x = _latents(1).repeat(2, 1, 1, 1)
    out = tiny_denoiser.predict(x, 500, [(0, 0), (64, 128)], [1, 1], tiny_embeds, (256, 256))
    assert (out[0] - out[1]).abs().max() > 1e-4
    sized = tiny_denoiser.predict(x[:1], 500, [(0, 0)], [1], tiny_embeds, (512, 512))
    assert (out[0] - sized[0]).abs().max() > 1e-4  # original_size is wired too
    # and the timestep matters
    later = tiny_denoiser.predict(x[:1], 10, [(0, 0)], [1], tiny_embeds, (256, 256))
    assert (out[0] - later[0]).abs().max() > 1e-4


def test_predict_branches_select_prompt_rows(tiny_denoiser):
    embeds = encode_prompt(TINY, "a cat", negative_prompt="a dog")  # both rows non-trivial
    x = _latents(2, seed=1)
    both = tiny_denoiser.predict(x, 700, [(0, 0), (8, 16)], [0, 1], embeds, (256, 256))
    u = tiny_denoiser.predict(x[:1], 700, [(0, 0)], [0], embeds, (256, 256))
    c = tiny_denoiser.predict(x[1:], 700, [(8, 16)], [1], embeds, (256, 256))
    torch.testing.assert_close(both, torch.cat([u, c]), rtol=0, atol=1e-5)
    swapped = tiny_denoiser.predict(x, 700, [(0, 0), (8, 16)], [1, 0], embeds, (256, 256))
    assert (swapped - both).abs().max() > 1e-4


def test_predict_matches_diffusers_unet_call(tiny_denoiser, tiny_embeds):
    """Same as the pipeline's own UNet call (time_ids = original_size + crop + target_size)."""
    unet = build_tiny_pipeline().unet
    x = _latents(2, seed=2)
    branches = [0, 1]
    time_ids = torch.tensor([[128, 192, 0, 0, 128, 192], [128, 192, 16, 32, 128, 192]], dtype=torch.float32)
    with torch.no_grad():
        ref = unet(
            x,
            torch.tensor(400),
            encoder_hidden_states=tiny_embeds.prompt_embeds[branches],
            added_cond_kwargs={"text_embeds": tiny_embeds.pooled[branches], "time_ids": time_ids},
        ).sample
    out = tiny_denoiser.predict(x, 400, [(0, 0), (16, 32)], branches, tiny_embeds, (128, 192))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_decode_shape_and_range(tiny_denoiser):
    x = _latents(2, 16) * 4
    img = tiny_denoiser.decode(x)
    assert img.shape == (2, 3, 128, 128) and img.dtype == torch.float32 and img.device.type == "cpu"
    assert img.min() >= -1 and img.max() <= 1 and img.std() > 0
    single = tiny_denoiser.decode(torch.randn(1, 4, 8, 12))
    assert single.shape == (1, 3, 64, 96)
    # divides by the scaling factor before the VAE
    vae = build_tiny_pipeline().vae
    with torch.no_grad():
        ref = vae.decode(x / 0.13025).sample.clamp(-1, 1)
    torch.testing.assert_close(img, ref, rtol=0, atol=1e-6)


def test_half_precision_unet_keeps_vae_float32(tiny_embeds):
    denoiser = Denoiser(ModelSpec("tiny", "bfloat16", "cpu"))
    assert denoiser.unet.dtype == torch.bfloat16 and denoiser.vae.dtype == torch.float32
    out = denoiser.predict(_latents(1), 999, [(0, 0)], [1], tiny_embeds, (128, 128))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert build_tiny_pipeline().unet.dtype == torch.float32  # the cached pipeline was not cast


# --------------------------------------------------------------------------------------------------------------------
# A saved diffusers folder behaves exactly like the built-in tiny model
# --------------------------------------------------------------------------------------------------------------------


def test_saved_folder_equals_tiny(saved_tiny, tiny_denoiser, tiny_embeds):
    spec = ModelSpec(name=saved_tiny, dtype="float32", device="cpu")
    check_model_name(saved_tiny)
    assert model_info(spec) == model_info(TINY)

    embeds = encode_prompt(spec, "a lighthouse at dusk")
    torch.testing.assert_close(embeds.prompt_embeds, tiny_embeds.prompt_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(embeds.pooled, tiny_embeds.pooled, rtol=0, atol=1e-6)
    neg = encode_prompt(spec, "a cat", "a dog")
    ref = encode_prompt(TINY, "a cat", "a dog")
    torch.testing.assert_close(neg.prompt_embeds, ref.prompt_embeds, rtol=0, atol=1e-6)

    denoiser = Denoiser(spec)
    x = _latents(2, seed=5)
    args = (x, 600, [(0, 0), (8, 8)], [0, 1], tiny_embeds, (192, 192))
    torch.testing.assert_close(denoiser.predict(*args), tiny_denoiser.predict(*args), rtol=0, atol=1e-6)
    torch.testing.assert_close(denoiser.decode(x), tiny_denoiser.decode(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# SDXL configs (meta device only: never build real SDXL weights in tests)
# --------------------------------------------------------------------------------------------------------------------


def test_sdxl_configs_have_sdxl_sizes():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_unet_config())
        vae = AutoencoderKL.from_config(sdxl_vae_config())
    n_unet = sum(p.numel() for p in unet.parameters())
    assert 2.5e9 < n_unet < 2.6e9
    assert 80e6 < sum(p.numel() for p in vae.parameters()) < 90e6
    assert unet.config.sample_size == 128 and unet.config.cross_attention_dim == 2048
    assert unet.add_embedding.linear_1.in_features == 2816  # 6 * 256 + 1280 pooled
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.scaling_factor == 0.13025
    info = model_info(ModelSpec("sdxl-random"))
    assert (info.native_window, info.vae_scale, info.latent_channels) == (128, 8, 4)
    # the config dicts are fresh copies: mutating one does not leak into the next call
    cfg = sdxl_unet_config()
    cfg["block_out_channels"].append(1)
    assert sdxl_unet_config()["block_out_channels"] == [320, 640, 1280]


def test_build_random_is_deterministic_on_target_dtype():
    """The sdxl-random builder, exercised on the tiny UNet config (SDXL itself is too big for a CPU test)."""
    from diffusers import UNet2DConditionModel

    cfg = models._tiny_unet_config()
    rng_before = torch.get_rng_state()
    a = models._build_random(UNet2DConditionModel, cfg, 7, torch.device("cpu"), torch.bfloat16)
    b = models._build_random(UNet2DConditionModel, copy.deepcopy(cfg), 7, torch.device("cpu"), torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_default_dtype() == torch.float32
    assert a.dtype == torch.bfloat16 and not any(p.requires_grad for p in a.parameters())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


