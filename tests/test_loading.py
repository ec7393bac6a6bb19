"""Loading users' models: single files offline, LoRA, a separate VAE, an existing pipeline, one-line failures."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from ldm_layout import pipeline_to_ldm
from safetensors.torch import save_file

from apt_dist.loading import clip_bpe, sdxl_config_folder, write_sdxl_config_folder
from apt_dist.models import (
    Denoiser,
    ModelSpec,
    _tiny_unet_config,
    _tiny_vae_config,
    build_tiny_pipeline,
    encode_prompt,
    model_info,
)

TINY = ModelSpec("tiny", "float32", "cpu")


def tiny_config_folder(path):
    """A config folder for the tiny model (as the built-in one is for SDXL), with the tiny tokenizers."""
    src = build_tiny_pipeline()
    root = write_sdxl_config_folder(path, unet=_tiny_unet_config(), vae=_tiny_vae_config(),
                                    text_encoder=src.text_encoder.config.to_dict(),
                                    text_encoder_2=src.text_encoder_2.config.to_dict())
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(root / name)  # CLIP's vocabulary does not fit the tiny text encoders
        getattr(src, name).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def tiny_single_file(tmp_path_factory):
    """The tiny pipeline written as ONE original-layout SDXL checkpoint, and its config folder."""
    d = tmp_path_factory.mktemp("single")
    path = d / "tiny-sdxl.safetensors"
    save_file(pipeline_to_ldm(build_tiny_pipeline()), str(path))
    return str(path), str(tiny_config_folder(d / "config"))


def _latents(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_clip_vocabulary_is_built_like_clips_own():
    vocab, merges = clip_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_builtin_sdxl_config_folder_tokenizes_like_clip_and_holds_sdxl_configs():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from apt_dist.models import sdxl_unet_config

    folder = sdxl_config_folder()
    tok, tok2 = (CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2"))
    # CLIP's well-known ids for this prompt; the second tokenizer pads with '!' (0) like SDXL's.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]
    assert tok("a cat", padding="max_length", max_length=6).input_ids[-1] == 49407
    cfg = UNet2DConditionModel.load_config(folder, subfolder="unet")
    assert {k: cfg[k] for k in sdxl_unet_config()} == sdxl_unet_config()
    te2 = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
    assert (te2.hidden_size, te2.num_hidden_layers, te2.projection_dim) == (1280, 32, 1280)


def test_single_file_round_trip_offline_gives_the_tiny_models_weights_and_outputs(tiny_single_file, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    path, config = tiny_single_file
    spec = ModelSpec(path, "float32", "cpu", config=config)
    assert model_info(spec) == model_info(TINY)

    got, want = encode_prompt(spec, "a lighthouse at dusk", "fog"), encode_prompt(TINY, "a lighthouse at dusk", "fog")
    assert torch.equal(got.prompt_embeds, want.prompt_embeds) and torch.equal(got.pooled, want.pooled)

    den, ref = Denoiser(spec), Denoiser(TINY)
    for a, b in ((den.unet, ref.unet), (den.vae, ref.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    args = (_latents(1), 300, [(0, 0)], [1], want, (128, 128))
    # Same weights; the loaded UNet's float32 reductions may run in another order (its parameters' memory layout):
    # equal to float32 rounding.
    torch.testing.assert_close(den.predict(*args), ref.predict(*args), rtol=0, atol=1e-5)
    torch.testing.assert_close(den.decode(_latents(2)), ref.decode(_latents(2)), rtol=0, atol=1e-5)
    assert den.unet.config.cross_attention_dim == ref.unet.config.cross_attention_dim


# ---------------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------------


def make_tiny_lora(folder, seed=0, rank=4, unet_targets=("to_q", "to_k", "to_v", "to_out.0")):
    """A LoRA for the tiny model made in code: peft adapters on the UNet's attention projections and on the first
    text encoder's, with random non-zero lora_B (peft starts it at zero), saved the diffusers way."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    src = build_tiny_pipeline()
    unet, te = copy.deepcopy(src.unet), copy.deepcopy(src.text_encoder)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(unet_targets), init_lora_weights=False))
    # peft directly: transformers 5's add_adapter asks for a peft release newer than PyPI has
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                                       init_lora_weights=False), te)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(unet.named_parameters()) + list(te.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet),
                                                text_encoder_lora_layers=get_peft_model_state_dict(te))
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    return make_tiny_lora(tmp_path_factory.mktemp("lora"))


