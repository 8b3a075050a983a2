"""`pretrain` stage: MAE masked-image pretraining of the ViTPose backbone on the crop shards, on Ray Train.

The crops stream from the shard stage as for fine-tuning (labels unused; flips and scale jitter
only). The MAE uses the variant's backbone with full attention, mask ratio 0.75, a light decoder
and the per-patch normalised pixel loss (``vitpose_core.mae``). The encoder is exported after
every epoch to ``<run>/pretrain_export`` (``encoder.safetensors`` + ``encoder.json``); point
``model.pretrained`` of a finetune config there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.config import StrictConfig
from pipelines.sections import (
    CheckpointSection,
    DataSection,
    ModelSection,
    OptimSection,
    ScalingSection,
    ScheduleSection,
)
from pipelines.tracking import TrackingConfig
from pipelines.train import Stage, run_stage
from vitpose_core.engine import PretrainTask
from vitpose_core.mae import MaskedAutoencoder, build_mae, save_pretrained_encoder
from vitpose_core.models import variant_config


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


def build_pretrain_model(config: PretrainConfig) -> MaskedAutoencoder:
    model_config = variant_config(config.model.variant, **config.model.overrides())
    mae = config.mae
    return build_mae(model_config, mae.decoder_dim, mae.decoder_depth, mae.decoder_heads, mae.mask_ratio,
                     mae.norm_pix_loss)


def export_encoder(model: MaskedAutoencoder, config: PretrainConfig, directory: Path, metadata: dict[str, Any]) -> None:
    save_pretrained_encoder(model, directory, metadata={**metadata, "shards": config.data.shards})


PRETRAIN = Stage(name="pretrain", task=PretrainTask(), build_model=build_pretrain_model, export=export_encoder)


def run_pretrain(config: PretrainConfig, **trainer_kwargs: Any):
    """MAE-pretrain (or resume) as configured; returns the Ray ``Result``. The encoder is in
    ``<storage_path>/<run name>/pretrain_export``."""
    return run_stage(PRETRAIN, config, **trainer_kwargs)
