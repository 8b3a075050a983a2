"""Top-down crop geometry: boxes -> (center, scale), the UDP affine warp and its exact inverse.

Conventions (see docs/codec.md):

- Image coordinates are pixel *centres*: pixel (i, j) of an image covers x in [i - 0.5, i + 0.5]; a
  keypoint at x = 0 sits on the centre of the first column. COCO keypoints use the same convention.
- `center` [2] = (cx, cy) and `scale` [2] = (sw, sh) are in image pixels (mmpose 1.x; mmpose 0.x
  stored scale / 200). `scale` is the side lengths of the region that is warped onto the input.
- `input_size` / `output_size` are (W, H) as in cv2 and mmpose codecs (note: the model config's
  `img_size` is (H, W)).
- Affine matrices are float64 [2, 3] acting on column vectors (x, y, 1): p' = M @ [x, y, 1].

UDP (unbiased data processing, Huang et al. CVPR 2020) maps the region's extent of `scale` onto
`output_size - 1` pixel *intervals*, so the first and last pixel centres of the region land exactly
on the first and last pixel centres of the crop, and flipping is a pure reflection x -> W - 1 - x.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

DEFAULT_PADDING = 1.25


def _as_size(size: Sequence[int], what: str) -> tuple[int, int]:
    if len(size) != 2 or int(size[0]) < 2 or int(size[1]) < 2:
        raise ValueError(f"{what} must be (W, H) with both >= 2, got {tuple(size)}")
    return int(size[0]), int(size[1])


def fix_aspect_ratio(scale: np.ndarray, aspect_ratio: float) -> np.ndarray:
    """Grow the shorter side of `scale` [..., 2] (w, h) so that w / h == `aspect_ratio` (never shrinks)."""
    scale = np.asarray(scale, dtype=np.float64)
    w, h = scale[..., 0], scale[..., 1]
    wide = w > h * aspect_ratio
    return np.stack([np.where(wide, w, h * aspect_ratio), np.where(wide, w / aspect_ratio, h)], axis=-1)


def box_xywh_to_center_scale(boxes_xywh: np.ndarray, aspect_ratio: float,
                             padding: float = DEFAULT_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """COCO boxes [N, 4] (x, y, w, h) -> center [N, 2], scale [N, 2] in pixels.

    center = (x + w / 2, y + h / 2); the box is first grown to the input aspect ratio
    (`aspect_ratio` = input W / H, e.g. 192 / 256), then multiplied by `padding` for context.
    Accepts a single box [4] too (returns [2], [2]).
    """
    boxes = np.asarray(boxes_xywh, dtype=np.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4] (x, y, w, h), got {boxes.shape}")
    if not np.all(np.isfinite(boxes)) or np.any(boxes[..., 2:] <= 0):
        raise ValueError("boxes must be finite with positive width and height")
    if aspect_ratio <= 0 or padding <= 0:
        raise ValueError(f"aspect_ratio and padding must be > 0, got {aspect_ratio}, {padding}")
    center = boxes[..., :2] + 0.5 * boxes[..., 2:]
    scale = fix_aspect_ratio(boxes[..., 2:], aspect_ratio) * padding
    return center, scale


def udp_warp_matrix(center: Sequence[float], scale: Sequence[float], rotation_deg: float,
                    output_size: Sequence[int]) -> np.ndarray:
    """The UDP affine [2, 3] from image pixels to crop pixels (mmpose `get_udp_warp_matrix`).

    The region of size `scale` centred on `center`, rotated by `rotation_deg` (counter-clockwise as
    seen on screen), is mapped onto a crop of `output_size` (W, H):

        p_crop = S @ (R(theta) @ (p - center) + scale / 2),   S = diag((W - 1) / sw, (H - 1) / sh),

    so `center` lands on ((W - 1) / 2, (H - 1) / 2), the middle of the crop's pixel centres.
    """
    out_w, out_h = _as_size(output_size, "output_size")
    cx, cy = float(center[0]), float(center[1])
    sw, sh = float(scale[0]), float(scale[1])
    if not (sw > 0 and sh > 0):
        raise ValueError(f"scale must be positive, got {(sw, sh)}")
    theta = np.deg2rad(rotation_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    sx, sy = (out_w - 1) / sw, (out_h - 1) / sh
    return np.array([
        [cos * sx, -sin * sx, sx * (-cx * cos + cy * sin + 0.5 * sw)],
        [sin * sy, cos * sy, sy * (-cx * sin - cy * cos + 0.5 * sh)],
    ], dtype=np.float64)


def to_homogeneous(matrix: np.ndarray) -> np.ndarray:
    """[..., 2, 3] affine -> [..., 3, 3] with last row (0, 0, 1)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape[-2:] != (2, 3):
        raise ValueError(f"affine matrix must have shape [..., 2, 3], got {matrix.shape}")
    bottom = np.broadcast_to(np.array([0.0, 0.0, 1.0]), matrix.shape[:-2] + (1, 3))
    return np.concatenate([matrix, bottom], axis=-2)


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine [..., 2, 3] that applies `inner` first, then `outer`."""
    return (to_homogeneous(outer) @ to_homogeneous(inner))[..., :2, :]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Exact inverse [..., 2, 3] of an affine [..., 2, 3] (e.g. image->crop gives crop->image)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    linear, shift = matrix[..., :2], matrix[..., 2:]
    det = np.linalg.det(linear)
    if np.any(np.abs(det) < 1e-12):
        raise ValueError("affine matrix is singular and has no inverse")
    inv_linear = np.linalg.inv(linear)
    return np.concatenate([inv_linear, -inv_linear @ shift], axis=-1)


def horizontal_flip_matrix(image_width: int) -> np.ndarray:
    """Affine [2, 3] of a left-right mirror of an image `image_width` pixels wide: x -> W - 1 - x."""
    return np.array([[-1.0, 0.0, image_width - 1.0], [0.0, 1.0, 0.0]])


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply affine `matrix` [2, 3] (or [N, 2, 3] with points [N, ..., 2]) to points [..., 2].

    Only the first two channels are transformed; extra trailing channels (visibility, score) of a
    [..., 3] array are passed through unchanged.
    """
    points = np.asarray(points, dtype=np.float64)
    matrix = np.asarray(matrix, dtype=np.float64)
    if points.shape[-1] < 2:
        raise ValueError(f"points must have shape [..., >=2], got {points.shape}")
    if matrix.shape[-2:] != (2, 3):
        raise ValueError(f"affine matrix must have shape [..., 2, 3], got {matrix.shape}")
    xy = points[..., :2]
    if matrix.ndim == 3:
        # one matrix per instance: broadcast [N, 2, 3] over [N, ..., 2]
        extra = xy.ndim - 2
        linear = matrix[:, :, :2].reshape((matrix.shape[0],) + (1,) * extra + (2, 2))
        shift = matrix[:, :, 2].reshape((matrix.shape[0],) + (1,) * extra + (2,))
        moved = np.einsum("...ij,...j->...i", linear, xy) + shift
    else:
        moved = xy @ matrix[:, :2].T + matrix[:, 2]
    return np.concatenate([moved, points[..., 2:]], axis=-1)


def warp_image(image: np.ndarray, matrix: np.ndarray, output_size: Sequence[int],
               interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Warp `image` [H, W, C] with the image->crop affine `matrix` [2, 3] to a crop of `output_size` (W, H).

    Pixels that fall outside the source image are 0 (black), as in mmpose's TopdownAffine.
    """
    out_w, out_h = _as_size(output_size, "output_size")
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be [H, W] or [H, W, C] and non-empty, got {image.shape}")
    return cv2.warpAffine(image, np.asarray(matrix, dtype=np.float64), (out_w, out_h), flags=interpolation,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def crop_to_image_matrices(centers: np.ndarray, scales: np.ndarray, input_size: Sequence[int],
                           rotations_deg: np.ndarray | None = None) -> np.ndarray:
    """The crop->image affines [N, 2, 3] for N regions (centers [N, 2], scales [N, 2])."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    scales = np.asarray(scales, dtype=np.float64).reshape(-1, 2)
    rotations = np.zeros(len(centers)) if rotations_deg is None else np.asarray(rotations_deg, np.float64)
    return np.stack([invert_affine(udp_warp_matrix(c, s, r, input_size))
                     for c, s, r in zip(centers, scales, rotations, strict=True)]).reshape(-1, 2, 3)
