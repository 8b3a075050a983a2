"""The person-detector contract: how a detector deployment plugs in front of the pose model.

ViTPose is top-down: it needs person boxes. A request that carries none is sent to the detector,
whose boxes then go through the same validation as client boxes (see `inputs.validate_boxes`; boxes
beyond `limits.max_boxes` are dropped, highest score first).

To plug one in, write a class with the `PersonDetector` method and name it in the serve config:

    class MyDetector:                                   # mypkg/detect.py
        def __init__(self, score_threshold: float = 0.5):
            self.net = load_my_detector()               # e.g. an RTMDet / YOLO person model
        async def detect(self, image: np.ndarray) -> np.ndarray:
            ...                                         # RGB uint8 [H, W, 3] -> [N, 5] (x, y, w, h, score)

    # serve config (args of build_app):
    detector: {import_path: "mypkg.detect:MyDetector", init_kwargs: {score_threshold: 0.4},
               num_replicas: 1, num_gpus: 0.5}

`build_app` wraps the class in its own Serve deployment (so it scales and fails independently of the
pose model) and hands the ingress a handle to it; the ingress awaits `handle.detect.remote(image)`.
Without a detector, `WholeImageDetector` runs inline in the ingress.

The project's own detector (a small torchvision model trained on the pipeline's images, see
`vitpose_core.detection`) is `TorchvisionPersonDetector`:

    detector: {import_path: "pipelines.serve.detector:TorchvisionPersonDetector",
               init_kwargs: {path: runs/detector, score_threshold: 0.5}}

`path` may also be a registered detector (`models:/vitpose-detector@champion`, what `vitpose run` serves when
the pipeline has a detect stage), resolved to a local copy when the replica starts.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class PersonDetector(Protocol):
    """Finds people in an image.

    `detect(image)` takes RGB uint8 [H, W, 3] and returns boxes [N, 4] (x, y, w, h) or [N, 5]
    (x, y, w, h, score) in image pixels, as a numpy array or nested lists; N may be 0. It may be a
    plain or an `async` method.
    """

    def detect(self, image: np.ndarray) -> Any: ...


class WholeImageDetector:
    """The default: one box covering the whole image (the usual choice for single-person crops)."""

    def detect(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        return np.array([[0.0, 0.0, float(width), float(height), 1.0]])


class TorchvisionPersonDetector:
    """A detector saved by `vitpose_core.detection.save_detector`, served as the `PersonDetector` deployment.

    Args:
        path: the detector directory (`detector.safetensors` + `detector.json`) on every node, an s3:// copy
            of one, or a registered detector (`models:/<name>@<alias>`, `models:/<name>/<version>`).
        score_threshold: boxes scoring below are dropped; None keeps the saved config's threshold.
        torch_threads: intra-op threads of this replica (0 = torch's default). One thread per replica
            is the fast choice on small shared CPUs (docs/serving.md, Performance).
        tracking_uri: the MLflow store of a `models:/` path (None: MLFLOW_TRACKING_URI).
    """

    def __init__(self, path: str, score_threshold: float | None = None, torch_threads: int = 1,
                 tracking_uri: str | None = None) -> None:
        import torch

        from vitpose_core.detection import DETECTOR_CONFIG_NAME, load_detector

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if str(path).startswith(("models:/", "runs:/", "s3://")):
            from pipelines.registry import resolve_directory

            path = str(resolve_directory(path, DETECTOR_CONFIG_NAME, tracking_uri))
        self.source = path
        overrides = {} if score_threshold is None else {"score_threshold": score_threshold}
        self.detector = load_detector(path, **overrides)
        self.detector.detect(np.zeros((64, 64, 3), np.uint8))  # warm-up: the first request should not pay for it

    async def detect(self, image: np.ndarray) -> np.ndarray:
        """[N, 5] (x, y, w, h, score) of one RGB uint8 image, highest score first."""
        # the forward pass releases the GIL: run it off the event loop so queued requests keep arriving
        return await asyncio.to_thread(self.detector.detect, image)

    def check_health(self) -> None:
        if getattr(self, "detector", None) is None:
            raise RuntimeError("detector not loaded")


def import_detector_class(import_path: str) -> type:
    """`module.sub:ClassName` -> the class; a clear ValueError when it does not exist or lacks `detect`."""
    module_name, _, class_name = import_path.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"detector import_path must look like 'module:ClassName', got {import_path!r}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import detector {import_path!r}: {error}") from None
    if not callable(getattr(cls, "detect", None)):
        raise ValueError(f"detector {import_path!r} has no detect(image) method")
    return cls


def boxes_from_detections(detections: Any, max_boxes: int) -> list[list[float]]:
    """Detector output -> at most `max_boxes` [x, y, w, h] lists, highest score first when scores exist."""
    array = np.asarray(detections, dtype=np.float64)
    if array.size == 0:
        return []
    array = array.reshape(len(array), -1)
    if array.shape[1] not in (4, 5):
        raise ValueError(f"detector returned boxes of shape {array.shape}; expected [N, 4] or [N, 5]")
    if array.shape[1] == 5:
        array = array[np.argsort(-array[:, 4], kind="stable")]
    return array[:max_boxes, :4].tolist()
