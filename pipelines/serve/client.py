"""Python client of the pose endpoint.

    client = PoseClient("http://127.0.0.1:8000")
    result = client.predict("people.jpg", boxes=[[10, 20, 100, 220]])
    result["persons"][0]["keypoints"]  # K x (x, y, score) in image pixels
    result["persons"][0]["score"]      # person score: box score x mean confident keypoint score
    client.predict_coco("people.jpg", image_id=42)  # COCO results records [{image_id, category_id, keypoints, score}]

Files are uploaded as they are (multipart); numpy arrays (RGB uint8 [H, W, 3]) are encoded as PNG,
which is lossless, so the server sees exactly the pixels of the array.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests


class PoseClientError(RuntimeError):
    """The server answered with an error status; `status` and the server's `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def encode_png(image_rgb: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] (or gray [H, W]) -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_rgb, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class PoseClient:
    """Client of `POST /v1/pose`, `GET /v1/model` and `GET /healthz`.

    Args:
        url: the service root, e.g. http://127.0.0.1:8000 (the app's route prefix included, if any).
        timeout_s: per-request timeout.
        retries: how many times a 503 (overload, replica restarting) is retried, waiting Retry-After.
    """

    def __init__(self, url: str, timeout_s: float = 60.0, retries: int = 2) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.session = requests.Session()

    def predict(self, image: str | Path | np.ndarray | bytes, boxes: list[list[float]] | np.ndarray | None = None
                ) -> dict[str, Any]:
        """Keypoints of the people in `image` (a path, encoded bytes, or an RGB uint8 array).

        Returns the response JSON: `model`, `version`, `image_size` (w, h) and `persons`, each with its
        `box` [x, y, w, h], `box_score`, `keypoints` K x [x, y, score], `keypoint_scores` and `score`.
        """
        return self._predict(image, boxes, params=None)

    def predict_coco(self, image: str | Path | np.ndarray | bytes, boxes: list[list[float]] | np.ndarray | None = None,
                     image_id: int = 0) -> list[dict[str, Any]]:
        """Like `predict`, answered as COCO keypoint results: [{image_id, category_id, keypoints, score}]."""
        return self._predict(image, boxes, params={"format": "coco", "image_id": str(int(image_id))})

    def _predict(self, image: str | Path | np.ndarray | bytes, boxes: list[list[float]] | np.ndarray | None,
                 params: dict[str, str] | None) -> Any:
        if isinstance(image, np.ndarray):
            data, name = encode_png(image), "image.png"
        elif isinstance(image, bytes):
            data, name = image, "image"
        else:
            path = Path(image)
            data, name = path.read_bytes(), path.name
        form = {}
        if boxes is not None:
            form["boxes"] = json.dumps(np.asarray(boxes, dtype=float).reshape(-1, 4).tolist())
        return self._request("POST", "/v1/pose", files={"image": (name, data)}, data=form, params=params)

    def model_info(self) -> dict[str, Any]:
        return self._request("GET", "/v1/model")

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(self.retries + 1):
            response = self.session.request(method, self.url + path, timeout=self.timeout_s, **kwargs)
            if response.status_code == 503 and attempt < self.retries:
                time.sleep(float(response.headers.get("Retry-After") or 1))
                continue
            break
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text[:200]
            raise PoseClientError(response.status_code, message)
        return response.json()
