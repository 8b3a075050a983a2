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

from vitpose_core.keypoints import KEYPOINT_SETS
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


class ViTPoseConfig(BaseModel):
    """Everything needed to rebuild a ViTPose model; stored as JSON beside its weights."""

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
    grad_checkpointing: bool = False

    @field_validator("img_size")
    @classmethod
    def _check_img_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 32:
            raise ValueError(f"img_size {value} is too small (each side must be >= 32)")
        return value

    @field_validator("keypoint_set")
    @classmethod
    def _check_keypoint_set(cls, value: str) -> str:
        if value not in KEYPOINT_SETS:
            raise ValueError(f"unknown keypoint_set {value!r}; known: {sorted(KEYPOINT_SETS)}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ViTPoseConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        expected = KEYPOINT_SETS[self.keypoint_set].num_keypoints
        if self.num_keypoints != expected:
            raise ValueError(
                f"num_keypoints {self.num_keypoints} does not match keypoint_set {self.keypoint_set!r} ({expected})"
            )
        bad_blocks = [i for i in self.full_attention_blocks if not 0 <= i < self.depth]
        if bad_blocks:
            raise ValueError(f"full_attention_blocks {bad_blocks} outside 0..{self.depth - 1}")
        return self

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(H, W) of the output heatmaps: 4x the token grid."""
        grid_h, grid_w = token_grid_size(self.img_size, self.patch_size, self.patch_padding)
        return grid_h * 4, grid_w * 4


class ViTPose(nn.Module):
    """Normalised image (B, 3, H, W) -> keypoint heatmaps (B, K, H/4, W/4)."""

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
        )
        if config.decoder == "classic":
            self.keypoint_head: nn.Module = ClassicDecoder(config.embed_dim, config.num_keypoints,
                                                           config.decoder_channels)
        else:
            self.keypoint_head = SimpleDecoder(config.embed_dim, config.num_keypoints)

    def forward(self, images: torch.Tensor, extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.keypoint_head(self.backbone(images, extra_tokens))


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
    if "keypoint_set" in overrides and "num_keypoints" not in overrides:
        overrides["num_keypoints"] = KEYPOINT_SETS[overrides["keypoint_set"]].num_keypoints
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
    "VARIANTS",
    "ViTPose",
    "ViTPoseConfig",
    "build_model",
    "build_model_from_config",
    "count_parameters",
    "variant_config",
]
