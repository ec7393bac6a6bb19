"""Write a diffusers SDXL pipeline as ONE original-layout (Stability/A1111/ComfyUI) checkpoint, for tests.

The inverse of the key layout diffusers' single_file_utils reads: UNet under ``model.diffusion_model.``
(input/middle/output blocks), VAE under ``first_stage_model.`` (encoder.down / decoder.up, reversed), the CLIP-L text
encoder under ``conditioner.embedders.0.transformer.text_model.``, the OpenCLIP-style second one under
``conditioner.embedders.1.model.`` (fused q/k/v ``in_proj``, transposed ``text_projection``).
"""

from __future__ import annotations

import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    head, _, param = rest.rpartition(".")
    return dict(_RESNET).get(head, head) + "." + param


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    per = layers_per_block + 1
    up_has_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, t in state.items():
        parts = key.split(".")
        head = ".".join(parts[:2]) if ".".join(parts[:2]) in _UNET_TOP else parts[0]
        if head in _UNET_TOP:
            new = _UNET_TOP[head] + "." + parts[-1]
        elif parts[0] == "down_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + b * per + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * per + j}.1.{rest}"
            else:  # downsamplers.0.conv.X
                new = f"input_blocks.{1 + b * per + layers_per_block}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{b * per + j}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{b * per + j}.1.{rest}"
            else:  # upsamplers.0.conv.X
                new = f"output_blocks.{b * per + layers_per_block}.{2 if b in up_has_attention else 1}.conv.{parts[-1]}"
        else:
            raise KeyError(f"unexpected UNet key {key}")
        out["model.diffusion_model." + new] = t
    return out


def vae_to_ldm(state: dict, num_blocks: int) -> dict:
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, t in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            level = i if parts[1] == "down_blocks" else num_blocks - 1 - i
            side = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                new = f"{parts[0]}.{side}.{level}.block.{parts[4]}." + ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{parts[0]}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.conv.{parts[-1]}"
        elif len(parts) > 2 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            else:
                sub = ".".join(parts[4:-1])
                new = f"{parts[0]}.mid.attn_1.{attention[sub]}.{parts[-1]}"
                if t.ndim == 2:
                    t = t[:, :, None, None]  # the original layout's attention projections are 1x1 convs
        out["first_stage_model." + new] = t
    return out


def clip_l_to_ldm(state: dict) -> dict:
    return {"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): t
            for k, t in state.items() if not k.endswith("position_ids")}


def open_clip_to_ldm(state: dict) -> dict:
    prefix = "conditioner.embedders.1.model."
    out = {}
    top = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        k = key.removeprefix("text_model.")
        if k.endswith("position_ids"):
            continue
        if k in top:
            out[prefix + top[k]] = t
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = t.T.contiguous()
        elif k.startswith("encoder.layers."):
            parts = k.split(".")
            n, rest = parts[2], ".".join(parts[3:])
            base = f"{prefix}transformer.resblocks.{n}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(base + "attn.in_proj_" + parts[-1], {})[rest.split(".")[1]] = t
                continue
            rest = (rest.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
                    .replace("mlp.fc2", "mlp.c_proj").replace("self_attn.out_proj", "attn.out_proj"))
            out[base + rest] = t
        else:
            raise KeyError(f"unexpected text encoder key {key}")
    for name, d in qkv.items():
        out[name] = torch.cat([d["q_proj"], d["k_proj"], d["v_proj"]])
    return out


def pipeline_to_ldm(pipe) -> dict:
    """Every weight of a diffusers SDXL pipeline, in the original single-file layout."""
    out = {}
    out.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block))
    out.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    out.update(clip_l_to_ldm(pipe.text_encoder.state_dict()))
    out.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict()))
    return {k: v.detach().contiguous() for k, v in out.items()}
