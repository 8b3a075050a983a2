"""Top-down training augmentation folded into one affine, so each image is resampled exactly once.

ViTPose trains with (mmpose 0.x pipeline, in this order): random horizontal flip (p=0.5) with
left/right swap, half-body (p=0.3 when more than 8 keypoints are labelled), random scale
(`clip(1 + 0.5 * randn, 0.5, 1.5)`) and rotation (`clip(40 * randn, -80, 80)` degrees with p=0.6),
then the UDP affine to the input size.

Here every step only updates the region (center, scale, rotation) in the frame of the (possibly
mirrored) source image; the mirror itself is an affine too, so the source image is warped once with

    image_to_input = udp_warp_matrix(center, scale, rotation, input_size) @ mirror

which is as sharp as a single crop and cheaper than warping twice. Sizes are (W, H) throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .geometry import (
    compose_affine,
    fix_aspect_ratio,
    horizontal_flip_matrix,
    transform_points,
    udp_warp_matrix,
    warp_image,
)
from .keypoints import KeypointSet


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the training augmentation (ViTPose's COCO recipe by default)."""

    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    half_body_min_keypoints: int = 8  # half-body only when more keypoints than this are labelled
    half_body_padding: float = 1.5
    upper_body_prob: float = 0.5
    scale_factor: float = 0.5  # scale multiplier ~ clip(1 + scale_factor * N(0, 1), 1 -/+ scale_factor)
    rotation_factor: float = 40.0  # degrees ~ clip(rotation_factor * N(0, 1), -/+ 2 * rotation_factor)
    rotation_prob: float = 0.6

    def __post_init__(self) -> None:
        for name in ("flip_prob", "half_body_prob", "upper_body_prob", "rotation_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {value}")
        if not 0.0 <= self.scale_factor < 1.0:
            raise ValueError(f"AugmentConfig.scale_factor must be in [0, 1), got {self.scale_factor}")
        if self.rotation_factor < 0 or self.half_body_padding <= 0:
            raise ValueError("AugmentConfig.rotation_factor must be >= 0 and half_body_padding > 0")


NO_AUGMENT = AugmentConfig(flip_prob=0.0, half_body_prob=0.0, scale_factor=0.0, rotation_factor=0.0,
                           rotation_prob=0.0)


@dataclass(frozen=True)
class AugmentedSample:
    """One augmented person crop.

    Attributes:
        image: [h, w, C] crop at the input size, same dtype as the source.
        keypoints: [K, 2] float64 in input pixels (left/right already swapped if flipped).
        visibility: [K] visibility of the source, permuted with the keypoints on a flip.
        image_to_input: [2, 3] affine from source image pixels to input pixels.
        flipped: whether the sample was mirrored.
        rotation_deg, center, scale: the sampled region, in the (mirrored) source frame.
    """

    image: np.ndarray
    keypoints: np.ndarray
    visibility: np.ndarray
    image_to_input: np.ndarray
    flipped: bool
    rotation_deg: float
    center: np.ndarray
    scale: np.ndarray


def half_body_region(keypoints: np.ndarray, visibility: np.ndarray, keypoint_set: KeypointSet,
                     aspect_ratio: float, padding: float, rng: np.random.Generator,
                     upper_body_prob: float = 0.5) -> tuple[np.ndarray, np.ndarray] | None:
    """Region (center [2], scale [2]) around the labelled upper or lower body, or None if too few joints.

    Prefers the upper body with probability `upper_body_prob` when it has more than 2 labelled
    keypoints, else the lower body when it has, else whatever the upper body has (mmpose 0.x).
    """
    labelled = visibility > 0
    upper_mask = np.zeros(len(keypoints), bool)
    upper_mask[list(keypoint_set.upper_body)] = True
    upper = keypoints[labelled & upper_mask]
    lower = keypoints[labelled & ~upper_mask]
    if rng.random() < upper_body_prob and len(upper) > 2:
        selected = upper
    elif len(lower) > 2:
        selected = lower
    else:
        selected = upper
    if len(selected) < 2:
        return None
    center = selected.mean(axis=0)
    size = selected.max(axis=0) - selected.min(axis=0)
    return center, fix_aspect_ratio(size, aspect_ratio) * padding


