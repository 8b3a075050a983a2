"""vitpose_core: ViTPose in pure PyTorch (no Ray, no MLflow).

Public API: `build_model`, `load_checkpoint`, `load_model`, `save_checkpoint`; see docs/model.md.

The top-level names are resolved lazily (PEP 562), so `import vitpose_core.geometry` in a Ray Data
worker that only crops images does not pay for importing torch (several seconds per process here).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "vitpose_core.checkpoint",
    "load_checkpoint": "vitpose_core.checkpoint",
    "load_model": "vitpose_core.checkpoint",
    "save_checkpoint": "vitpose_core.checkpoint",
    "unwrap_model": "vitpose_core.checkpoint",
    "VARIANTS": "vitpose_core.models",
    "ViTPose": "vitpose_core.models",
    "ViTPoseConfig": "vitpose_core.models",
    "build_model": "vitpose_core.models",
    "count_parameters": "vitpose_core.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'vitpose_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
