"""The MLflow pyfunc wrapper around an own-format ViTPose checkpoint (logged by `pipelines.registry`).

Kept in its own module because it subclasses `mlflow.pyfunc.PythonModel`, so importing it imports
mlflow (seconds); `pipelines.registry` imports it only when logging a model.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

CHECKPOINT_ARTIFACT = "checkpoint"  # artifact key, and the folder name under the model's artifacts/


class ViTPosePyfunc(mlflow.pyfunc.PythonModel):
    """`predict(crops [N, 3, H, W] float32, normalised) -> heatmaps [N, K, H/4, W/4]` with the logged weights.

    Serving does not go through this wrapper (it rebuilds the model from `artifacts/checkpoint/` and
    batches itself); it is there so any MLflow user can load and run the registered model.
    """

    def load_context(self, context: Any) -> None:
        from vitpose_core.checkpoint import load_model

        self.model = load_model(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        with torch.inference_mode():
            crops = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            return self.model(crops).numpy()
