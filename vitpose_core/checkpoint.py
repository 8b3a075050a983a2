"""Checkpoint I/O: the project's own format and official ViTPose (mmpose) ``.pth`` files.

Own format: a directory holding ``model.safetensors`` (weights; the model config is also stored in
the safetensors metadata) and ``config.json`` (the ``ViTPoseConfig`` that rebuilds the model, plus
free-form ``metadata`` such as the training run, dataset and metrics).

Official format: ``{'state_dict': {'backbone.*': ..., 'keypoint_head.*': ...}}`` read with
``torch.load(weights_only=True)``; our module names equal the official ones, so keys map 1:1.
Multi-dataset files (ViTPose+: ``associate_keypoint_heads.*`` decoders, ``mlp.experts.N`` MoE
experts) load as multi-dataset models with every decoder; the per-dataset files of the official
model_split tool load as single-dataset models. ``backbone.cls_token`` (unused) is skipped with a
warning, as are decoders/experts a single-dataset model has no place for. Any other key that is
missing, unexpected or mis-shaped is an error that names it -- except ``backbone.pos_embed``, which
is resized bicubically when the checkpoint was trained at another resolution.

Hugging Face ``VitPoseForPoseEstimation`` directories load too (``vitpose_core.interop``).
Official and HF files do not name their keypoints: the set comes from ``keypoint_set=``, the file
name (``ap10k.pth``), the official ViTPose+ dataset order, or the keypoint count -- the last with a
warning, so a 17-keypoint animal model is never labelled COCO without a word.
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
from vitpose_core.interop import is_hf_directory, read_hf_directory
from vitpose_core.keypoints import KEYPOINT_SETS, KeypointSet, KeypointSetError, get_keypoint_set
from vitpose_core.models.vitpose import (
    VARIANTS,
    ViTPose,
    ViTPoseConfig,
    build_model_from_config,
    split_dataset_model,
)

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class CheckpointError(InvalidInputError):
    """A checkpoint is unreadable or does not fit the model; the message names the file or the offending keys."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP/compile wrappers (``.module`` / ``._orig_mod``).

    An FSDP2 model is its own plain model (``fully_shard`` shards it in place); its parameters are DTensor
    shards, so its ``state_dict`` is not a full one (``pipelines.training.fsdp.full_state`` gathers that).
    """
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
    # the full keypoint sets (names, flips, skeleton, sigmas) travel with the weights, one per decoder
    record = {"format_version": FORMAT_VERSION, "model": config_json, "metadata": metadata or {},
              "datasets": config.dataset_names,
              "keypoint_sets": [keypoint_set.to_dict() for keypoint_set in config.dataset_keypoint_sets()]}
    (out_dir / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
    return out_dir


def _own_format_paths(path: Path) -> tuple[Path, Path | None] | None:
    if path.is_dir() and (path / WEIGHTS_NAME).exists() and not is_hf_directory(path):
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
    # what the model has no place for: the unused cls token always; extra decoders and MoE experts
    # when the model is single-dataset / plain (official multi-dataset files, model_split leftovers)
    config = getattr(model, "config", None)
    skippable = ["backbone.cls_token"]
    if len(getattr(config, "datasets", ())) < 2:
        skippable.append("associate_keypoint_heads.")
    skipped = [k for k in state if k.startswith(tuple(skippable))
               or (".mlp.experts." in k and not getattr(config, "num_experts", 0))]
    for key in skipped:
        del state[key]
    if skipped:
        logger.warning("%s: skipped %d keys this model has no place for: %s%s", source, len(skipped),
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


# The six datasets of the official ViTPose+ checkpoints, in decoder order (keypoint_head, then
# associate_keypoint_heads.0..4; expert i serves dataset i), as the official model_split names them.
# APT-36K uses AP-10K's 17 animal keypoints.
OFFICIAL_PLUS_DATASETS: tuple[tuple[str, str], ...] = (
    ("coco", "coco"), ("aic", "aic"), ("mpii", "mpii"), ("ap10k", "ap10k"), ("apt36k", "ap10k"),
    ("wholebody", "coco_wholebody"),
)
# a keypoint count alone says this much (17 is COCO, AP-10K, PoseTrack18...: hence the warning)
_SET_BY_COUNT = {17: "coco", 14: "aic", 16: "mpii", 133: "coco_wholebody"}
_NAME_HINTS = {"wholebody": "coco_wholebody", "apt36k": "ap10k", **{name: name for name in KEYPOINT_SETS}}

EXPECTED_FORMATS = (
    "own format: a directory with config.json ('model' section) + model.safetensors, or the .safetensors file",
    "Hugging Face VitPoseForPoseEstimation: a directory with config.json (model_type 'vitpose') + "
    "model.safetensors",
    "official ViTPose / ViTPose+ (mmpose) .pth: a state_dict with backbone.* and keypoint_head.* tensors "
    "(ViTPose+ also associate_keypoint_heads.* and mlp.experts.*), or a per-dataset file of model_split",
)


def _unknown_format(path: Path, found: str) -> CheckpointError:
    expected = "; ".join(f"({i + 1}) {text}" for i, text in enumerate(EXPECTED_FORMATS))
    return CheckpointError(f"{path}: unknown checkpoint format. Expected one of: {expected}. Found: {found}")


def checkpoint_format(path: str | Path) -> str:
    """'own', 'hf' or 'official'; CheckpointError saying what was expected and found otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if is_hf_directory(path):
            return "hf"
        if (path / WEIGHTS_NAME).exists():
            return "own"
        names = sorted(p.name for p in path.iterdir())
        found = f"a directory holding {names[:10]}{' ...' if len(names) > 10 else ''}"
        config_file = path / CONFIG_NAME
        if config_file.is_file():
            try:
                record = json.loads(config_file.read_bytes())
                if isinstance(record, dict) and "model_type" in record:
                    found += f" whose config.json has model_type {record['model_type']!r}"
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                found += " whose config.json is not valid JSON"
        raise _unknown_format(path, found)
    return "own" if path.suffix == ".safetensors" else "official"