def one_phase(**kw):
    from apt_dist.config import RenderConfig

    return RenderConfig(**({"prompt": "a red lighthouse", "width": 128, "height": 128, "steps": 3, "seed": 5} | kw))


def _render(cfg, **kw):
    from apt_dist.sampler import render

    return render(cfg, progress=False, **kw)


def test_lora_changes_the_image_and_scale_zero_gives_the_image_without_it(tiny_lora):
    base = _render(one_phase())
    with_lora = _render(one_phase(loras=[tiny_lora]))
    zero = _render(one_phase(loras=[f"{tiny_lora}:0"]))
    assert (with_lora.latent - base.latent).abs().max() > 1e-2
    # Fusing at scale 0 adds 0 * (B @ A) to each weight: the weights, so the image, are bit for bit the same.
    assert torch.equal(zero.latent, base.latent)


def test_lora_is_fused_into_the_unet_and_text_encoders_and_then_removed(tiny_lora):
    from peft.tuners.tuners_utils import BaseTunerLayer

    den, ref = Denoiser(ModelSpec("tiny", "float32", "cpu", loras=(tiny_lora,))), Denoiser(TINY)
    assert not any(isinstance(m, BaseTunerLayer) for m in den.unet.modules())
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(den.unet.state_dict()[q], ref.unet.state_dict()[q])
    assert torch.equal(den.unet.conv_in.weight, ref.unet.conv_in.weight)  # layers without LoRA stay as they were
    with_lora = encode_prompt(ModelSpec("tiny", "float32", "cpu", loras=(tiny_lora,)), "a red lighthouse")
    without = encode_prompt(TINY, "a red lighthouse")
    assert not torch.equal(with_lora.prompt_embeds, without.prompt_embeds)
    assert torch.equal(with_lora.pooled, without.pooled)  # the LoRA has no layers in text_encoder_2


