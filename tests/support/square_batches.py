"""A tiny learnable pose batch: images with a bright square where keypoint 0's UDP Gaussian target is.

A model learns it in a few steps, so engine, distillation and FSDP tests can check that training moves."""

from __future__ import annotations

import numpy as np
import torch

from vitpose_core.codec import UDPHeatmapCodec


def square_batch(batch_size: int, image_hw: tuple[int, int], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """`batch_size` images of (H, W) = `image_hw` with their 17-keypoint targets, drawn from `rng`."""
    height, width = image_hw
    codec = UDPHeatmapCodec(input_size=(width, height), sigma=2.0)
    images = np.zeros((batch_size, 3, height, width), np.float32)
    targets, weights = [], []
    for i in range(batch_size):
        keypoints = rng.uniform([6, 6], [width - 6, height - 6], size=(17, 2))
        x, y = keypoints[0].astype(int)
        images[i, :, y - 3:y + 4, x - 3:x + 4] = 2.0
        heatmaps, weight = codec.encode(keypoints, np.full(17, 2))
        targets.append(heatmaps)
        weights.append(weight)
    return {"image": torch.from_numpy(images), "target": torch.from_numpy(np.stack(targets)),
            "target_weight": torch.from_numpy(np.stack(weights))}
