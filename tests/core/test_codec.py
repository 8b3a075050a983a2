"""UDP heatmap codec: encode/decode round trip, golden values, DARK, flip test and the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitpose_core.codec import (
    UDPHeatmapCodec,
    flip_heatmaps,
    generate_udp_gaussian_heatmaps,
    get_heatmap_maximum,
    keypoint_mse_loss,
)
from vitpose_core.keypoints import COCO


def test_encode_golden_values():
    codec = UDPHeatmapCodec((192, 256))
    assert codec.heatmap_size == (48, 64)
    # input (95.5, 127.5) is the crop centre; UDP maps it to heatmap (23.5, 31.5)
    heatmaps, weights = codec.encode(np.array([[95.5, 127.5], [0.0, 0.0]]), np.array([2, 1]))
    assert heatmaps.shape == (2, 64, 48) and heatmaps.dtype == np.float32
    np.testing.assert_array_equal(weights, [1, 1])
    expected = np.exp(-(0.5**2 + 0.5**2) / 8)
    np.testing.assert_allclose(heatmaps[0, 31:33, 23:25], np.full((2, 2), expected), rtol=1e-6)
    assert heatmaps[1, 0, 0] == pytest.approx(1.0)
    # the Gaussian is cut to the 13x13 window around the rounded centre (radius 3 sigma = 6)
    assert heatmaps[1, 0, 6] > 0 and heatmaps[1, 0, 7] == 0


def test_unlabelled_and_off_map_keypoints_get_zero_weight():
    codec = UDPHeatmapCodec((192, 256))
    keypoints = np.array([[50.0, 50.0], [50.0, 50.0], [-40.0, 50.0], [-20.0, 50.0], [300.0, 10.0]])
    heatmaps, weights = codec.encode(keypoints, np.array([0, 2, 2, 2, 2]))
    # -40 input px = -10 heatmap px: window [-10-6, -10+6] misses the map; -20 -> -5: window reaches x=1
    np.testing.assert_array_equal(weights, [0, 1, 0, 1, 0])
    assert heatmaps[0].max() == 0 and heatmaps[2].max() == 0 and heatmaps[3].max() > 0


def test_encode_decode_round_trip_is_subpixel():
    codec = UDPHeatmapCodec((192, 256))
    rng = np.random.default_rng(0)
    keypoints = np.stack([rng.uniform(20, 171, 17 * 20), rng.uniform(20, 235, 17 * 20)], 1).reshape(20, 17, 2)
    heatmaps = np.stack([codec.encode(k, np.ones(17))[0] for k in keypoints])
    decoded, scores = codec.decode(heatmaps)
    assert decoded.shape == (20, 17, 2) and scores.shape == (20, 17)
    assert np.abs(decoded - keypoints).max() < 0.05  # pixels of the 192x256 input
    # plain argmax would be off by up to half a heatmap pixel = 2 input pixels
    argmax, _ = get_heatmap_maximum(heatmaps)
    assert np.abs(argmax / codec.input_to_heatmap - keypoints).max() > 1.0
    assert scores.min() > 0.85 and scores.max() <= 1.0


def test_decode_of_empty_heatmap_is_minus_one_with_zero_score():
    codec = UDPHeatmapCodec((192, 256))
    decoded, scores = codec.decode(torch.zeros(1, 3, 64, 48))
    np.testing.assert_array_equal(decoded, -1.0)
    np.testing.assert_array_equal(scores, 0.0)


def test_decode_rejects_wrong_heatmap_size():
    with pytest.raises(ValueError, match="heatmap_size"):
        UDPHeatmapCodec((192, 256)).decode(np.zeros((1, 17, 48, 64)))


@pytest.mark.parametrize("kwargs", [{"input_size": (1, 256)}, {"sigma": 0}, {"blur_kernel_size": 4}])
def test_bad_codec_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        UDPHeatmapCodec(**kwargs)


def test_flip_heatmaps_of_flipped_targets_recovers_the_targets():
    """Encode mirrored keypoints (with left/right swapped), flip the maps back: same as the originals."""
    codec = UDPHeatmapCodec((192, 256))
    rng = np.random.default_rng(1)
    keypoints = np.stack([rng.uniform(10, 181, 17), rng.uniform(10, 245, 17)], 1)
    original, _ = codec.encode(keypoints, np.ones(17))
    mirrored = keypoints.copy()
    mirrored[:, 0] = 191 - mirrored[:, 0]  # UDP: the mirror of x is w - 1 - x, no shift
    flipped_maps, _ = codec.encode(mirrored[COCO.flip_index], np.ones(17))
    np.testing.assert_allclose(flip_heatmaps(flipped_maps[None], COCO.flip_index)[0], original, atol=1e-6)
    back_torch = flip_heatmaps(torch.from_numpy(flipped_maps[None]), COCO.flip_index)
    np.testing.assert_allclose(back_torch[0].numpy(), original, atol=1e-6)
    with pytest.raises(ValueError, match="flip_index"):
        flip_heatmaps(original[None], list(range(14)))


def test_generate_matches_mmpose_window_reference():
    """Element-wise against a direct port of mmpose's loop (window placement and sub-pixel offset)."""
    rng = np.random.default_rng(2)
    keypoints = rng.uniform(-8, 60, (17, 2))
    heatmaps, weights = generate_udp_gaussian_heatmaps((48, 64), keypoints, np.ones(17, bool), 2.0)
    width, height, radius, size = 48, 64, 6, 13
    grid = np.arange(size, dtype=np.float32)
    for k in range(17):
        mu = (keypoints[k] + 0.5).astype(np.int64)
        left, top = mu - radius
        if left >= width or top >= height or mu[0] + radius + 1 < 0 or mu[1] + radius + 1 < 0:
            assert weights[k] == 0
            continue
        x0, y0 = radius + keypoints[k] - mu
        gaussian = np.exp(-((grid - x0) ** 2 + (grid[:, None] - y0) ** 2) / 8)
        expected = np.zeros((height, width), np.float32)
        for gy in range(size):
            for gx in range(size):
                if 0 <= top + gy < height and 0 <= left + gx < width:
                    expected[top + gy, left + gx] = gaussian[gy, gx]
        np.testing.assert_allclose(heatmaps[k], expected, atol=1e-6)


def test_loss_is_weighted_half_mse():
    torch.manual_seed(0)
    predicted, target = torch.rand(2, 3, 8, 6), torch.rand(2, 3, 8, 6)
    weight = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    expected = 0.5 * ((predicted - target) ** 2 * weight[..., None, None]).mean()
    torch.testing.assert_close(keypoint_mse_loss(predicted, target, weight), expected)
    assert keypoint_mse_loss(target, target, weight).item() == 0.0
    with pytest.raises(ValueError):
        keypoint_mse_loss(predicted, target[:, :2], weight)
