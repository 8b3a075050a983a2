"""Crop geometry: box -> center/scale, the UDP warp and its inverse, and the one-warp augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from vitpose_core.augment import NO_AUGMENT, AugmentConfig, augment_top_down
from vitpose_core.geometry import (
    box_xywh_to_center_scale,
    compose_affine,
    crop_to_image_matrices,
    horizontal_flip_matrix,
    invert_affine,
    transform_points,
    udp_warp_matrix,
    warp_image,
)
from vitpose_core.keypoints import COCO

INPUT_SIZE = (192, 256)  # (w, h)


def test_center_scale_fixes_aspect_and_pads():
    center, scale = box_xywh_to_center_scale(np.array([[10.0, 20.0, 30.0, 100.0], [0, 0, 300, 100]]), 192 / 256)
    np.testing.assert_allclose(center, [[25.0, 70.0], [150.0, 50.0]])
    # tall box: width grows to 100 * 0.75; wide box: height grows to 300 / 0.75; then x1.25
    np.testing.assert_allclose(scale, [[75.0 * 1.25, 125.0], [375.0, 500.0]])


@pytest.mark.parametrize("bad", [[0, 0, 0, 10], [0, 0, 10, -1], [0, 0, np.nan, 5], [1, 2, 3]])
def test_bad_boxes_raise(bad):
    with pytest.raises(ValueError, match="box"):
        box_xywh_to_center_scale(np.array(bad, dtype=float), 0.75)


def test_udp_warp_maps_region_corners_to_pixel_centre_corners():
    center, scale = np.array([100.0, 80.0]), np.array([60.0, 80.0])
    matrix = udp_warp_matrix(center, scale, 0.0, INPUT_SIZE)
    corners = np.array([[70.0, 40.0], [130.0, 120.0], [100.0, 80.0]])
    np.testing.assert_allclose(transform_points(corners, matrix), [[0, 0], [191, 255], [95.5, 127.5]], atol=1e-9)


def test_rotation_is_about_the_centre():
    matrix = udp_warp_matrix([50.0, 50.0], [40.0, 40.0], 90.0, (41, 41))
    # 90 degrees: a point right of the centre in the image lands below the crop centre (y down)
    np.testing.assert_allclose(transform_points(np.array([[60.0, 50.0]]), matrix), [[20.0, 30.0]], atol=1e-9)


def test_crop_uncrop_is_exact_for_random_boxes_rotations_scales():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        box = np.concatenate([rng.uniform(-50, 600, 2), rng.uniform(2, 500, 2)])
        center, scale = box_xywh_to_center_scale(box, INPUT_SIZE[0] / INPUT_SIZE[1])
        scale = scale * rng.uniform(0.5, 1.5)
        rotation = rng.uniform(-80, 80)
        image_to_crop = udp_warp_matrix(center, scale, rotation, INPUT_SIZE)
        points = rng.uniform(-100, 1000, (17, 2))
        back = transform_points(transform_points(points, image_to_crop), invert_affine(image_to_crop))
        worst = max(worst, float(np.abs(back - points).max()))
    assert worst < 1e-3, worst


def test_batched_transform_matches_per_instance():
    rng = np.random.default_rng(1)
    centers, scales = rng.uniform(50, 500, (5, 2)), rng.uniform(20, 300, (5, 2))
    crop_to_image = crop_to_image_matrices(centers, scales, INPUT_SIZE, rng.uniform(-30, 30, 5))
    points = rng.uniform(0, 200, (5, 17, 3))
    batched = transform_points(points, crop_to_image)
    for i in range(5):
        np.testing.assert_allclose(batched[i], transform_points(points[i], crop_to_image[i]))
    np.testing.assert_array_equal(batched[..., 2], points[..., 2])  # scores pass through


def test_warp_image_samples_where_the_matrix_says():
    # a horizontal ramp image: pixel value = x; the crop's pixel values must equal the mapped x
    image = np.tile(np.arange(400, dtype=np.float32), (300, 1))
    matrix = udp_warp_matrix([200.0, 150.0], [150.0, 200.0], 0.0, INPUT_SIZE)
    crop = warp_image(image, matrix, INPUT_SIZE)
    assert crop.shape == (256, 192)
    xs = transform_points(np.stack([np.arange(192.0), np.zeros(192)], 1), invert_affine(matrix))[:, 0]
    np.testing.assert_allclose(crop[128], xs, atol=1e-2)


def test_flip_matrix_is_a_reflection_and_composes():
    flip = horizontal_flip_matrix(640)
    np.testing.assert_allclose(transform_points(np.array([[0.0, 5.0], [639.0, 7.0]]), flip), [[639, 5], [0, 7]])
    np.testing.assert_allclose(compose_affine(flip, flip), [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def _person(shared_data):
    import json

    data = json.loads((shared_data / "coco" / "test_coco.json").read_text())
    ann = max(data["annotations"], key=lambda a: a["num_keypoints"])
    image_info = next(i for i in data["images"] if i["id"] == ann["image_id"])
    keypoints = np.array(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
    return ann, image_info, keypoints


def test_augment_without_augmentation_is_the_plain_crop(shared_data):
    import cv2

    ann, info, keypoints = _person(shared_data)
    image = cv2.imread(str(shared_data / "coco" / info["file_name"]))
    center, scale = box_xywh_to_center_scale(np.array(ann["bbox"]), 0.75)
    sample = augment_top_down(image, keypoints, keypoints[:, 2], center, scale, INPUT_SIZE, COCO,
                              np.random.default_rng(0), NO_AUGMENT)
    matrix = udp_warp_matrix(center, scale, 0.0, INPUT_SIZE)
    np.testing.assert_array_equal(sample.image, warp_image(image, matrix, INPUT_SIZE))
    np.testing.assert_allclose(sample.keypoints, transform_points(keypoints[:, :2], matrix))


def test_augment_flip_swaps_pairs_and_mirrors_pixels(shared_data):
    import cv2

    ann, info, keypoints = _person(shared_data)
    image = cv2.imread(str(shared_data / "coco" / info["file_name"]))
    center, scale = box_xywh_to_center_scale(np.array(ann["bbox"]), 0.75)
    only_flip = AugmentConfig(flip_prob=1.0, half_body_prob=0.0, scale_factor=0.0, rotation_factor=0.0)
    flipped = augment_top_down(image, keypoints, keypoints[:, 2], center, scale, INPUT_SIZE, COCO,
                               np.random.default_rng(0), only_flip)
    plain = augment_top_down(image, keypoints, keypoints[:, 2], center, scale, INPUT_SIZE, COCO,
                             np.random.default_rng(0), NO_AUGMENT)
    assert flipped.flipped
    # the region is mirrored in the image, so the crop is the mirror of the plain crop (to interpolation)
    diff = np.abs(flipped.image.astype(int) - plain.image[:, ::-1].astype(int))
    assert np.median(diff) <= 1
    # left keypoint i of the flipped sample is the mirrored right keypoint of the plain one
    mirrored = plain.keypoints.copy()
    mirrored[:, 0] = INPUT_SIZE[0] - 1 - mirrored[:, 0]
    labelled = flipped.visibility > 0
    np.testing.assert_allclose(flipped.keypoints[labelled], mirrored[COCO.flip_index][labelled], atol=1e-6)
    np.testing.assert_array_equal(flipped.visibility, keypoints[COCO.flip_index, 2])


def test_augment_random_keypoints_follow_the_single_warp(shared_data):
    import cv2

    ann, info, keypoints = _person(shared_data)
    image = cv2.imread(str(shared_data / "coco" / info["file_name"]))
    center, scale = box_xywh_to_center_scale(np.array(ann["bbox"]), 0.75)
    rng = np.random.default_rng(3)
    seen_flip = seen_rotation = False
    for _ in range(20):
        sample = augment_top_down(image, keypoints, keypoints[:, 2], center, scale, INPUT_SIZE, COCO, rng,
                                  AugmentConfig(half_body_prob=0.5))
        assert sample.image.shape == (256, 192, 3)
        expected = transform_points(keypoints[:, :2], sample.image_to_input)
        if sample.flipped:
            expected = expected[COCO.flip_index]
        np.testing.assert_allclose(sample.keypoints, expected, atol=1e-6)
        seen_flip |= sample.flipped
        seen_rotation |= sample.rotation_deg != 0
    assert seen_flip and seen_rotation


def test_augment_rejects_wrong_keypoint_count():
    with pytest.raises(ValueError, match="17 keypoints"):
        augment_top_down(np.zeros((10, 10, 3), np.uint8), np.zeros((14, 2)), np.zeros(14), [5, 5], [5, 5],
                         INPUT_SIZE, COCO, np.random.default_rng(0))


def test_normalize_images_matches_the_per_pixel_formula_in_both_channel_orders():
    from vitpose_core.inference import IMAGENET_MEAN, IMAGENET_STD, normalize_images

    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    expected = ((rgb.astype(np.float64) - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)  # (N, 3, H, W)
    for images, order in ((rgb, "rgb"), (np.ascontiguousarray(rgb[..., ::-1]), "bgr")):
        out = normalize_images(images, channel_order=order)
        assert out.dtype == np.float32 and out.shape == (3, 3, 5, 4) and out.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="channel_order"):
        normalize_images(rgb, channel_order="hsv")
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        normalize_images(rgb[0])
