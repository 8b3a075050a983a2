"""The shard stage's config: annotation sources (or a synthetic set), crop geometry, Ray Data sizing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.config import StrictConfig
from pipelines.shard.crops import CropConfig


class ShardSource(StrictConfig):
    """One annotation file and the directory (or s3:// prefix) its `file_name`s are relative to."""

    annotations: str
    images: str
    dataset: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                         description="a free name (coco, aic, my_fish, ...); rows carry it and training filters by it")
    split: Literal["train", "val"]
    format: Literal["auto", "coco", "aic_raw", "mpii"] = "auto"
    keypoints: str | None = Field(None, description="keypoint set: a built-in name, a COCO json or a keypoint-set "
                                  "YAML; None: the annotation file's category (raw AIC: aic, MPII: mpii)")


class SyntheticSection(StrictConfig):
    """Generate a synthetic COCO-format train/val set first (the embedded default needs no downloads)."""

    train_images: int = Field(200, ge=1)
    val_images: int = Field(50, ge=1)
    width: int = Field(320, ge=32)
    height: int = Field(240, ge=32)
    max_people: int = Field(4, ge=1)
    seed: int = 0
    out: str | None = Field(None, description="where the images and annotations go; None: <out>/synthetic")


class ShardConfig(StrictConfig):
    sources: tuple[ShardSource, ...] = Field((), description="annotation files + image folders to shard")
    synthetic: SyntheticSection | None = Field(None, description="also shard a generated synthetic train/val set")
    out: str
    crop: CropConfig = CropConfig()
    rows_per_file: int = Field(2048, ge=1, description="most rows per Parquet file; a task holds at most this many "
                               "records and writes them to one file")
    images_per_task: int = Field(256, ge=1, description="most images per Ray task (each task writes its own file): "
                                 "smaller tasks balance the CPUs better, larger ones pay Ray's per-task cost less often")
    max_tasks: int | None = Field(None, ge=1, description="cap on concurrent crop tasks (None: Ray Data decides)")
    cpus_per_task: float = Field(1.0, gt=0)
    task_memory_mb: int = Field(768, ge=64, description="memory reserved per crop task (decoded images + crops)")

    @model_validator(mode="after")
    def _has_data(self) -> ShardConfig:
        if not self.sources and self.synthetic is None:
            raise ValueError("shard needs `sources` (annotation + image URIs) or `synthetic: {...}`")
        return self
