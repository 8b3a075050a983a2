"""The finetune stage's config: the training sections plus validation settings."""

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


class EvalSection(StrictConfig):
    flip_test: bool = True
    batch_size: int = Field(64, ge=1)
    max_instances: int | None = Field(None, ge=1, description="cap on val crops per evaluation (fast smoke runs)")
    num_visualized: int = Field(16, ge=0, description="val crops drawn into the predictions PNG")


class FinetuneConfig(StrictConfig):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalSection = EvalSection()
    seed: int = 0
