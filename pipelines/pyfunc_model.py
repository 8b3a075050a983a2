"""The MLflow pyfunc model of a ViTPose checkpoint: encoded images (and optional boxes) in, keypoints out.

This file is logged *as code* by `pipelines.registry.log_checkpoint_model` (MLflow "models from code":
no pickled object) together with `vitpose_core/` as a code path, so a logged model loads with

    model = mlflow.pyfunc.load_model("models:/vitpose@champion")
    people = model.predict(pd.DataFrame({"image": [open("a.jpg", "rb").read()], "boxes": ["[[10, 20, 100, 220]]"]}))

wherever its requirements are installed (the checkout is not needed: the code travels with the model).
It must therefore import nothing from `pipelines`: only mlflow, numpy, pandas, PIL, cv2 and `vitpose_core`.

Input (one row per image; the model's signature says the same):
- `image`: the encoded image file (JPEG, PNG, WebP, BMP) as bytes (base64 in a JSON scoring request);
- `boxes` (optional): a JSON list of person boxes [[x, y, w, h], ...] in pixels; empty, null or absent:
  one box over the whole image.
Params: `flip_test` (bool, default false).
Output: one row per person: `image_index` (the input row), `box` [x, y, w, h], `keypoints` flat
[x1, y1, s1, ...] (COCO results layout, image pixels), `keypoint_scores` [K], `score` (mean of the
keypoint scores above 0.2, as mmpose rescores; boxes have no score here).
"""

from __future__ import annotations

import io
import json
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

CHECKPOINT_ARTIFACT = "checkpoint"  # artifact key, and the folder name under the model's artifacts/
OUTPUT_COLUMNS = ["image_index", "box", "keypoints", "keypoint_scores", "score"]
MAX_IMAGE_PIXELS = 4096 * 4096


def model_signature() -> Any:
    """Input, output and params schema of the model (logged with it; MLflow checks inputs against it)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec("binary", "image"), ColSpec("string", "boxes", required=False)])
    outputs = Schema([ColSpec("long", "image_index"), ColSpec(Array("double"), "box"),
                      ColSpec(Array("double"), "keypoints"), ColSpec(Array("double"), "keypoint_scores"),
                      ColSpec("double", "score")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("flip_test", "boolean", False)]))


def decode_image(data: Any, row: int) -> np.ndarray:
    """Encoded bytes -> RGB uint8 [H, W, 3], size-checked from the header first; decoded by OpenCV as
    offline inference (`vitpose_core.image_io.read_image_rgb`) decodes files."""
    import cv2
    from PIL import Image

    if isinstance(data, str):  # a base64 string from a JSON payload that skipped schema enforcement
        import base64

        data = base64.b64decode(data)
    if not isinstance(data, bytes | bytearray):
        raise ValueError(f"row {row}: image must be the encoded image bytes, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Exception:
        raise ValueError(f"row {row}: image is not a decodable image (JPEG, PNG, WebP, BMP)") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"row {row}: image is {width}x{height}, over {MAX_IMAGE_PIXELS} pixels")
    image_bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image_bgr is None:
        raise ValueError(f"row {row}: the image is truncated or corrupt")
    return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)


def parse_boxes(raw: Any, row: int) -> np.ndarray | None:
    """A JSON list of [x, y, w, h] -> [P, 4]; None (whole image) for a missing or empty value."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)) or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        boxes = np.asarray(json.loads(raw) if isinstance(raw, str) else raw, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"row {row}: boxes must be a JSON list of [x, y, w, h], got {str(raw)[:60]!r}") from None
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all() or (boxes[:, 2:] <= 0).any():
        raise ValueError(f"row {row}: boxes must be finite [x, y, w, h] with w, h > 0, got {str(raw)[:60]!r}")
    return boxes


class ViTPosePyfunc(mlflow.pyfunc.PythonModel):
    """Top-down keypoints with the logged checkpoint, through `vitpose_core.inference.TopDownPredictor`
    (the path `vitpose predict` and the Serve app use), so the results equal offline inference."""

    def load_context(self, context: Any) -> None:
        from vitpose_core.checkpoint import load_model

        self.model = load_model(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        from vitpose_core.evaluation import instance_score
        from vitpose_core.inference import TopDownPredictor

        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise ValueError("model input must be a DataFrame with an 'image' column (encoded image bytes) "
                             "and optionally 'boxes' (JSON [[x, y, w, h], ...])")
        flip_test = bool((params or {}).get("flip_test", False))
        predictor = TopDownPredictor(self.model, flip_test=flip_test, dtype=None)
        rows = []
        has_boxes = "boxes" in model_input.columns
        for index, (image_data, raw_boxes) in enumerate(zip(
                model_input["image"], model_input["boxes"] if has_boxes else [None] * len(model_input), strict=True)):
            image = decode_image(image_data, index)
            boxes = parse_boxes(raw_boxes, index)
            keypoints = predictor.predict(image, boxes)  # [P, K, 3]
            used_boxes = boxes if boxes is not None else np.array([[0.0, 0.0, image.shape[1], image.shape[0]]])
            for box, person in zip(used_boxes, keypoints, strict=True):
                rows.append({"image_index": index, "box": box.tolist(), "keypoints": person.reshape(-1).tolist(),
                             "keypoint_scores": person[:, 2].tolist(), "score": instance_score(person[:, 2])})
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


# models from code: MLflow runs this file (under a module name of its own) when it logs or loads the
# model, and serves the object set here; imported as part of the project (registry.py reads the
# signature), the file registers nothing
if __name__ != "pipelines.pyfunc_model":
    mlflow.models.set_model(ViTPosePyfunc())
