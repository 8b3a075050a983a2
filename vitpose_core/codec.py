"""UDP Gaussian heatmap codec with DARK-UDP decoding, flip test and the weighted joints-MSE loss.

Follows mmpose 1.x `mmpose/codecs/udp_heatmap.py` (the numerics ViTPose uses: `use_udp=True`,
sigma 2, DARK-UDP with an 11x11 blur). Symbols, defined once:

- N: instances (person crops), K: keypoints.
- [w, h] = `input_size`: the crop fed to the model, (W, H) order as in cv2 and mmpose.
- [W, H] = `heatmap_size`: the heatmap, normally `input_size / 4`.
- Keypoint coordinates are pixel centres (see `geometry.py`). UDP maps input to heatmap by the
  ratio of pixel-centre spans, not of sizes: kp_heatmap = kp_input * ([W, H] - 1) / ([w, h] - 1).

Encode: `keypoints` [K, 2] in input pixels + `visibility` [K] -> `heatmaps` [K, H, W] (float32,
peak 1) and `weights` [K] (1 for labelled keypoints whose Gaussian touches the map, else 0).
Decode: `heatmaps` [N, K, H, W] -> `keypoints` [N, K, 2] in input pixels, `scores` [N, K] (the
heatmap maximum, before refinement).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch


class UDPHeatmapCodec:
    """Encode keypoints as UDP Gaussian heatmaps; decode heatmaps with argmax + DARK-UDP refinement.

    Args:
        input_size: crop size (w, h) the model sees, e.g. (192, 256).
        heatmap_size: heatmap size (W, H); defaults to `input_size // 4`.
        sigma: Gaussian standard deviation in heatmap pixels.
        blur_kernel_size: odd kernel of the Gaussian blur DARK applies before the Taylor step.
    """

    def __init__(self, input_size: Sequence[int] = (192, 256), heatmap_size: Sequence[int] | None = None,
                 sigma: float = 2.0, blur_kernel_size: int = 11) -> None:
        if len(input_size) != 2 or min(input_size) < 2:
            raise ValueError(f"input_size must be (w, h) with both >= 2, got {tuple(input_size)}")
        if heatmap_size is None:
            heatmap_size = (int(input_size[0]) // 4, int(input_size[1]) // 4)
        if len(heatmap_size) != 2 or min(heatmap_size) < 2:
            raise ValueError(f"heatmap_size must be (W, H) with both >= 2, got {tuple(heatmap_size)}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if blur_kernel_size < 1 or blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be a positive odd number, got {blur_kernel_size}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.heatmap_size = (int(heatmap_size[0]), int(heatmap_size[1]))
        self.sigma = float(sigma)
        self.blur_kernel_size = int(blur_kernel_size)
        # input pixel -> heatmap pixel factor of UDP: ratio of the pixel-centre spans
        self.input_to_heatmap = (np.array(self.heatmap_size, np.float64) - 1) / (np.array(self.input_size) - 1)

    def __repr__(self) -> str:
        return (f"UDPHeatmapCodec(input_size={self.input_size}, heatmap_size={self.heatmap_size}, "
                f"sigma={self.sigma}, blur_kernel_size={self.blur_kernel_size})")

    def encode(self, keypoints: np.ndarray, visibility: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keypoints [K, 2] (input pixels), visibility [K] (COCO 0/1/2 or 0/1) -> heatmaps [K, H, W], weights [K]."""
        keypoints = np.asarray(keypoints, dtype=np.float64)
        visibility = np.asarray(visibility)
        if keypoints.ndim != 2 or keypoints.shape[1] < 2:
            raise ValueError(f"keypoints must have shape [K, 2], got {keypoints.shape}")
        if visibility.shape != (keypoints.shape[0],):
            raise ValueError(f"visibility must have shape [{keypoints.shape[0]}], got {visibility.shape}")
        return generate_udp_gaussian_heatmaps(self.heatmap_size, keypoints[:, :2] * self.input_to_heatmap,
                                              visibility > 0, self.sigma)

    def decode(self, heatmaps: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """heatmaps [N, K, H, W] (or [K, H, W]) -> keypoints [N, K, 2] in input pixels, scores [N, K]."""
        if isinstance(heatmaps, torch.Tensor):
            heatmaps = heatmaps.detach().float().cpu().numpy()
        heatmaps = np.asarray(heatmaps, dtype=np.float32)
        if heatmaps.ndim == 3:
            heatmaps = heatmaps[None]
        if heatmaps.ndim != 4:
            raise ValueError(f"heatmaps must have shape [N, K, H, W], got {heatmaps.shape}")
        if (heatmaps.shape[3], heatmaps.shape[2]) != self.heatmap_size:
            raise ValueError(f"heatmaps are {heatmaps.shape[3]}x{heatmaps.shape[2]} (WxH) but the codec "
                             f"expects heatmap_size {self.heatmap_size}")
        keypoints, scores = get_heatmap_maximum(heatmaps)
        keypoints = refine_keypoints_dark_udp(keypoints, heatmaps, self.blur_kernel_size)
        found = scores > 0
        keypoints = np.where(found[..., None], keypoints / self.input_to_heatmap, -1.0)
        return keypoints, scores


def generate_udp_gaussian_heatmaps(heatmap_size: Sequence[int], keypoints: np.ndarray, visible: np.ndarray,
                                   sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """UDP Gaussians: keypoints [K, 2] in heatmap pixels -> heatmaps [K, H, W] float32, weights [K] float32.

    Exactly mmpose's `generate_udp_gaussian_heatmaps`: the Gaussian is centred on the sub-pixel
    keypoint but only drawn inside the (2 * 3 sigma + 1)^2 window around the rounded keypoint;
    a keypoint whose window misses the map gets weight 0 (nothing to learn from).
    """
    width, height = int(heatmap_size[0]), int(heatmap_size[1])
    num_keypoints = keypoints.shape[0]
    radius = int(sigma * 3)
    # rounding as mmpose does it ((x + 0.5) truncated toward zero), so windows match bit for bit
    mu = np.trunc(keypoints + 0.5)
    inside = ~((mu[:, 0] - radius >= width) | (mu[:, 1] - radius >= height)
               | (mu[:, 0] + radius + 1 < 0) | (mu[:, 1] + radius + 1 < 0))
    weights = (np.asarray(visible, bool) & inside & np.all(np.isfinite(keypoints), axis=1)).astype(np.float32)

    xs = np.arange(width, dtype=np.float64)
    ys = np.arange(height, dtype=np.float64)
    heatmaps = np.zeros((num_keypoints, height, width), dtype=np.float32)
    for k in np.flatnonzero(weights):
        x_kernel = np.exp(-((xs - keypoints[k, 0]) ** 2) / (2 * sigma**2)) * (np.abs(xs - mu[k, 0]) <= radius)
        y_kernel = np.exp(-((ys - keypoints[k, 1]) ** 2) / (2 * sigma**2)) * (np.abs(ys - mu[k, 1]) <= radius)
        heatmaps[k] = np.outer(y_kernel, x_kernel)  # separable 2-D Gaussian (H, W)
    return heatmaps, weights


def get_heatmap_maximum(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """heatmaps [N, K, H, W] -> integer argmax locations [N, K, 2] (x, y) as float, max values [N, K].

    Locations of heatmaps whose maximum is <= 0 are -1 (nothing detected), as in mmpose.
    """
    n, k, height, width = heatmaps.shape
    flat = heatmaps.reshape(n, k, height * width)
    index = np.argmax(flat, axis=-1)
    scores = np.take_along_axis(flat, index[..., None], axis=-1)[..., 0].astype(np.float32)
    locations = np.stack([index % width, index // width], axis=-1).astype(np.float64)
    locations[scores <= 0] = -1
    return locations, scores


def gaussian_blur_heatmaps(heatmaps: np.ndarray, kernel_size: int) -> np.ndarray:
    """Blur each map of heatmaps [N, K, H, W] with a zero-padded Gaussian, keeping each map's maximum.

    Same as mmpose 1.x `gaussian_blur` (zero padding, cv2's kernel for `kernel_size` with sigma 0);
    the rescale restores each map's peak so DARK's 1e-3 floor before the log cuts at the same level
    as on the raw heatmap.
    """
    n, k, height, width = heatmaps.shape
    border = (kernel_size - 1) // 2
    maps = heatmaps.reshape(n * k, height, width).astype(np.float32)
    # the kernel cv2.GaussianBlur(ksize, sigma=0) uses (sigma = 2 for ksize 11), applied separably
    kernel = cv2.getGaussianKernel(kernel_size, 0).astype(np.float32)[:, 0]
    padded = np.pad(maps, ((0, 0), (border, border), (border, border)))  # (NK, H + 2b, W + 2b), zeros
    rows = sum(kernel[i] * padded[:, i:i + height, :] for i in range(kernel_size))  # (NK, H, W + 2b)
    blurred = sum(kernel[i] * rows[:, :, i:i + width] for i in range(kernel_size))  # (NK, H, W)
    original_max = maps.reshape(n * k, -1).max(axis=1)
    blurred_max = blurred.reshape(n * k, -1).max(axis=1)
    ratio = np.divide(original_max, blurred_max, out=np.zeros_like(original_max), where=blurred_max > 0)
    return (blurred * ratio[:, None, None]).reshape(n, k, height, width)


def refine_keypoints_dark_udp(keypoints: np.ndarray, heatmaps: np.ndarray, blur_kernel_size: int) -> np.ndarray:
    """DARK-UDP sub-pixel refinement of integer keypoints [N, K, 2] on heatmaps [N, K, H, W].

    DARK (Zhang et al. CVPR 2020): blur the heatmap, take its log (a Gaussian becomes a quadratic),
    then one Newton step x <- x - H^-1 g from the argmax with central finite differences for the
    gradient g and Hessian H. Keypoints at -1 (empty heatmap) are returned unchanged.
    """
    n, k, height, width = heatmaps.shape
    log_maps = np.log(np.clip(gaussian_blur_heatmaps(heatmaps, blur_kernel_size), 1e-3, 50.0))
    # edge padding so finite differences at the border read valid neighbours (N, K, H + 2, W + 2)
    padded = np.pad(log_maps, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge").astype(np.float64)
    valid = keypoints[..., 0] >= 0
    px = np.clip(keypoints[..., 0], 0, width - 1).astype(np.int64) + 1
    py = np.clip(keypoints[..., 1], 0, height - 1).astype(np.int64) + 1
    nn_index, kk_index = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")

    def at(dx: int, dy: int) -> np.ndarray:
        return padded[nn_index, kk_index, py + dy, px + dx]

    center = at(0, 0)
    dx = 0.5 * (at(1, 0) - at(-1, 0))
    dy = 0.5 * (at(0, 1) - at(0, -1))
    dxx = at(1, 0) - 2 * center + at(-1, 0)
    dyy = at(0, 1) - 2 * center + at(0, -1)
    dxy = 0.5 * (at(1, 1) - at(1, 0) - at(0, 1) + 2 * center - at(-1, 0) - at(0, -1) + at(-1, -1))
    hessian = np.stack([np.stack([dxx, dxy], -1), np.stack([dxy, dyy], -1)], -2)  # (N, K, 2, 2)
    hessian = hessian + np.finfo(np.float32).eps * np.eye(2)  # mmpose's regulariser for flat maps
    gradient = np.stack([dx, dy], axis=-1)[..., None]  # (N, K, 2, 1)
    step = (np.linalg.inv(hessian) @ gradient)[..., 0]
    refined = keypoints.astype(np.float64) - step
    return np.where(valid[..., None], refined, keypoints)


def flip_heatmaps(heatmaps: torch.Tensor | np.ndarray, flip_index: Sequence[int]) -> torch.Tensor | np.ndarray:
    """Heatmaps [N, K, H, W] of a mirrored crop -> heatmaps of the original crop.

    Mirror the width axis and swap left/right channels (`out[:, i] = flipped[:, flip_index[i]]`).
    Under UDP a mirror is the exact reflection x -> W - 1 - x on both input and heatmap, so no
    one-pixel shift is needed (mmpose's `shift_heatmap=False` for UDP).
    """
    flip_index = list(flip_index)
    if heatmaps.shape[-3] != len(flip_index):
        raise ValueError(f"flip_index has {len(flip_index)} entries but heatmaps have {heatmaps.shape[-3]} channels")
    if isinstance(heatmaps, torch.Tensor):
        return heatmaps.flip(-1)[..., flip_index, :, :]
    return np.ascontiguousarray(np.asarray(heatmaps)[..., ::-1][..., flip_index, :, :])


def keypoint_mse_loss(predicted: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor | None = None,
                      ) -> torch.Tensor:
    """Weighted joints-MSE of ViTPose (mmpose 0.x `JointsMSELoss(use_target_weight=True)`).

    loss = 0.5 * mean over (N, K, H, W) of (w_k * (pred - target))^2, where predicted and target are
    [N, K, H, W] and target_weight [N, K] (or [N, K, 1]) zeroes unlabelled/out-of-map keypoints.
    """
    if predicted.shape != target.shape or predicted.ndim != 4:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} must both be "
                         "[N, K, H, W]")
    diff = predicted.float() - target.float()
    if target_weight is not None:
        weight = target_weight.float().reshape(predicted.shape[0], predicted.shape[1], 1, 1)
        diff = diff * weight
    return 0.5 * diff.pow(2).mean()
