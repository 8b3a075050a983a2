"""Interoperability with Hugging Face transformers' ``VitPoseForPoseEstimation``.

The transformers port is an independent implementation of the same network (separate q/k/v
projections, its own module names), so converting our weights to it and comparing heatmaps is a
strong check of our numerics; it is also what the throughput benchmark compares against.

Hugging Face directories (``config.json`` with ``model_type: vitpose`` + ``model.safetensors``, e.g.
usyd-community/vitpose-*) are read and written here with json + safetensors only, in both
directions; transformers itself is imported lazily, only by ``build_hf_model`` (a dev dependency).

ViTPose+ in transformers has the MoE backbone (``mlp.fc2`` + ``mlp.experts.N``) and a single
decoder; its ``dataset_index`` picks the expert. Such a directory becomes a single-decoder MoE
model here (``dataset_index`` picks the expert too); exporting a multi-decoder model writes one
dataset's decoder with every expert, and that dataset's index is the one to pass.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vitpose_core.keypoints import KEYPOINT_SETS, KeypointSet, canonical_name, get_keypoint_set
from vitpose_core.models.vitpose import VARIANTS, ViTPose, ViTPoseConfig

logger = logging.getLogger(__name__)

HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"
HF_MODEL_TYPE = "vitpose"
# our own key in an exported config.json (transformers keeps unknown keys): the full keypoint set
HF_KEYPOINT_SET_KEY = "vitpose_keypoint_set"
_CLASSIC_RENAMES = {"deconv_layers.0": "deconv1", "deconv_layers.1": "batchnorm1", "deconv_layers.3": "deconv2",
                    "deconv_layers.4": "batchnorm2", "final_layer": "conv"}


class HFFormatError(ValueError):
    """A Hugging Face VitPose directory (or a model to export as one) that cannot be converted."""


def _head_prefix(config: ViTPoseConfig, dataset: int) -> str:
    return "keypoint_head." if dataset == 0 or len(config.datasets) < 2 else f"associate_keypoint_heads.{dataset - 1}."


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ViTPoseConfig, dataset: int = 0) -> dict[str, torch.Tensor]:
    """Our (= official) ViTPose state dict -> transformers ``VitPoseForPoseEstimation`` state dict.

    MoE experts are carried over; of several decoders, dataset ``dataset``'s becomes ``head``.
    """
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
            for expert in range(config.num_experts):
                out[f"{theirs}mlp.experts.{expert}.{kind}"] = state[f"{ours}mlp.experts.{expert}.{kind}"]
    renames = _CLASSIC_RENAMES if config.decoder == "classic" else {"final_layer": "conv"}
    prefix = _head_prefix(config, dataset)
    for key, value in state.items():
        if key.startswith(prefix):
            module, _, param = key[len(prefix):].rpartition(".")
            out[f"head.{renames[module]}.{param}"] = value
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: ViTPoseConfig, source: str = "HF state dict"
                       ) -> dict[str, torch.Tensor]:
    """transformers ``VitPoseForPoseEstimation`` state dict -> ours (q/k/v fused into ``qkv``)."""
    def take(key: str) -> torch.Tensor:
        try:
            return state[key]
        except KeyError:
            raise HFFormatError(f"{source}: missing tensor {key}") from None

    out: dict[str, torch.Tensor] = {
        "backbone.pos_embed": take("backbone.embeddings.position_embeddings"),
        "backbone.patch_embed.proj.weight": take("backbone.embeddings.patch_embeddings.projection.weight"),
        "backbone.patch_embed.proj.bias": take("backbone.embeddings.patch_embeddings.projection.bias"),
        "backbone.last_norm.weight": take("backbone.layernorm.weight"),
        "backbone.last_norm.bias": take("backbone.layernorm.bias"),
    }
    for i in range(config.depth):
        ours, theirs = f"backbone.blocks.{i}.", f"backbone.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            # three projections -> one fused [q; k; v] (rows stacked in that order)
            out[f"{ours}attn.qkv.{kind}"] = torch.cat(
                [take(f"{theirs}attention.attention.{name}.{kind}") for name in ("query", "key", "value")], dim=0)
            out[f"{ours}attn.proj.{kind}"] = take(f"{theirs}attention.output.dense.{kind}")
            out[f"{ours}norm1.{kind}"] = take(f"{theirs}layernorm_before.{kind}")
            out[f"{ours}norm2.{kind}"] = take(f"{theirs}layernorm_after.{kind}")
            out[f"{ours}mlp.fc1.{kind}"] = take(f"{theirs}mlp.fc1.{kind}")
            out[f"{ours}mlp.fc2.{kind}"] = take(f"{theirs}mlp.fc2.{kind}")
            for expert in range(config.num_experts):
                out[f"{ours}mlp.experts.{expert}.{kind}"] = take(f"{theirs}mlp.experts.{expert}.{kind}")
    renames = _CLASSIC_RENAMES if config.decoder == "classic" else {"final_layer": "conv"}
    theirs_to_ours = {v: k for k, v in renames.items()}
    for key, value in state.items():
        if key.startswith("head."):
            module, _, param = key[len("head."):].rpartition(".")
            if module not in theirs_to_ours:
                raise HFFormatError(f"{source}: unexpected decoder tensor {key} for a "
                                    f"{config.decoder} decoder")
            out[f"keypoint_head.{theirs_to_ours[module]}.{param}"] = value
    return out


def is_hf_directory(path: str | Path) -> bool:
    """A directory holding a transformers VitPose ``config.json`` (``model_type: vitpose``)."""
    path = Path(path)
    config_file = path / HF_CONFIG_NAME
    if not (path.is_dir() and config_file.is_file()):
        return False
    try:
        record = json.loads(config_file.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and record.get("model_type") == HF_MODEL_TYPE


def _hf_keypoint_set(record: dict[str, Any], num_keypoints: int, source: str,
                     keypoint_set: KeypointSet | str | None) -> KeypointSet:
    """The keypoint set of an HF directory: given > our recorded set > id2label names > count (warned)."""
    if keypoint_set is not None:
        chosen = get_keypoint_set(keypoint_set) if isinstance(keypoint_set, str) else keypoint_set
    elif isinstance(record.get(HF_KEYPOINT_SET_KEY), dict):
        chosen = KeypointSet.from_dict(record[HF_KEYPOINT_SET_KEY], source=f"{source} {HF_KEYPOINT_SET_KEY}")
    else:
        labels = record.get("id2label") or {}
        names = [labels.get(str(i), labels.get(i)) for i in range(len(labels))] if isinstance(labels, dict) else []
        canonical = [canonical_name(str(n)) for n in names]
        chosen = next((s for s in KEYPOINT_SETS.values() if [canonical_name(n) for n in s.names] == canonical), None)
        if chosen is None:
            by_count = {17: "coco", 14: "aic", 16: "mpii", 133: "coco_wholebody"}
            if num_keypoints not in by_count:
                raise HFFormatError(f"{source}: {num_keypoints} keypoints and no keypoint names; pass keypoint_set=")
            chosen = KEYPOINT_SETS[by_count[num_keypoints]]
            logger.warning("%s: the directory does not name its keypoints; assuming the %s set (%d keypoints). "
                           "Pass keypoint_set= if it is another one", source, chosen.name, num_keypoints)
    if chosen.num_keypoints != num_keypoints:
        raise HFFormatError(f"{source}: the decoder predicts {num_keypoints} keypoints but keypoint set "
                            f"{chosen.name!r} has {chosen.num_keypoints}")
    return chosen


def read_hf_directory(path: str | Path, keypoint_set: KeypointSet | str | None = None
                      ) -> tuple[ViTPoseConfig, dict[str, torch.Tensor]]:
    """A transformers ``VitPoseForPoseEstimation`` directory -> (our config, our state dict)."""
    path = Path(path)
    source = str(path)
    try:
        record = json.loads((path / HF_CONFIG_NAME).read_bytes())
        state = load_file(str(path / HF_WEIGHTS_NAME))
    except FileNotFoundError as error:
        raise HFFormatError(f"{source}: a Hugging Face VitPose directory needs {HF_CONFIG_NAME} and "
                            f"{HF_WEIGHTS_NAME}; missing {Path(error.filename or '').name}") from None
    except Exception as error:  # json or safetensors errors
        raise HFFormatError(f"{source}: cannot read the Hugging Face directory: {' '.join(str(error).split())}") from None
    backbone = record.get("backbone_config")
    if not isinstance(backbone, dict):
        raise HFFormatError(f"{source}/{HF_CONFIG_NAME} has no backbone_config")
    try:
        width = int(backbone.get("hidden_size", 768))
        depth = int(backbone.get("num_hidden_layers", 12))
        heads = int(backbone.get("num_attention_heads", 12))
        mlp_ratio = backbone.get("mlp_ratio", 4)
        image_size = backbone.get("image_size", [256, 192])
        patch_size = backbone.get("patch_size", [16, 16])
        num_experts = int(backbone.get("num_experts", 1))
        part_features = int(backbone.get("part_features", 256))
    except (TypeError, ValueError) as error:
        raise HFFormatError(f"{source}/{HF_CONFIG_NAME}: malformed backbone_config: {error}") from None
    image_size = [image_size] * 2 if isinstance(image_size, int) else list(image_size)
    patch_size = [patch_size] * 2 if isinstance(patch_size, int) else list(patch_size)
    if patch_size[0] != patch_size[1]:
        raise HFFormatError(f"{source}: non-square patches {patch_size} are not supported")
    if backbone.get("hidden_act", "gelu") != "gelu" or int(record.get("scale_factor", 4)) != 4:
        raise HFFormatError(f"{source}: only GELU FFNs and x4 decoders are ViTPose "
                            f"(hidden_act={backbone.get('hidden_act')}, scale_factor={record.get('scale_factor')})")
    eps = float(backbone.get("layer_norm_eps", 1e-12))
    if abs(eps - 1e-6) > 1e-9:
        logger.warning("%s: layer_norm_eps is %g; this model uses ViTPose's 1e-6", source, eps)
    simple = bool(record.get("use_simple_decoder", True))
    final_key = "head.conv.weight"
    if final_key not in state:
        raise HFFormatError(f"{source}: {HF_WEIGHTS_NAME} has no {final_key} (not a VitPoseForPoseEstimation)")
    num_keypoints = int(state[final_key].shape[0])
    chosen = _hf_keypoint_set(record, num_keypoints, source, keypoint_set)
    variant = next((name for name, spec in VARIANTS.items() if (spec.embed_dim, spec.depth) == (width, depth)),
                   "custom")
    config = ViTPoseConfig(
        variant=variant, img_size=tuple(image_size), patch_size=patch_size[0], patch_padding=2, embed_dim=width,
        depth=depth, num_heads=heads, mlp_hidden_dim=int(width * mlp_ratio),
        qkv_bias=bool(backbone.get("qkv_bias", True)), decoder="simple" if simple else "classic",
        decoder_channels=256, keypoint_set=chosen, num_experts=num_experts if num_experts > 1 else 0,
        part_features=part_features if num_experts > 1 else 0)
    return config, from_hf_state_dict(state, config, source)


def hf_config_dict(config: ViTPoseConfig, dataset: int = 0) -> dict[str, Any]:
    """The ``config.json`` transformers needs for a VitPoseForPoseEstimation of ``config``'s architecture."""
    problems = []
    if config.attention != "full" or config.full_attention_blocks:
        problems.append(f"attention {config.attention!r} (transformers has full attention only)")
    if config.patch_padding != 2:
        problems.append(f"patch padding {config.patch_padding} (transformers pads by 2)")
    if config.mlp_hidden_dim % config.embed_dim:
        problems.append(f"FFN width {config.mlp_hidden_dim} is not a whole multiple of {config.embed_dim}")
    if config.decoder == "classic" and config.decoder_channels != 256:
        problems.append(f"classic decoder with {config.decoder_channels} channels (transformers' has 256)")
    if problems:
        raise HFFormatError("cannot express this model as a transformers VitPose: " + "; ".join(problems))
    keypoint_set = config.dataset_keypoint_sets()[dataset] if dataset < config.num_datasets else config.keypoint_set_data
    backbone = {
        "model_type": "vitpose_backbone", "image_size": list(config.img_size),
        "patch_size": [config.patch_size, config.patch_size], "num_channels": 3, "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
        "mlp_ratio": config.mlp_hidden_dim // config.embed_dim, "num_experts": max(1, config.num_experts),
        "part_features": config.part_features or 256, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
        "qkv_bias": config.qkv_bias, "out_indices": [config.depth],
    }
    return {
        "architectures": ["VitPoseForPoseEstimation"], "model_type": HF_MODEL_TYPE, "backbone_config": backbone,
        "use_simple_decoder": config.decoder == "simple", "scale_factor": 4,
        "id2label": {str(i): name for i, name in enumerate(keypoint_set.names)},
        "label2id": {name: i for i, name in enumerate(keypoint_set.names)},
        HF_KEYPOINT_SET_KEY: keypoint_set.to_dict(),
    }


