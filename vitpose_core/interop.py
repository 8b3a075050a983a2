"""Interoperability with Hugging Face transformers' ``VitPoseForPoseEstimation``.

The transformers port is an independent implementation of the same network (separate q/k/v
projections, its own module names), so converting our weights to it and comparing heatmaps is a
strong check of our numerics; it is also what the throughput benchmark compares against.
transformers is imported lazily: it is an optional dependency (``pip install -e .[bench]``).
"""

from __future__ import annotations

from typing import Any

import torch

from vitpose_core.models.vitpose import ViTPoseConfig


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ViTPoseConfig) -> dict[str, torch.Tensor]:
    """Our (= official) ViTPose state dict -> transformers ``VitPoseForPoseEstimation`` state dict."""
    out: dict[str, torch.Tensor] = {
        "backbone.embeddings.position_embeddings": state["backbone.pos_embed"],
        "backbone.embeddings.patch_embeddings.projection.weight": state["backbone.patch_embed.proj.weight"],
        "backbone.embeddings.patch_embeddings.projection.bias": state["backbone.patch_embed.proj.bias"],
        "backbone.layernorm.weight": state["backbone.last_norm.weight"],
        "backbone.layernorm.bias": state["backbone.last_norm.bias"],
    }
    width = config.embed_dim
    for i in range(config.depth):
        ours, theirs = f"backbone.blocks.{i}.", f"backbone.encoder.layer.{i}."
        # the fused qkv rows are [q; k; v] -> three separate projections
        for kind in ("weight", "bias"):
            fused = state[f"{ours}attn.qkv.{kind}"]
            for j, name in enumerate(("query", "key", "value")):
                out[f"{theirs}attention.attention.{name}.{kind}"] = fused[j * width:(j + 1) * width]
            out[f"{theirs}attention.output.dense.{kind}"] = state[f"{ours}attn.proj.{kind}"]
            out[f"{theirs}layernorm_before.{kind}"] = state[f"{ours}norm1.{kind}"]
            out[f"{theirs}layernorm_after.{kind}"] = state[f"{ours}norm2.{kind}"]
            out[f"{theirs}mlp.fc1.{kind}"] = state[f"{ours}mlp.fc1.{kind}"]
            out[f"{theirs}mlp.fc2.{kind}"] = state[f"{ours}mlp.fc2.{kind}"]
    if config.decoder == "classic":
        renames = {"deconv_layers.0": "deconv1", "deconv_layers.1": "batchnorm1", "deconv_layers.3": "deconv2",
                   "deconv_layers.4": "batchnorm2", "final_layer": "conv"}
    else:
        renames = {"final_layer": "conv"}
    for key, value in state.items():
        if key.startswith("keypoint_head."):
            rest = key[len("keypoint_head."):]
            module, _, param = rest.rpartition(".")
            out[f"head.{renames[module]}.{param}"] = value
    return out


def build_hf_model(config: ViTPoseConfig, state: dict[str, torch.Tensor] | None = None,
                   attn_implementation: str = "sdpa") -> Any:
    """A transformers ``VitPoseForPoseEstimation`` with the same architecture (and weights, if given).

    ``attn_implementation``: "sdpa" (fused) or "eager" (materialises the attention matrix, like the
    official ViTPose code).
    """
    if config.attention != "full" or config.patch_padding != 2:
        raise ValueError("transformers' ViTPose supports only full attention with the official patch padding")
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    backbone = VitPoseBackboneConfig(
        image_size=list(config.img_size), patch_size=[config.patch_size] * 2, hidden_size=config.embed_dim,
        num_hidden_layers=config.depth, num_attention_heads=config.num_heads,
        mlp_ratio=config.mlp_hidden_dim // config.embed_dim, qkv_bias=config.qkv_bias, layer_norm_eps=1e-6,
        out_indices=[config.depth], hidden_act="gelu",
    )
    hf_config = VitPoseConfig(backbone_config=backbone, use_simple_decoder=config.decoder == "simple",
                              num_labels=config.num_keypoints)
    model = VitPoseForPoseEstimation(hf_config)
    model.backbone.set_attn_implementation(attn_implementation)
    if state is not None:
        model.load_state_dict(to_hf_state_dict(state, config), strict=True)
    return model.eval()