def _name_hint(source: str) -> KeypointSet | None:
    """A built-in set named in the file name ('ap10k.pth', 'vitpose+_b_wholebody.pth'), longest name first."""
    stem = Path(source).stem.lower().replace("-", "").replace("_", "")
    for hint in sorted(_NAME_HINTS, key=len, reverse=True):
        if hint.replace("_", "") in stem:
            return KEYPOINT_SETS[_NAME_HINTS[hint]]
    return None


def _set_for_count(num_keypoints: int, source: str, what: str) -> KeypointSet:
    name = _SET_BY_COUNT.get(num_keypoints)
    if name is None:
        raise CheckpointError(f"{source}: {what} predicts {num_keypoints} keypoints, which no built-in keypoint set "
                              f"has without a name; pass keypoint_set= (a built-in name or a KeypointSet)")
    logger.warning("%s: %s does not name its keypoints; assuming the %r set by its count (%d). Pass keypoint_set= "
                   "if it is another one (e.g. ap10k, posetrack18)", source, what, name, num_keypoints)
    return KEYPOINT_SETS[name]


def _head_decoder(state: dict[str, torch.Tensor], prefix: str) -> tuple[str, int, int]:
    """(decoder type, channels, keypoints) of the decoder under ``prefix``."""
    final = state[f"{prefix}final_layer.weight"]
    classic = f"{prefix}deconv_layers.0.weight" in state
    return ("classic" if classic else "simple"), int(final.shape[1]), int(final.shape[0])


