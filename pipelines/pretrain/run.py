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

from pipelines.contract import StageOutput
from pipelines.pretrain.config import PretrainConfig
from pipelines.training.recipe import TrainingRecipe
from pipelines.training.result import run_training
from vitpose_core.engine import PretrainTask
from vitpose_core.mae import MaskedAutoencoder, build_mae, save_pretrained_encoder
from vitpose_core.models import variant_config


def build_pretrain_model(config: PretrainConfig) -> MaskedAutoencoder:
    model_config = variant_config(config.model.variant, **config.model.overrides())
    mae = config.mae
    return build_mae(model_config, mae.decoder_dim, mae.decoder_depth, mae.decoder_heads, mae.mask_ratio,
                     mae.norm_pix_loss)


def export_encoder(model: MaskedAutoencoder, config: PretrainConfig, directory: Path, metadata: dict[str, Any]) -> None:
    save_pretrained_encoder(model, directory, metadata={**metadata, "shards": config.data.shards})


PRETRAIN = TrainingRecipe(name="pretrain", task=PretrainTask(), build_model=build_pretrain_model,
                          export=export_encoder)


def run_pretrain(config: PretrainConfig, **trainer_kwargs: Any) -> StageOutput:
    """MAE-pretrain (or resume) as configured; the record names the encoder
    (``<storage_path>/<run name>/pretrain_export``)."""
    return run_training(PRETRAIN, config, **trainer_kwargs)
