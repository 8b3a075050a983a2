"""ViTPose models: plain ViT backbone, attention variants, heatmap decoders and named variants."""

from vitpose_core.models.attention import ATTENTION_TYPES, Attention
from vitpose_core.models.heads import ClassicDecoder, SimpleDecoder
from vitpose_core.models.vit import ViT, token_grid_size
from vitpose_core.models.vitpose import (
    VARIANTS,
    DatasetHead,
    ViTPose,
    ViTPoseConfig,
    build_model,
    build_model_from_config,
    count_parameters,
    dataset_config,
    split_dataset_model,
    variant_config,
)

__all__ = [
    "ATTENTION_TYPES", "Attention", "ClassicDecoder", "SimpleDecoder", "ViT", "token_grid_size", "VARIANTS",
    "ViTPose", "ViTPoseConfig", "build_model", "build_model_from_config", "count_parameters", "variant_config",
    "DatasetHead", "dataset_config", "split_dataset_model",
]
