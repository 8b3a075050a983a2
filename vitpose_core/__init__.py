"""vitpose_core: ViTPose in pure PyTorch (no Ray, no MLflow).

Public API: `build_model`, `load_checkpoint`, `load_model`, `save_checkpoint`; see docs/model.md.
"""

from vitpose_core.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint, unwrap_model
from vitpose_core.models import VARIANTS, ViTPose, ViTPoseConfig, build_model, count_parameters

__all__ = [
    "VARIANTS", "CheckpointError", "ViTPose", "ViTPoseConfig", "build_model", "count_parameters",
    "load_checkpoint", "load_model", "save_checkpoint", "unwrap_model",
]
