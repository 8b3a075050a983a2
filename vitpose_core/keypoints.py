"""Keypoint sets: names, left/right flip pairs, skeleton and OKS sigmas.

A `KeypointSet` is everything the codec, the evaluator and the drawing code need to know about a
dataset's keypoints. Sigmas are the per-keypoint OKS constants (already divided by 10, as in
pycocotools' `COCOeval.kpt_oks_sigmas`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KeypointSet:
    name: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based index pairs
    sigmas: tuple[float, ...]
    upper_body: tuple[int, ...]  # indices used by half-body augmentation

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    @property
    def flip_index(self) -> list[int]:
        """Permutation that swaps left and right: `flipped[:, i] = original[:, flip_index[i]]`."""
        index = list(range(self.num_keypoints))
        for left, right in self.flip_pairs:
            index[left], index[right] = right, left
        return index

    def sigmas_array(self) -> np.ndarray:
        return np.asarray(self.sigmas, dtype=np.float64)


COCO = KeypointSet(
    name="coco",
    names=(
        "nose", "left_eye", "right_eye", "left_ear", "right_ear",
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
        "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    ),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    skeleton=(
        (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
        (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
    ),
    # pycocotools COCOeval.kpt_oks_sigmas
    sigmas=(
        0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
        0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
    ),
    upper_body=tuple(range(11)),
)

AIC = KeypointSet(
    name="aic",
    names=(
        "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
        "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
        "head_top", "neck",
    ),
    flip_pairs=((0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11)),
    skeleton=(
        (2, 1), (1, 0), (0, 13), (13, 3), (3, 4), (4, 5), (8, 7), (7, 6), (6, 9), (9, 10),
        (10, 11), (12, 13), (0, 6), (3, 9),
    ),
    # AI Challenger's own OKS constants (as used by its official evaluation and by mmpose)
    sigmas=(
        0.01388152, 0.01515228, 0.01057665, 0.01417709, 0.01497891, 0.01402144, 0.03909642,
        0.03686941, 0.01981803, 0.03843971, 0.03412318, 0.02415081, 0.01291456, 0.01236173,
    ),
    upper_body=(0, 1, 2, 3, 4, 5, 12, 13),
)

CROWDPOSE = KeypointSet(
    name="crowdpose",
    names=(
        "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
        "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "top_head", "neck",
    ),
    flip_pairs=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)),
    skeleton=(
        (12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (13, 6), (13, 7), (6, 8), (8, 10),
        (7, 9), (9, 11),
    ),
    # CrowdPose's OKS constants (crowdposetools / mmpose crowdpose.py)
    sigmas=(0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089, 0.079, 0.079),
    upper_body=(0, 1, 2, 3, 4, 5, 12, 13),
)

# AIC limb joint i (0..11) is COCO keypoint AIC_TO_COCO[i]; head_top and neck have no COCO twin.
AIC_TO_COCO: tuple[int, ...] = (6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15)

KEYPOINT_SETS: dict[str, KeypointSet] = {"coco": COCO, "aic": AIC, "crowdpose": CROWDPOSE}


def get_keypoint_set(name: str) -> KeypointSet:
    try:
        return KEYPOINT_SETS[name]
    except KeyError:
        raise ValueError(f"unknown keypoint set {name!r}; known: {sorted(KEYPOINT_SETS)}") from None


def aic_to_coco(keypoints_aic: np.ndarray) -> np.ndarray:
    """Map AIC keypoints [..., 14, 3] to COCO layout [..., 17, 3]; COCO-only joints get visibility 0."""
    keypoints_aic = np.asarray(keypoints_aic)
    out = np.zeros(keypoints_aic.shape[:-2] + (COCO.num_keypoints, keypoints_aic.shape[-1]), keypoints_aic.dtype)
    out[..., list(AIC_TO_COCO), :] = keypoints_aic[..., : len(AIC_TO_COCO), :]
    return out
