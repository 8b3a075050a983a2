"""ViTPose: plain ViT backbone + light heatmap decoder, and the named variants S/B/L/H/G (+ tiny).

``build_model("vitpose-b")`` gives the official ViTPose-B (classic decoder, 256x192 input);
keyword overrides change any field of ``ViTPoseConfig`` (input size, attention type, decoder,
keypoint count, stochastic depth, ...). A model's config travels with its checkpoint (see
``vitpose_core.checkpoint``), so every trained model can be rebuilt exactly.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from vitpose_core.keypoints import KEYPOINT_SETS, KeypointSet, KeypointSetError, KeypointSetRecord
from vitpose_core.models.attention import ATTENTION_TYPES, AttentionType
from vitpose_core.models.heads import ClassicDecoder, SimpleDecoder
from vitpose_core.models.vit import ViT, token_grid_size


class VariantSpec(BaseModel):
    """Architecture of a named variant plus the official fine-tuning recipe values that depend on it."""

    model_config = ConfigDict(frozen=True)

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden_dim: int
    layer_decay: float  # layer-wise lr decay of the official configs
    drop_path_rate: float  # stochastic depth of the official configs
    decoder_channels: int = 256


VARIANTS: dict[str, VariantSpec] = {
    # a few-million-parameter preset for CPU demos, tests and the embedded pipeline
    "vitpose-tiny": VariantSpec(embed_dim=192, depth=6, num_heads=3, mlp_hidden_dim=768, layer_decay=0.85,
                                drop_path_rate=0.0, decoder_channels=128),
    "vitpose-s": VariantSpec(embed_dim=384, depth=12, num_heads=12, mlp_hidden_dim=1536, layer_decay=0.8,
                             drop_path_rate=0.1),
    "vitpose-b": VariantSpec(embed_dim=768, depth=12, num_heads=12, mlp_hidden_dim=3072, layer_decay=0.75,
                             drop_path_rate=0.3),
    "vitpose-l": VariantSpec(embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096, layer_decay=0.8,
                             drop_path_rate=0.5),
    "vitpose-h": VariantSpec(embed_dim=1280, depth=32, num_heads=16, mlp_hidden_dim=5120, layer_decay=0.85,
                             drop_path_rate=0.55),
    # The paper's ViTPose-G uses a ViTAE-G backbone whose code and weights are not public; this is a
    # plain ViT-g (Zhai et al., 2022: width 1408, depth 40, MLP 6144), ~1B parameters.
    "vitpose-g": VariantSpec(embed_dim=1408, depth=40, num_heads=16, mlp_hidden_dim=6144, layer_decay=0.9,
                             drop_path_rate=0.55),
}


def resolve_config_keypoint_set(name: str, record: KeypointSetRecord | None) -> KeypointSet:
    """The set a config names: ``record`` when given (a custom set), else the built-in ``name``.

    A record that uses a built-in set's name with other keypoints is an error: a 17-keypoint animal
    set must not pass for COCO.
    """
    if record is None:
        if name not in KEYPOINT_SETS:
            raise ValueError(f"unknown keypoint_set {name!r} and no 'keypoints' record of it; built in: "
                             f"{sorted(KEYPOINT_SETS)}")
        return KEYPOINT_SETS[name]
    if record.name != name:
        raise ValueError(f"keypoints record is named {record.name!r} but keypoint_set is {name!r}")
    try:
        keypoint_set = record.to_set()
    except KeypointSetError as error:
        raise ValueError(str(error)) from None
    builtin = KEYPOINT_SETS.get(name)
    if builtin is not None and not builtin.same_layout(keypoint_set):
        raise ValueError(f"keypoint set {name!r} differs from the built-in set of that name; give it another name")
    return keypoint_set


def _keypoint_fields(value: Any) -> dict[str, Any]:
    """A KeypointSet given where a name is expected -> {keypoint_set, keypoints (None if built in)}."""
    if isinstance(value, KeypointSet):
        builtin = KEYPOINT_SETS.get(value.name)
        record = None if builtin is not None and builtin.same_layout(value) else KeypointSetRecord.of(value)
        return {"keypoint_set": value.name, "keypoints": record}
    return {"keypoint_set": value}


def _normalise_record(fields: dict[str, Any]) -> None:
    """Drop a ``keypoints`` record that equals the built-in set of its name (configs then compare equal)."""
    record = fields.get("keypoints")
    if record is None:
        return
    if isinstance(record, KeypointSet):
        record = KeypointSetRecord.of(record)
    elif isinstance(record, dict):
        record = KeypointSetRecord.model_validate(record)
    builtin = KEYPOINT_SETS.get(record.name)
    if builtin is not None and builtin.same_layout(record.to_set()):
        record = None
    fields["keypoints"] = record
    if "keypoint_set" not in fields and record is not None:
        fields["keypoint_set"] = record.name


class DatasetHead(BaseModel):
    """One dataset of a multi-dataset (ViTPose+) model: its name and keypoint set; it gets its own decoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    keypoint_set: str
    num_keypoints: int = Field(ge=1)
    keypoints: KeypointSetRecord | None = None  # the full set when it is not a built-in one

    @model_validator(mode="before")
    @classmethod
    def _accept_sets(cls, data: Any) -> Any:
        if isinstance(data, tuple | list) and len(data) == 2:  # ("aic", AIC) or ("aic", "aic")
            data = {"name": data[0], "keypoint_set": data[1]}
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("keypoint_set"), KeypointSet):
                data.update(_keypoint_fields(data["keypoint_set"]))
            _normalise_record(data)
            data.setdefault("keypoint_set", data.get("name"))
            if "num_keypoints" not in data:
                record = data.get("keypoints")
                keypoint_set = resolve_config_keypoint_set(data["keypoint_set"], record)
                data["num_keypoints"] = keypoint_set.num_keypoints
        return data

    @model_validator(mode="after")
    def _check(self) -> DatasetHead:
        keypoint_set = resolve_config_keypoint_set(self.keypoint_set, self.keypoints)
        if keypoint_set.num_keypoints != self.num_keypoints:
            raise ValueError(f"dataset {self.name!r}: num_keypoints {self.num_keypoints} does not match keypoint set "
                             f"{self.keypoint_set!r} ({keypoint_set.num_keypoints})")
        return self

    @property
    def keypoint_set_data(self) -> KeypointSet:
        return resolve_config_keypoint_set(self.keypoint_set, self.keypoints)