def save_hf_directory(model: ViTPose, path: str | Path, dataset: int | str = 0) -> Path:
    """Write ``model`` as a transformers ``VitPoseForPoseEstimation`` directory (config.json + model.safetensors).

    A multi-decoder model contributes dataset ``dataset``'s decoder (all MoE experts are kept; with
    experts, transformers' ``dataset_index`` must then be that dataset's index).
    """
    from vitpose_core.checkpoint import unwrap_model

    model = unwrap_model(model)
    config: ViTPoseConfig = model.config
    index = config.dataset_index(dataset)
    if index >= config.num_datasets and not config.num_experts:
        raise HFFormatError(f"dataset {dataset!r} has no decoder in this model ({config.dataset_names})")
    record = hf_config_dict(config, index if index < config.num_datasets else 0)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    hf_state = to_hf_state_dict(state, config, index if index < config.num_datasets else 0)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / HF_WEIGHTS_NAME), metadata={"format": "pt"})
    (out / HF_CONFIG_NAME).write_text(json.dumps(record, indent=2))
    return out


__all__ = ["HFFormatError", "build_hf_model", "from_hf_state_dict", "hf_config_dict", "is_hf_directory",
           "read_hf_directory", "save_hf_directory", "to_hf_state_dict"]


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
        out_indices=[config.depth], hidden_act="gelu", num_experts=max(1, config.num_experts),
        part_features=config.part_features or 256,
    )
    hf_config = VitPoseConfig(backbone_config=backbone, use_simple_decoder=config.decoder == "simple",
                              num_labels=config.num_keypoints)
    model = VitPoseForPoseEstimation(hf_config)
    model.backbone.set_attn_implementation(attn_implementation)
    if state is not None:
        model.load_state_dict(to_hf_state_dict(state, config), strict=True)
    return model.eval()
