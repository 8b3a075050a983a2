"""The pretrain stage's config: the training sections plus the MAE's."""

from __future__ import annotations

from pydantic import Field

from pipelines.config import StrictConfig
from pipelines.tracking import TrackingConfig
from pipelines.training.sections import (
    CheckpointSection,
    DataSection,
    ModelSection,
    OptimSection,
    ScalingSection,
    ScheduleSection,
)


class MAESection(StrictConfig):
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: int = Field(128, ge=8)
    decoder_depth: int = Field(2, ge=1)
    decoder_heads: int = Field(4, ge=1)
    norm_pix_loss: bool = True


class PretrainConfig(StrictConfig):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    mae: MAESection = MAESection()
    optim: OptimSection = OptimSection(lr=1.5e-4, weight_decay=0.05, layer_decay=1.0, betas=(0.9, 0.95),
                                       max_grad_norm=None)
    schedule: ScheduleSection = ScheduleSection(epochs=100, warmup_steps=200, kind="cosine", milestones=())
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0