def augment_top_down(image: np.ndarray, keypoints: np.ndarray, visibility: np.ndarray, center: Sequence[float],
                     scale: Sequence[float], input_size: Sequence[int], keypoint_set: KeypointSet,
                     rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> AugmentedSample:
    """Sample flip / half-body / scale / rotation and warp `image` once to the input crop.

    Args:
        image: [H, W, C] source (a full image or a context crop of it).
        keypoints: [K, 2] (or [K, >=2]) source pixels.
        visibility: [K] 0 = unlabelled, > 0 labelled.
        center, scale: the person region in source pixels (from `box_xywh_to_center_scale`).
        input_size: (w, h) of the model input.
        keypoint_set: gives `flip_index` and `upper_body`.
        rng: numpy Generator (one per worker, seeded, for reproducible epochs).
        config: probabilities and ranges; `NO_AUGMENT` gives the plain evaluation crop.

    Returns:
        An `AugmentedSample`; pass `keypoints` and `visibility` to `UDPHeatmapCodec.encode`, which
        gives weight 0 to keypoints pushed off the map.
    """
    image = np.asarray(image)
    keypoints = np.asarray(keypoints, dtype=np.float64)[:, :2]
    visibility = np.asarray(visibility)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be [H, W] or [H, W, C], got {image.shape}")
    if keypoints.shape[0] != keypoint_set.num_keypoints or visibility.shape != (keypoint_set.num_keypoints,):
        raise ValueError(f"expected {keypoint_set.num_keypoints} keypoints/visibilities for keypoint set "
                         f"{keypoint_set.name!r}, got {keypoints.shape} and {visibility.shape}")
    center = np.asarray(center, dtype=np.float64).copy()
    scale = np.asarray(scale, dtype=np.float64).copy()
    aspect_ratio = input_size[0] / input_size[1]

    # 1. mirror: work in the mirrored frame from here on (keypoints, region, left/right labels)
    mirror = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    flipped = bool(rng.random() < config.flip_prob)
    if flipped:
        mirror = horizontal_flip_matrix(image.shape[1])
        flip_index = keypoint_set.flip_index
        keypoints = transform_points(keypoints, mirror)[flip_index]
        visibility = visibility[flip_index]
        center = transform_points(center, mirror)

    # 2. half-body: replace the region by one around the upper or lower body
    if (np.count_nonzero(visibility > 0) > config.half_body_min_keypoints
            and rng.random() < config.half_body_prob):
        region = half_body_region(keypoints, visibility, keypoint_set, aspect_ratio, config.half_body_padding,
                                  rng, config.upper_body_prob)
        if region is not None:
            center, scale = region

    # 3. scale and rotation (always draw both normals so the random stream does not depend on branches)
    scale_draw, rotation_draw, rotation_coin = rng.standard_normal(), rng.standard_normal(), rng.random()
    sf, rf = config.scale_factor, config.rotation_factor
    scale = scale * np.clip(1.0 + sf * scale_draw, 1.0 - sf, 1.0 + sf)
    rotation = float(np.clip(rf * rotation_draw, -2 * rf, 2 * rf)) if rotation_coin < config.rotation_prob else 0.0

    # 4. one warp from the original source pixels to the input crop
    region_to_input = udp_warp_matrix(center, scale, rotation, input_size)
    image_to_input = compose_affine(region_to_input, mirror)
    crop = warp_image(image, image_to_input, input_size)
    return AugmentedSample(image=crop, keypoints=transform_points(keypoints, region_to_input),
                           visibility=visibility.copy(), image_to_input=image_to_input, flipped=flipped,
                           rotation_deg=rotation, center=center, scale=scale)
