"""GPU-efficiency switches, checked on CPU for correctness: channels_last and --compile give the same outputs."""

import pytest
import torch

from apt_dist import render
from apt_dist.config import RenderConfig
from apt_dist.executor import InProcessExecutor
from apt_dist.models import Denoiser, ModelSpec, encode_prompt


def test_channels_last_unet_predicts_the_same_noise():
    spec = ModelSpec("tiny")
    plain, nhwc = Denoiser(spec, channels_last=False), Denoiser(spec, channels_last=True)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    embeds = encode_prompt(spec, "a lighthouse", "", 0)
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    args = (x, 500, [(0, 0)] * 4, [0, 1, 0, 1], embeds, (128, 128))
    torch.testing.assert_close(nhwc.predict(*args), plain.predict(*args), rtol=0, atol=1e-5)


def test_channels_last_is_the_default_on_cuda_only():
    assert not Denoiser(ModelSpec("tiny", device="cpu")).unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_compiled_unet_renders_the_same_image_to_tolerance():
    """One phase (one UNet input shape): the first compile of the tiny UNet took minutes on 2 busy cores."""
    cfg = RenderConfig(prompt="a lighthouse", width=128, height=128, steps=3, seed=3)
    eager = render(cfg, executor=InProcessExecutor(Denoiser(ModelSpec("tiny"))), progress=False)
    d = Denoiser(ModelSpec("tiny", compile=True))
    compiled = render(RenderConfig(**vars(cfg) | {"compile": True}), executor=InProcessExecutor(d), progress=False)
    assert d._unet_call is not d.unet and d.compile_seconds > 0
    torch.testing.assert_close(compiled.latent, eager.latent, rtol=0, atol=2e-4)