def infer_official_config(state: dict[str, torch.Tensor], keypoint_set: KeypointSet | str | None = None,
                          source: str = "checkpoint", **overrides: Any) -> ViTPoseConfig:
    """Rebuild the config of an official ViTPose / ViTPose+ checkpoint from its tensor shapes.

    ViTPose+ (``associate_keypoint_heads.*``) becomes a multi-dataset config with every decoder;
    MoE experts (``mlp.experts.N``) whose ``mlp.fc2`` lacks their rows make it a MoE config. A
    model_split file (``fc2`` already holds an expert) is a plain single-dataset model.
    """
    required = ("backbone.patch_embed.proj.weight", "backbone.pos_embed", "backbone.blocks.0.mlp.fc1.weight",
                "keypoint_head.final_layer.weight")
    absent = [key for key in required if key not in state]
    if absent:
        keys = sorted(state)
        found = f"a state_dict without {absent[0]}; its first keys: {keys[:6]}{' ...' if len(keys) > 6 else ''}"
        raise _unknown_format(Path(source), found)
    embed_dim = state["backbone.patch_embed.proj.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("backbone.blocks."))
    variant = next((name for name, spec in VARIANTS.items() if (spec.embed_dim, spec.depth) == (embed_dim, depth)),
                   None)
    if variant is None:
        raise CheckpointError(f"{source}: no known variant has width {embed_dim} and depth {depth}")
    spec = VARIANTS[variant]
    fc2_rows = state["backbone.blocks.0.mlp.fc2.weight"].shape[0]
    experts = sorted({int(k.split(".")[5]) for k in state if k.startswith("backbone.blocks.0.mlp.experts.")
                      and k.endswith(".weight")})
    num_experts = part_features = 0
    if fc2_rows != embed_dim:
        if not experts:
            raise CheckpointError(f"{source}: mlp.fc2 has {fc2_rows} output rows for width {embed_dim} and there are "
                                  "no mlp.experts.* to complete them")
        num_experts = len(experts)
        part_features = int(state["backbone.blocks.0.mlp.experts.0.weight"].shape[0])
        if fc2_rows + part_features != embed_dim:
            raise CheckpointError(f"{source}: mlp.fc2 rows {fc2_rows} + expert rows {part_features} != width "
                                  f"{embed_dim}")
    associate = sorted({int(k.split(".")[1]) for k in state if k.startswith("associate_keypoint_heads.")})
    split_leftovers = bool(experts) and not num_experts  # model_split's coco.pth keeps the heads and experts
    decoder, channels, num_keypoints = _head_decoder(state, "keypoint_head.")
    fields: dict[str, Any] = dict(
        variant=variant, embed_dim=embed_dim, depth=depth, num_heads=spec.num_heads,
        mlp_hidden_dim=state["backbone.blocks.0.mlp.fc1.weight"].shape[0], decoder=decoder,
        decoder_channels=channels if decoder == "classic" else spec.decoder_channels,
        num_experts=num_experts, part_features=part_features,
    )
    if associate and not split_leftovers:
        if keypoint_set is not None:
            raise CheckpointError(f"{source} has {1 + len(associate)} decoders; keypoint_set= names one set only. "
                                  "Load it whole (the official ViTPose+ datasets are recognised) or pass dataset=")
        datasets = []
        for index, prefix in enumerate(["keypoint_head."] + [f"associate_keypoint_heads.{i}." for i in associate]):
            head_decoder, head_channels, count = _head_decoder(state, prefix)
            if (head_decoder, head_channels) != (decoder, channels):
                raise CheckpointError(f"{source}: decoder {prefix.rstrip('.')} is a {head_decoder} decoder with "
                                      f"{head_channels} channels, unlike keypoint_head ({decoder}, {channels})")
            if index < len(OFFICIAL_PLUS_DATASETS) and KEYPOINT_SETS[OFFICIAL_PLUS_DATASETS[index][1]].num_keypoints == count:
                name, set_name = OFFICIAL_PLUS_DATASETS[index]
                datasets.append({"name": name, "keypoint_set": set_name})
            else:
                chosen = _set_for_count(count, source, f"decoder {prefix.rstrip('.')}")
                datasets.append({"name": f"dataset{index}", "keypoint_set": chosen.name})
        fields["datasets"] = datasets
    else:
        if keypoint_set is not None:
            try:
                chosen = get_keypoint_set(keypoint_set) if isinstance(keypoint_set, str) else keypoint_set
            except KeypointSetError as error:
                raise CheckpointError(f"{source}: {error}") from None
            if chosen.num_keypoints != num_keypoints:
                raise CheckpointError(f"{source}: the decoder predicts {num_keypoints} keypoints but keypoint set "
                                      f"{chosen.name!r} has {chosen.num_keypoints}")
        else:
            hint = _name_hint(source)
            if hint is not None and hint.num_keypoints == num_keypoints:
                chosen = hint
                logger.info("%s: keypoint set %r taken from the file name", source, chosen.name)
            else:
                chosen = _set_for_count(num_keypoints, source, "the decoder")
        fields.update(keypoint_set=chosen, num_keypoints=num_keypoints)
    grid_h, grid_w = _guess_grid(state["backbone.pos_embed"].shape[1] - 1)
    fields["img_size"] = (grid_h * 16, grid_w * 16)
    fields.update(overrides)
    return ViTPoseConfig(**fields)


def _with_overrides(config: ViTPoseConfig, overrides: dict[str, Any]) -> ViTPoseConfig:
    if not overrides:
        return config
    fields = config.model_dump()
    if "keypoint_set" in overrides:  # a new set replaces the recorded one and its count
        fields.pop("keypoints", None)
        fields.pop("num_keypoints", None)
    return ViTPoseConfig(**{**fields, **overrides})


def read_checkpoint_keypoint_sets(path: str | Path, keypoint_set: KeypointSet | str | None = None
                                  ) -> dict[str, KeypointSet]:
    """dataset name -> keypoint set of every decoder of a checkpoint of any supported format."""
    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt == "hf":
        config, _ = read_hf_directory(path, keypoint_set)
    elif fmt == "own":
        config, _ = read_checkpoint_config(path)
        assert config is not None
    else:
        config = infer_official_config(read_state_dict(path), keypoint_set=keypoint_set, source=str(path))
    return dict(zip(config.dataset_names, config.dataset_keypoint_sets(), strict=True))


def load_model(path: str | Path, dataset: int | str | None = None, keypoint_set: KeypointSet | str | None = None,
               **overrides: Any) -> ViTPose:
    """Build and load a model from a checkpoint of any supported format, in eval mode.

    Formats: own (directory or .safetensors), Hugging Face ``VitPoseForPoseEstimation`` directory,
    official ViTPose / ViTPose+ ``.pth`` (see ``EXPECTED_FORMATS``). ``model.config`` carries the
    keypoint set(s): ``model.config.dataset_keypoint_sets()``.

    ``dataset`` (name or index) exports that dataset's single-dataset model from a multi-dataset /
    MoE checkpoint (the official model_split). ``keypoint_set`` names the set of an official or HF
    file that does not say it (an own-format checkpoint records its own). ``overrides`` change config
    fields (e.g. ``img_size=(384, 288)`` or ``attention="window"``); the weights still load
    strictly, with pos_embed resized if the grid changes.
    """
    path = Path(path)
    fmt = checkpoint_format(path)
    source_grid = None
    if fmt == "hf":
        config, state = read_hf_directory(path, keypoint_set)
        from vitpose_core.models.vit import token_grid_size

        source_grid = token_grid_size(config.img_size, config.patch_size, config.patch_padding)
        config = _with_overrides(config, overrides)
    elif fmt == "own":
        config, _ = read_checkpoint_config(path)
        if config is None:  # a directory the format check took for ours
            raise _unknown_format(path, "no usable own-format config")
        if keypoint_set is not None:
            wanted = get_keypoint_set(keypoint_set) if isinstance(keypoint_set, str) else keypoint_set
            if not wanted.same_layout(config.keypoint_set_data):
                raise CheckpointError(f"{path} records keypoint set {config.keypoint_set!r}, not {wanted.name!r}")
        config = _with_overrides(config, overrides)
        state = None
    else:
        state = read_state_dict(path)
        config = infer_official_config(state, keypoint_set=keypoint_set, source=str(path), **overrides)
    # build without allocating or initialising weights: the checkpoint supplies every tensor
    with torch.device("meta"):
        model = build_model_from_config(config)
    if state is None:
        load_checkpoint(model, path, assign=True)
    else:
        load_state_dict_into(model, state, source=str(path), source_grid=source_grid, assign=True)
    if dataset is not None:
        model = split_dataset_model(model, dataset)
    return model.eval()
