"""COCO evaluation on the real samples, and the oracle round trip through crop, codec and back."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from vitpose_core.augment import AugmentConfig, augment_top_down
from vitpose_core.codec import UDPHeatmapCodec, flip_heatmaps
from vitpose_core.evaluation import (
    PersonPrediction,
    evaluate_keypoints,
    evaluate_prediction_file,
    ground_truth_boxes,
    infer_keypoint_set,
    load_detections,
    load_ground_truth,
    oks_nms,
    rescore_and_nms,
)
from vitpose_core.geometry import (
    box_xywh_to_center_scale,
    compose_affine,
    horizontal_flip_matrix,
    invert_affine,
    transform_points,
    udp_warp_matrix,
)
from vitpose_core.inference import decode_to_image

INPUT_SIZE = (192, 256)


def _ground_truth_as_results(path):
    data = json.loads(path.read_text())
    return [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
            for a in data["annotations"] if a["num_keypoints"] > 0]


def test_example_predictions_score_the_published_ap(shared_data):
    coco = shared_data / "coco"
    metrics = evaluate_prediction_file(coco / "test_coco.json", coco / "example_coco_preds.json")
    assert metrics["AP"] == pytest.approx(0.8609, abs=5e-4)
    assert metrics["AP50"] == pytest.approx(0.9931, abs=5e-4)
    assert metrics["AP75"] == pytest.approx(0.9109, abs=5e-4)
    assert metrics["APm"] == pytest.approx(0.7756, abs=5e-4)
    assert metrics["APl"] == pytest.approx(0.9373, abs=5e-4)
    assert metrics["AR"] == pytest.approx(0.8750, abs=5e-4)


@pytest.mark.parametrize("name, expected_set", [
    ("coco/test_coco.json", "coco"), ("ochuman/test_ochuman.json", "coco"),
    ("aic/test_aic.json", "aic"), ("crowdpose/test_crowdpose.json", "crowdpose"),
])
def test_ground_truth_as_predictions_scores_one(shared_data, name, expected_set):
    """AIC and CrowdPose lack `area` (plain COCOeval raises KeyError): they must still evaluate."""
    path = shared_data / name
    ground_truth = load_ground_truth(path)
    assert infer_keypoint_set(ground_truth).name == expected_set
    assert all("area" in a and "iscrowd" in a for a in ground_truth.dataset["annotations"])
    metrics = evaluate_prediction_file(path, _ground_truth_as_results(path))
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AR"] == pytest.approx(1.0)


def test_bad_predictions_raise_named_errors(shared_data):
    path = shared_data / "coco" / "test_coco.json"
    good = _ground_truth_as_results(path)
    with pytest.raises(ValueError, match="51"):
        evaluate_prediction_file(path, [{**good[0], "keypoints": good[0]["keypoints"][:42]}])
    with pytest.raises(ValueError, match="do not contain"):
        evaluate_prediction_file(path, [{**good[0], "image_id": 123456789}])
    with pytest.raises(FileNotFoundError):
        evaluate_prediction_file(path, shared_data / "nope.json")
    assert evaluate_prediction_file(path, [])["AP"] == 0.0


def test_detections_are_filtered_by_score(shared_data):
    all_boxes = load_detections(shared_data / "coco" / "test_coco_det_AP_H_56.json")
    confident = load_detections(shared_data / "coco" / "test_coco_det_AP_H_56.json", score_threshold=0.5)
    assert sum(map(len, all_boxes.values())) == 118
    assert 0 < sum(map(len, confident.values())) < 118
    assert all(score >= 0.5 for boxes in confident.values() for _, score in boxes)


def test_oks_nms_drops_near_duplicates_and_keeps_distinct():
    rng = np.random.default_rng(0)
    person = np.concatenate([rng.uniform(0, 100, (17, 2)), np.ones((17, 1))], 1)
    duplicate = person + np.array([0.5, 0.5, 0])
    other = person + np.array([60.0, 0, 0])
    keep = oks_nms(np.stack([duplicate, person, other]), np.array([0.8, 0.9, 0.7]), np.full(3, 100.0**2),
                   np.full(17, 0.05))
    assert keep == [1, 2]


def test_rescoring_is_box_score_times_mean_confident_keypoint_score():
    keypoints = np.zeros((17, 3))
    keypoints[:, 2] = 0.1
    keypoints[:4, 2] = [0.9, 0.7, 0.5, 0.3]
    results = rescore_and_nms([PersonPrediction(1, keypoints, box_score=0.5, area=1.0)], np.full(17, 0.05))
    assert results[0]["score"] == pytest.approx(0.5 * np.mean([0.9, 0.7, 0.5, 0.3]))


def _oracle_predictions(shared_data, name, flip):
    """GT keypoints -> crop -> UDP targets -> (flip undone) -> decode -> image pixels, per GT box."""
    ground_truth = load_ground_truth(shared_data / name)
    keypoint_set = infer_keypoint_set(ground_truth)
    codec = UDPHeatmapCodec(INPUT_SIZE)
    annotations = {(a["image_id"], tuple(a["bbox"])): a for a in ground_truth.dataset["annotations"]}
    folder = (shared_data / name).parent
    predictions, worst_error = [], 0.0
    for image_id, boxes in ground_truth_boxes(ground_truth).items():
        anns = [a for (i, _), a in annotations.items() if i == image_id and max(a["keypoints"]) > 0]
        image = cv2.imread(str(folder / ground_truth.imgs[image_id]["file_name"])) if flip else None
        for (box, _), ann in zip(boxes, anns, strict=True):
            gt = np.array(ann["keypoints"], np.float64).reshape(-1, 3)
            center, scale = box_xywh_to_center_scale(np.array(box), INPUT_SIZE[0] / INPUT_SIZE[1])
            if flip:
                only_flip = AugmentConfig(flip_prob=1.0, half_body_prob=0.0, scale_factor=0.0, rotation_prob=0.0)
                sample = augment_top_down(image, gt, gt[:, 2], center, scale, INPUT_SIZE, keypoint_set,
                                          np.random.default_rng(0), only_flip)
                heatmaps, _ = codec.encode(sample.keypoints, sample.visibility)
                heatmaps = flip_heatmaps(heatmaps[None], keypoint_set.flip_index)
                # the un-flipped maps live in the mirror of the augmented crop
                image_to_crop = compose_affine(horizontal_flip_matrix(INPUT_SIZE[0]), sample.image_to_input)
            else:
                image_to_crop = udp_warp_matrix(center, scale, 0.0, INPUT_SIZE)
                heatmaps, _ = codec.encode(transform_points(gt[:, :2], image_to_crop), gt[:, 2])
                heatmaps = heatmaps[None]
            decoded = decode_to_image(heatmaps, invert_affine(image_to_crop)[None], codec)[0]
            labelled = gt[:, 2] > 0
            worst_error = max(worst_error, float(np.abs(decoded[labelled, :2] - gt[labelled, :2]).max()))
            predictions.append(PersonPrediction(image_id, decoded, 1.0, float(np.prod(scale))))
    results = rescore_and_nms(predictions, keypoint_set.sigmas_array())
    return evaluate_keypoints(ground_truth, results, keypoint_set.sigmas_array()), worst_error


@pytest.mark.parametrize("name", ["coco/test_coco.json", "ochuman/test_ochuman.json"])
@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flipped"])
def test_oracle_round_trip_reaches_full_ap(shared_data, name, flip):
    metrics, worst_error = _oracle_predictions(shared_data, name, flip)
    assert metrics["AP"] >= 0.99, metrics
    # sub-pixel everywhere: DARK recovers the labelled keypoints within a fraction of a crop pixel
    assert worst_error < 1.0, worst_error
