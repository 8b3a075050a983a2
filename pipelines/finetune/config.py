"""The finetune stage's config: the training sections plus validation settings."""

from __future__ import annotations

from pydantic import Field, model_validator

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
    every_n_epochs: int = Field(1, ge=1, description="validate (and export the best) after every n-th epoch and "
                                "after the last; short epochs on small data need not each pay for validation")


class DatasetMix(StrictConfig):
    """One decoder of a multi-dataset run: a dataset of the shards and its share of every batch."""

    name: str
    ratio: float = Field(1.0, gt=0, description="relative share of the training samples (normalised over datasets)")


class FinetuneConfig(StrictConfig):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalSection = EvalSection()
    datasets: tuple[DatasetMix, ...] = Field(
        (), description="multi-dataset (ViTPose+): one decoder per listed dataset, the first is the primary "
                        "(val_AP); empty: one decoder, unless the shards' datasets have different keypoint sets")
    seed: int = 0

    @model_validator(mode="after")
    def _distinct_datasets(self) -> FinetuneConfig:
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets lists a dataset twice: {names}")
        return self
