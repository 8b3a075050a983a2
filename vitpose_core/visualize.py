"""Draw poses: skeleton limbs and keypoints over an image (predict, serve previews, training previews)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .keypoints import KeypointSet

# one colour per person (RGB), cycled; keypoints of left/right sides get a lighter/darker shade
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 128, 0), (51, 153, 255), (0, 255, 0), (255, 51, 255), (255, 255, 0), (0, 255, 255), (255, 0, 0),
)


def draw_poses(image_rgb: np.ndarray, keypoints: np.ndarray, keypoint_set: KeypointSet,
               score_threshold: float = 0.3, boxes_xywh: Sequence[Sequence[float]] | None = None,
               radius: int | None = None, thickness: int | None = None) -> np.ndarray:
    """A copy of `image_rgb` [H, W, 3] uint8 with poses drawn.

    Args:
        keypoints: [P, K, 3] (x, y, score) in image pixels, or [P, K, 2] (all drawn).
        keypoint_set: gives the skeleton (0-based limb index pairs).
        score_threshold: keypoints (and limbs touching them) scoring below are not drawn.
        boxes_xywh: optional [P, 4] person boxes drawn as thin rectangles.
        radius, thickness: default to sizes proportional to the image.
    """
    image = np.ascontiguousarray(np.asarray(image_rgb, dtype=np.uint8).copy())
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.size == 0:
        return image
    if keypoints.ndim != 3 or keypoints.shape[1] != keypoint_set.num_keypoints:
        raise ValueError(f"keypoints must be [P, {keypoint_set.num_keypoints}, 2 or 3], got {keypoints.shape}")
    scores = keypoints[..., 2] if keypoints.shape[2] > 2 else np.ones(keypoints.shape[:2])
    side = max(image.shape[:2])
    radius = radius or max(2, side // 160)
    thickness = thickness or max(1, side // 240)
    for person, (points, person_scores) in enumerate(zip(keypoints[..., :2], scores, strict=True)):
        colour = PALETTE[person % len(PALETTE)]
        if boxes_xywh is not None and person < len(boxes_xywh):
            x, y, w, h = (int(round(v)) for v in boxes_xywh[person])
            cv2.rectangle(image, (x, y), (x + w, y + h), colour, 1, cv2.LINE_AA)
        shown = (person_scores >= score_threshold) & np.all(np.isfinite(points), axis=1)
        for a, b in keypoint_set.skeleton:
            if shown[a] and shown[b]:
                cv2.line(image, _pixel(points[a]), _pixel(points[b]), colour, thickness, cv2.LINE_AA)
        for k in np.flatnonzero(shown):
            cv2.circle(image, _pixel(points[k]), radius, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(image, _pixel(points[k]), radius, colour, 1, cv2.LINE_AA)
    return image


def _pixel(point: np.ndarray) -> tuple[int, int]:
    return int(round(float(point[0]))), int(round(float(point[1])))