def test_lora_is_part_of_the_renders_identity(tiny_lora, tmp_path):
    import hashlib
    import os

    from apt_dist import checkpoint

    cfg = one_phase(loras=[f"{tiny_lora}:0.5"])
    (entry,) = cfg.to_dict()["lora_files"]
    data = open(tiny_lora, "rb").read()
    assert entry == {"file": os.path.basename(tiny_lora), "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "scale": 0.5}
    assert checkpoint.image_fields(cfg)["lora_files"] == [entry]
    assert checkpoint.image_fields(one_phase(loras=[f"{tiny_lora}:0.6"]))["lora_files"][0]["scale"] == 0.6


# ---------------------------------------------------------------------------------------------------------------------
# A separate VAE, an existing pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_separate_vae_folder_and_single_file_replace_the_models_vae(tmp_path):
    from diffusers import AutoencoderKL
    from ldm_layout import vae_to_ldm

    vae = AutoencoderKL(**_tiny_vae_config())  # other random weights than the tiny model's VAE
    vae.save_pretrained(tmp_path / "vae")
    save_file({k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(vae.state_dict(), 4).items()},
              str(tmp_path / "vae.safetensors"))
    z = _latents(3)
    want = Denoiser(TINY, unet=build_tiny_pipeline().unet, vae=vae).decode(z)
    for source in (tmp_path / "vae", tmp_path / "vae.safetensors"):
        den = Denoiser(ModelSpec("tiny", "float32", "cpu", vae=str(source)))
        torch.testing.assert_close(den.decode(z), want, rtol=0, atol=1e-6)
        assert not torch.equal(den.decode(z), Denoiser(TINY).decode(z))
    half = Denoiser(ModelSpec("tiny", "float32", "cpu", vae=str(tmp_path / "vae"), vae_dtype="bfloat16"))
    assert half.vae.dtype == torch.bfloat16 and half.decode(z).dtype == torch.float32


def test_pipe_renders_like_the_same_saved_folder_by_name(tmp_path):
    src = build_tiny_pipeline()
    src.save_pretrained(tmp_path / "tiny")
    by_name = _render(one_phase(model=str(tmp_path / "tiny")))
    by_pipe = _render(one_phase(model="ignored-with-pipe"), pipe=src)
    assert torch.equal(by_pipe.latent, by_name.latent)


# ---------------------------------------------------------------------------------------------------------------------
# Failures: one line, exit code 2 (bad input) or 1 (runtime), before any sampling
# ---------------------------------------------------------------------------------------------------------------------


def _cli(capsys, *args):
    from apt_dist.cli import main

    rc = main(["render", "--width", "128", "--height", "128", "--steps", "2", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line(err):
    """apt-dist's own error: one line, no traceback (library warnings, e.g. transformers' about torchvision, aside)."""
    ours = [line for line in err.splitlines() if line.startswith("apt-dist")]
    assert len(ours) == 1 and "Traceback" not in err, err
    return ours[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("folder") / "tiny"
    build_tiny_pipeline().save_pretrained(path)
    return path


def test_folder_that_is_not_an_sdxl_pipeline_names_the_missing_file(tmp_path, tiny_folder, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    (bad / "vae" / "config.json").unlink()
    rc, err = _cli(capsys, "--model", str(bad), "--out", str(tmp_path / "o.png"))
    assert rc == 2 and "is not a diffusers SDXL pipeline: vae/config.json is missing" in _one_line(err)
    assert not (tmp_path / "o.png").exists()


def test_truncated_weights_are_refused_before_loading(tmp_path, tiny_folder, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    rc, err = _cli(capsys, "--model", str(bad), "--out", str(tmp_path / "o.png"))
    assert rc == 2 and "unet weights" in _one_line(err) and "truncated" in err


def test_truncated_single_file_is_refused(tmp_path, tiny_single_file, capsys):
    path, config = tiny_single_file
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(open(path, "rb").read()[:5000])
    rc, err = _cli(capsys, "--model", str(bad), "--model-config", config, "--out", str(tmp_path / "o.png"))
    assert rc == 2 and "model file" in _one_line(err) and "not a readable .safetensors file" in err


def test_hub_id_not_in_the_cache_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rc, err = _cli(capsys, "--model", "someone/not-a-cached-model", "--out", str(tmp_path / "o.png"))
    assert rc == 2 and "is neither a local folder or file nor in the Hugging Face cache" in _one_line(err)


def test_lora_that_does_not_fit_names_the_layers(tmp_path, capsys):
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    bad = {f"unet.{layer}.lora_A.weight": torch.randn(4, 999), f"unet.{layer}.lora_B.weight": torch.randn(64, 4),
           "unet.no_such_block.proj.lora_A.weight": torch.randn(4, 8), "unet.no_such_block.proj.lora_B.weight": torch.randn(8, 4)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    rc, err = _cli(capsys, "--lora", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o.png"))
    assert rc == 2 and "does not fit this model" in _one_line(err)
    assert f"unet.{layer} (input 999, the model's 64)" in err and "unet.no_such_block.proj (no such layer)" in err


def test_vae_of_another_latent_size_is_refused(tmp_path, capsys):
    from diffusers import AutoencoderKL

    AutoencoderKL(**(_tiny_vae_config() | {"latent_channels": 16})).save_pretrained(tmp_path / "vae16")
    rc, err = _cli(capsys, "--vae", str(tmp_path / "vae16"), "--out", str(tmp_path / "o.png"))
    assert rc == 2 and "has 16 latent channels" in _one_line(err) and "needs 4" in err


def test_weights_found_corrupt_while_loading_give_one_line_and_debug_gives_the_traceback(tmp_path, tiny_folder, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    weights = bad / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 : 8 + n] = data[8 : 8 + n].replace(b'"F32"', b'"F64"', 1)  # a header that lies about a tensor
    weights.write_bytes(bytes(data))
    rc, err = _cli(capsys, "--model", str(bad), "--out", str(tmp_path / "o.png"))
    assert rc == 2 and "cannot load the text encoders" in _one_line(err) and "SafetensorError" in err
    rc, err = _cli(capsys, "--model", str(bad), "--out", str(tmp_path / "o.png"), "--debug")
    assert rc == 2 and "Traceback (most recent call last)" in err and "cannot load the text encoders" in err
