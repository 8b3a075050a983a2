"""Checkpoint I/O: the project's own format and official ViTPose (mmpose) ``.pth`` files.

Own format: a directory holding ``model.safetensors`` (weights; the model config is also stored in
the safetensors metadata) and ``config.json`` (the ``ViTPoseConfig`` that rebuilds the model, plus
free-form ``metadata`` such as the training run, dataset and metrics).

Official format: ``{'state_dict': {'backbone.*': ..., 'keypoint_head.*': ...}}`` read with
``torch.load(weights_only=True)``; our module names equal the official ones, so keys map 1:1.
Multi-dataset files (ViTPose+) carry ``associate_keypoint_heads.*`` and some carry
``backbone.cls_token``: those are skipped with a warning. Any other key that is missing, unexpected
or mis-shaped is an error that names it -- except ``backbone.pos_embed``, which is resized
bicubically when the checkpoint was trained at another resolution.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from vitpose_core.errors import InvalidInputError
from vitpose_core.models.vitpose import VARIANTS, ViTPose, ViTPoseConfig, build_model_from_config

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
SKIPPED_OFFICIAL_PREFIXES = ("backbone.cls_token", "associate_keypoint_heads.")


class CheckpointError(InvalidInputError):
    """A checkpoint is unreadable or does not fit the model; the message names the file or the offending keys."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP/FSDP/compile wrappers (``.module`` / ``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` in the project's format to directory ``path``; returns the directory."""
    model = unwrap_model(model)
    config: ViTPoseConfig = model.config
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config_json = config.model_dump(mode="json")
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"vitpose_config": json.dumps(config_json),
                                                             "format_version": str(FORMAT_VERSION)})
    record = {"format_version": FORMAT_VERSION, "model": config_json, "metadata": metadata or {}}
    (out_dir / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
    return out_dir


def _own_format_paths(path: Path) -> tuple[Path, Path | None] | None:
    if path.is_dir() and (path / WEIGHTS_NAME).exists():
        return path / WEIGHTS_NAME, path / CONFIG_NAME
    if path.is_file() and path.suffix == ".safetensors":
        sibling = path.parent / CONFIG_NAME
        return path, sibling if sibling.exists() else None
    return None


def read_checkpoint_config(path: str | Path) -> tuple[ViTPoseConfig | None, dict[str, Any]]:
    """The model config and metadata of an own-format checkpoint (None for official files)."""
    path = Path(path)
    own = _own_format_paths(path)
    if own is None:
        return None, {}
    weights, config_file = own
    if config_file is not None:
        return _read_config_json(config_file)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as error:  # safetensors' SafetensorError (truncated or not safetensors), OSError
        raise CheckpointError(f"cannot read {weights} as safetensors: {_one_line(error)}") from None
    if "vitpose_config" not in meta:
        raise CheckpointError(f"{weights} has no config.json beside it and no vitpose_config metadata")
    try:
        return ViTPoseConfig(**json.loads(meta["vitpose_config"])), {}
    except (ValueError, TypeError) as error:  # JSONDecodeError and pydantic's ValidationError are ValueErrors
        raise CheckpointError(f"{weights}: invalid vitpose_config metadata: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _read_config_json(config_file: Path) -> tuple[ViTPoseConfig, dict[str, Any]]:
    """The model config and metadata in an own-format ``config.json``; CheckpointError naming it if unusable."""
    try:
        record = json.loads(config_file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read checkpoint config {config_file}: {_one_line(error)}") from None
    if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
        raise CheckpointError(f"checkpoint config {config_file} lacks the 'model' section (the ViTPoseConfig)")
    try:
        config = ViTPoseConfig(**record["model"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint config {config_file}: invalid 'model' section: {_one_line(error)}") from None
    metadata = record.get("metadata", {})
    return config, metadata if isinstance(metadata, dict) else {}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Raw weights of either format, official ``state_dict`` unwrapped; no key checking."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    own = _own_format_paths(path)
    if own is not None:
        try:
            return load_file(str(own[0]))
        except Exception as error:  # SafetensorError: truncated file, bad header; OSError
            raise CheckpointError(f"cannot read {own[0]} as safetensors: {_one_line(error)}") from None
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory without {WEIGHTS_NAME}; pass the own-format "
                              "checkpoint directory or an official .pth file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, zip errors, disallowed globals
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {error}") from None
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors")
    return raw


def _guess_grid(num_patches: int) -> tuple[int, int]:
    """Token grid of a (1, N+1, C) official pos_embed: the factorisation closest to ViTPose's 4:3."""
    best = None
    for grid_h in range(1, num_patches + 1):
        if num_patches % grid_h == 0:
            grid_w = num_patches // grid_h
            error = abs(math.log((grid_h / grid_w) / (4 / 3)))
            if best is None or error < best[0]:
                best = (error, (grid_h, grid_w))
    assert best is not None
    return best[1]


def load_state_dict_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                         source_grid: tuple[int, int] | None = None, assign: bool = False) -> None:
    """Strictly load ``state`` into ``model``; resize pos_embed if the token grids differ.

    ``assign=True`` makes the model adopt the checkpoint tensors instead of copying into its own,
    which lets ``load_model`` build the model on the meta device and skip random initialisation.
    """
    model = unwrap_model(model)
    state = dict(state)
    skipped = [k for k in state if k.startswith(SKIPPED_OFFICIAL_PREFIXES)]
    for key in skipped:
        del state[key]
    if skipped:
        logger.warning("%s: skipped %d keys not used by single-dataset ViTPose: %s%s", source, len(skipped),
                       ", ".join(skipped[:4]), " ..." if len(skipped) > 4 else "")

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")

    pos_key = "backbone.pos_embed"
    if pos_key in state and pos_key in expected and state[pos_key].shape != expected[pos_key].shape:
        theirs, ours = state[pos_key], expected[pos_key]
        if theirs.ndim == 3 and theirs.shape[0] == 1 and theirs.shape[2] == ours.shape[2]:
            old_grid = source_grid or _guess_grid(theirs.shape[1] - 1)
            new_grid = model.backbone.grid_size
            state[pos_key] = resample_abs_pos_embed(theirs, list(new_grid), list(old_grid), num_prefix_tokens=1,
                                                    antialias=False)
            logger.info("%s: resized pos_embed from grid %s to %s", source, old_grid, new_grid)

    mis_shaped = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if mis_shaped:
        problems.append(f"shape mismatch: {', '.join(mis_shaped)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=assign)


def load_checkpoint(model: nn.Module, path: str | Path, assign: bool = False) -> nn.Module:
    """Load an official ViTPose ``.pth`` or an own-format checkpoint into ``model`` (strict)."""
    path = Path(path)
    state = read_state_dict(path)
    source_grid = None
    config, _ = read_checkpoint_config(path)
    if config is not None:
        from vitpose_core.models.vit import token_grid_size

        source_grid = token_grid_size(config.img_size, config.patch_size, config.patch_padding)
    load_state_dict_into(model, state, source=str(path), source_grid=source_grid, assign=assign)
    return model


def infer_official_config(state: dict[str, torch.Tensor], **overrides: Any) -> ViTPoseConfig:
    """Rebuild the config of an official checkpoint from its tensor shapes."""
    try:
        embed_dim = state["backbone.patch_embed.proj.weight"].shape[0]
        final = state["keypoint_head.final_layer.weight"]
    except KeyError as error:
        raise CheckpointError(f"not a ViTPose checkpoint: no {error.args[0]}") from None
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("backbone.blocks."))
    variant = next((name for name, spec in VARIANTS.items() if (spec.embed_dim, spec.depth) == (embed_dim, depth)),
                   None)
    if variant is None:
        raise CheckpointError(f"no known variant has width {embed_dim} and depth {depth}")
    spec = VARIANTS[variant]
    num_keypoints = final.shape[0]
    keypoint_set = {17: "coco", 14: "aic"}.get(num_keypoints)
    if keypoint_set is None:
        raise CheckpointError(f"no known keypoint set has {num_keypoints} keypoints")
    grid_h, grid_w = _guess_grid(state["backbone.pos_embed"].shape[1] - 1)
    fields: dict[str, Any] = dict(
        variant=variant, embed_dim=embed_dim, depth=depth, num_heads=spec.num_heads,
        mlp_hidden_dim=state["backbone.blocks.0.mlp.fc1.weight"].shape[0],
        decoder="classic" if "keypoint_head.deconv_layers.0.weight" in state else "simple",
        decoder_channels=final.shape[1] if final.shape[-1] == 1 else spec.decoder_channels,
        num_keypoints=num_keypoints, keypoint_set=keypoint_set, img_size=(grid_h * 16, grid_w * 16),
    )
    fields.update(overrides)
    return ViTPoseConfig(**fields)


def load_model(path: str | Path, **overrides: Any) -> ViTPose:
    """Build and load a model from a checkpoint of either format, in eval mode.

    ``overrides`` change config fields (e.g. ``img_size=(384, 288)`` or ``attention="window"``);
    the weights still load strictly, with pos_embed resized if the grid changes.
    """
    path = Path(path)
    config, _ = read_checkpoint_config(path)
    if config is None:
        state = read_state_dict(path)
        config = infer_official_config(state, **overrides)
    elif overrides:
        config = ViTPoseConfig(**{**config.model_dump(), **overrides})
    # build without allocating or initialising weights: the checkpoint supplies every tensor
    with torch.device("meta"):
        model = build_model_from_config(config)
    load_checkpoint(model, path, assign=True)
    return model.eval()