class ViTPoseConfig(BaseModel):
    """Everything needed to rebuild a ViTPose model; stored as JSON beside its weights.

    Keypoints: ``keypoint_set`` names the set of the (first) decoder; a set that is not built in
    travels in full in ``keypoints``. Multi-dataset (ViTPose+): ``datasets`` lists one decoder per
    dataset (the first is ``keypoint_head`` and must match ``keypoint_set``, the others are
    ``associate_keypoint_heads.{i-1}``, the official layout); ``num_experts`` > 0 makes every FFN a
    ViTPose++ MoE FFN whose last ``part_features`` output channels are per dataset.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str = "vitpose-b"
    img_size: tuple[int, int] = (256, 192)  # (H, W) of the input crop
    patch_size: int = 16
    patch_padding: int = 2
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden_dim: int = 3072
    qkv_bias: bool = True
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    attention: AttentionType = "full"
    window_size: int = Field(8, ge=1)
    full_attention_blocks: tuple[int, ...] = ()
    decoder: Literal["classic", "simple"] = "classic"
    decoder_channels: int = 256
    num_keypoints: int = Field(17, ge=1)
    keypoint_set: str = "coco"
    keypoints: KeypointSetRecord | None = None  # the full set when keypoint_set is not a built-in one
    grad_checkpointing: bool = False
    datasets: tuple[DatasetHead, ...] = ()  # () = one dataset, one decoder
    num_experts: int = Field(0, ge=0)  # 0 = plain FFN; else ViTPose++ MoE FFN with this many experts
    part_features: int = Field(0, ge=0)  # MoE: output channels per expert

    @model_validator(mode="before")
    @classmethod
    def _fill_keypoint_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("keypoint_set"), KeypointSet):
            data.update(_keypoint_fields(data["keypoint_set"]))
        _normalise_record(data)
        datasets = data.get("datasets")
        if datasets:
            first = DatasetHead.model_validate(datasets[0])
            data.setdefault("keypoint_set", first.keypoint_set)
            data.setdefault("keypoints", first.keypoints)
            data.setdefault("num_keypoints", first.num_keypoints)
        if "num_keypoints" not in data and "keypoint_set" in data:
            data["num_keypoints"] = resolve_config_keypoint_set(data["keypoint_set"], data.get("keypoints")).num_keypoints
        return data

    @field_validator("img_size")
    @classmethod
    def _check_img_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 32:
            raise ValueError(f"img_size {value} is too small (each side must be >= 32)")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ViTPoseConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        expected = resolve_config_keypoint_set(self.keypoint_set, self.keypoints).num_keypoints
        if self.num_keypoints != expected:
            raise ValueError(
                f"num_keypoints {self.num_keypoints} does not match keypoint_set {self.keypoint_set!r} ({expected})"
            )
        if self.datasets:
            first = self.datasets[0]
            if (first.keypoint_set, first.keypoints, first.num_keypoints) != (
                    self.keypoint_set, self.keypoints, self.num_keypoints):
                raise ValueError(f"datasets[0] ({first.name!r}, {first.keypoint_set!r}) must be the model's own "
                                 f"keypoint set {self.keypoint_set!r}")
            names = [d.name for d in self.datasets]
            if len(set(names)) != len(names):
                raise ValueError(f"dataset names must be unique, got {names}")
        if self.num_experts:
            if not 0 < self.part_features < self.embed_dim:
                raise ValueError(f"part_features must be in 1..{self.embed_dim - 1} with num_experts > 0, "
                                 f"got {self.part_features}")
            if len(self.datasets) > self.num_experts:
                raise ValueError(f"{len(self.datasets)} datasets need at least as many experts, got {self.num_experts}")
        elif self.part_features:
            raise ValueError("part_features is set but num_experts is 0 (no MoE)")
        bad_blocks = [i for i in self.full_attention_blocks if not 0 <= i < self.depth]
        if bad_blocks:
            raise ValueError(f"full_attention_blocks {bad_blocks} outside 0..{self.depth - 1}")
        return self

    @property
    def keypoint_set_data(self) -> KeypointSet:
        """The full keypoint set of the (first) decoder."""
        return resolve_config_keypoint_set(self.keypoint_set, self.keypoints)

    @property
    def num_datasets(self) -> int:
        """Decoders: 1 for a single-dataset model (a single-decoder MoE model still picks experts by index)."""
        return max(1, len(self.datasets))

    @property
    def dataset_names(self) -> list[str]:
        return [d.name for d in self.datasets] if self.datasets else [self.keypoint_set]

    def dataset_keypoint_sets(self) -> list[KeypointSet]:
        """The keypoint set of every decoder, in dataset-index order."""
        return [d.keypoint_set_data for d in self.datasets] if self.datasets else [self.keypoint_set_data]

    def dataset_index(self, dataset: int | str) -> int:
        """A dataset's index from its name (or index, checked)."""
        names = self.dataset_names
        if isinstance(dataset, str):
            if dataset not in names:
                raise ValueError(f"unknown dataset {dataset!r}; this model has {names}")
            return names.index(dataset)
        limit = max(len(names), self.num_experts)
        if not 0 <= dataset < limit:
            raise ValueError(f"dataset index {dataset} outside 0..{limit - 1} ({names})")
        return dataset

    @property
    def input_size(self) -> tuple[int, int]:
        """(W, H) of the input crop: the order of every config, the codec and the crop geometry. ``img_size``
        (H, W), the patch grid's order, stays inside the model; ``variant_config(input_size=...)`` takes (W, H)."""
        return self.img_size[1], self.img_size[0]

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(H, W) of the output heatmaps: 4x the token grid."""
        grid_h, grid_w = token_grid_size(self.img_size, self.patch_size, self.patch_padding)
        return grid_h * 4, grid_w * 4


class ViTPose(nn.Module):
    """Normalised image (B, 3, H, W) -> keypoint heatmaps (B, K, H/4, W/4).

    Multi-dataset models share the backbone and have one decoder per dataset: ``keypoint_head`` for
    dataset 0 and ``associate_keypoint_heads[i - 1]`` for dataset i (the official ViTPose+ names).
    ``dataset_index`` (an int or one per sample) picks the decoder and, with MoE FFNs, the expert.
    A single-decoder MoE model (transformers' ViTPose+ layout) uses the index for the expert only.
    """

    def __init__(self, config: ViTPoseConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ViT(
            img_size=config.img_size,
            patch_size=config.patch_size,
            patch_padding=config.patch_padding,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_hidden_dim=config.mlp_hidden_dim,
            qkv_bias=config.qkv_bias,
            drop_path_rate=config.drop_path_rate,
            attn_type=config.attention,
            window_size=config.window_size,
            full_attention_blocks=config.full_attention_blocks,
            grad_checkpointing=config.grad_checkpointing,
            num_experts=config.num_experts,
            part_features=config.part_features,
        )
        self.keypoint_head = self._decoder(config.num_keypoints)
        if len(config.datasets) > 1:
            self.associate_keypoint_heads = nn.ModuleList(self._decoder(d.num_keypoints) for d in config.datasets[1:])

    def _decoder(self, num_keypoints: int) -> nn.Module:
        if self.config.decoder == "classic":
            return ClassicDecoder(self.config.embed_dim, num_keypoints, self.config.decoder_channels)
        return SimpleDecoder(self.config.embed_dim, num_keypoints)

    @property
    def heads(self) -> list[nn.Module]:
        """The decoders in dataset-index order."""
        extra = list(self.associate_keypoint_heads) if hasattr(self, "associate_keypoint_heads") else []
        return [self.keypoint_head, *extra]

    def _expert_index(self, dataset_index: torch.Tensor | int | None) -> torch.Tensor | int | None:
        if not self.config.num_experts:
            return None
        index = 0 if dataset_index is None else dataset_index
        limit = self.config.num_experts
        if isinstance(index, int):
            self.config.dataset_index(index)
        elif index.numel() and (int(index.min()) < 0 or int(index.max()) >= limit):
            raise ValueError(f"dataset indices must lie in 0..{limit - 1}, got {index.unique().tolist()}")
        return index

    def forward(self, images: torch.Tensor, extra_tokens: torch.Tensor | None = None,
                dataset_index: torch.Tensor | int | None = None, per_dataset: bool = False
                ) -> torch.Tensor | list[torch.Tensor | None]:
        """Heatmaps of one dataset's decoder (``dataset_index``: int or (B,) all equal; None = 0).

        ``per_dataset=True`` takes a mixed (B,) ``dataset_index`` and returns ``forward_datasets``'
        list; going through ``forward`` keeps DDP/FSDP wrappers in the loop during training.
        """
        if per_dataset:
            if not isinstance(dataset_index, torch.Tensor):
                raise ValueError("per_dataset=True needs a (B,) dataset_index tensor")
            return self.forward_datasets(images, dataset_index, extra_tokens)
        head_index = 0
        if dataset_index is not None and len(self.heads) > 1:
            if isinstance(dataset_index, int):
                head_index = self.config.dataset_index(dataset_index)
            else:
                values = dataset_index.unique()
                if values.numel() > 1:
                    raise ValueError("samples of several datasets in one batch give heatmaps with different keypoint "
                                     "counts; use forward_datasets")
                head_index = self.config.dataset_index(int(values[0])) if values.numel() else 0
        features = self.backbone(images, extra_tokens, self._expert_index(dataset_index))
        return self.heads[head_index](features)

    def forward_datasets(self, images: torch.Tensor, dataset_index: torch.Tensor,
                         extra_tokens: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """One backbone pass over a mixed batch; entry d holds decoder d's heatmaps for the samples of
        dataset d (in batch order, ``(dataset_index == d).sum()`` rows), or None if it has none."""
        if dataset_index.shape != images.shape[:1]:
            raise ValueError(f"dataset_index must be ({images.shape[0]},), got {tuple(dataset_index.shape)}")
        heads = self.heads
        if dataset_index.numel() and (int(dataset_index.min()) < 0 or int(dataset_index.max()) >= len(heads)):
            raise ValueError(f"dataset indices must lie in 0..{len(heads) - 1}, got {dataset_index.unique().tolist()}")
        features = self.backbone(images, extra_tokens, self._expert_index(dataset_index))
        outputs: list[torch.Tensor | None] = []
        for index, head in enumerate(heads):
            selected = dataset_index == index
            outputs.append(head(features[selected]) if bool(selected.any()) else None)
        return outputs


def dataset_config(config: ViTPoseConfig, dataset: int | str) -> ViTPoseConfig:
    """The single-dataset, plain-FFN config of one dataset of a multi-dataset / MoE config."""
    index = config.dataset_index(dataset)
    fields = config.model_dump(exclude={"datasets", "num_experts", "part_features", "keypoint_set", "keypoints",
                                        "num_keypoints"})
    source = config.datasets[index] if config.datasets else config
    fields.update(keypoint_set=source.keypoint_set, keypoints=source.keypoints, num_keypoints=source.num_keypoints)
    return ViTPoseConfig(**fields)


def split_dataset_model(model: ViTPose, dataset: int | str) -> ViTPose:
    """A single-dataset model of one dataset of a multi-dataset / MoE model (the official model_split).

    The backbone is copied with each MoE FFN folded into a plain one (``fc2`` rows followed by the
    dataset's expert rows: the same function for that dataset), and the dataset's decoder becomes
    ``keypoint_head``. Heatmaps equal the source model's for that dataset index.
    """
    config = model.config
    index = config.dataset_index(dataset)
    datasets = config.datasets
    single = ViTPose(dataset_config(config, index))
    state = {}
    source = model.state_dict()
    head_prefix = "keypoint_head." if index == 0 or not datasets else f"associate_keypoint_heads.{index - 1}."
    for key, value in source.items():
        if key.startswith(head_prefix):
            state["keypoint_head." + key[len(head_prefix):]] = value
        elif key.startswith(("keypoint_head.", "associate_keypoint_heads.")) or ".mlp.experts." in key:
            continue
        elif config.num_experts and ".mlp.fc2." in key:
            expert_key = key.replace(".mlp.fc2.", f".mlp.experts.{index}.")
            state[key] = torch.cat([value, source[expert_key]], dim=0)  # (C - P) rows + P expert rows
        else:
            state[key] = value
    single.load_state_dict(state, strict=True)
    return single.train(model.training)


def variant_config(variant: str, **overrides: Any) -> ViTPoseConfig:
    """The config of a named variant with field overrides applied (validated strictly)."""
    try:
        spec = VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}") from None
    fields: dict[str, Any] = {
        "variant": variant,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_hidden_dim": spec.mlp_hidden_dim,
        "decoder_channels": spec.decoder_channels,
    }
    if "input_size" in overrides:  # (W, H), as configs give it: the one place it becomes the grid's (H, W)
        width, height = overrides.pop("input_size")
        overrides["img_size"] = (height, width)
    fields.update(overrides)
    return ViTPoseConfig(**fields)


def build_model(variant: str = "vitpose-b", **overrides: Any) -> ViTPose:
    """Build a ViTPose variant ("vitpose-tiny", "-s", "-b", "-l", "-h", "-g"), overriding config fields.

    Example: ``build_model("vitpose-b", img_size=(384, 288), attention="shifted_window")``.
    """
    return ViTPose(variant_config(variant, **overrides))


def build_model_from_config(config: ViTPoseConfig | dict[str, Any]) -> ViTPose:
    if isinstance(config, dict):
        config = ViTPoseConfig(**config)
    return ViTPose(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ATTENTION_TYPES",
    "DatasetHead",
    "dataset_config",
    "split_dataset_model",
    "VARIANTS",
    "ViTPose",
    "ViTPoseConfig",
    "build_model",
    "build_model_from_config",
    "count_parameters",
    "variant_config",
]
