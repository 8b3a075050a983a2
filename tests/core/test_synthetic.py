"""Synthetic people: deterministic, COCO-valid, with occlusion and side-coded colours."""

from __future__ import annotations

import colorsys
import json

import cv2
import numpy as np
import pytest

from vitpose_core.keypoints import COCO
from vitpose_core.synthetic import (
    L_ELB,
    L_WRI,
    R_ELB,
    R_WRI,
    SyntheticConfig,
    coco_json,
    iter_dataset,
    render_image,
)

CONFIG = SyntheticConfig(num_images=40, seed=3)


@pytest.fixture(scope="module")
def dataset():
    return list(iter_dataset(CONFIG))


def test_same_seed_same_bytes_and_slices_match(dataset):
    again = list(iter_dataset(CONFIG, start=10, stop=15))
    assert [a[1] for a in again] == [d[1] for d in dataset[10:15]]  # any slice regenerates alone
    assert [a[2] for a in again] == [d[2] for d in dataset[10:15]]
    other = next(iter_dataset(SyntheticConfig(num_images=1, seed=4)))
    assert other[1] != dataset[0][1]


def test_annotations_are_consistent(dataset):
    people_per_image = [len(anns) for _, _, anns in dataset]
    assert min(people_per_image) >= 1 and max(people_per_image) >= 3
    visibilities = []
    for entry, jpeg, anns in dataset:
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (entry["height"], entry["width"], 3)
        for ann in anns:
            kp = np.asarray(ann["keypoints"]).reshape(COCO.num_keypoints, 3)
            labelled = kp[:, 2] > 0
            assert ann["num_keypoints"] == labelled.sum()
            assert np.all(kp[~labelled, :2] == 0)
            assert np.all((kp[labelled, 0] >= 0) & (kp[labelled, 0] <= entry["width"] - 1))
            assert np.all((kp[labelled, 1] >= 0) & (kp[labelled, 1] <= entry["height"] - 1))
            x, y, w, h = ann["bbox"]
            if ann["num_keypoints"]:
                assert w > 0 and h > 0
                # the box is the drawn silhouette, which covers every labelled joint
                assert np.all(kp[labelled, 0] >= x - 1) and np.all(kp[labelled, 0] <= x + w + 1)
                assert np.all(kp[labelled, 1] >= y - 1) and np.all(kp[labelled, 1] <= y + h + 1)
            visibilities.extend(kp[:, 2].tolist())
    counts = np.bincount(np.asarray(visibilities, int), minlength=3)
    assert counts[2] > counts[1] > 0, f"expected mostly visible plus some occluded keypoints, got {counts}"


def _hue(bgr: np.ndarray) -> float:
    b, g, r = (bgr / 255.0).tolist()
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360


def test_left_and_right_limbs_have_distinct_colours():
    # a single unoccluded person: the forearm's middle carries the side's colour
    config = SyntheticConfig(num_images=1, min_people=1, max_people=1, occluder_prob=0.0, seed=11)
    image, (person,) = render_image(0, config)
    kp = person["keypoints"]
    left = image[tuple(np.round((kp[L_ELB, :2] + kp[L_WRI, :2]) / 2).astype(int)[::-1])].astype(float)
    right = image[tuple(np.round((kp[R_ELB, :2] + kp[R_WRI, :2]) / 2).astype(int)[::-1])].astype(float)
    assert abs(_hue(left) - 35) < 25  # left forearm: orange
    assert abs(_hue(right) - 180) < 25  # right forearm: cyan


def test_coco_json_loads_and_scores_perfectly_against_itself(tmp_path, dataset):
    from pycocotools.coco import COCO as CocoApi
    from pycocotools.cocoeval import COCOeval

    path = tmp_path / "ann.json"
    path.write_bytes(coco_json([d[0] for d in dataset], [a for d in dataset for a in d[2]], CONFIG))
    gt = CocoApi(str(path))
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in json.loads(path.read_text())["annotations"] if a["num_keypoints"] > 0]
    evaluator = COCOeval(gt, gt.loadRes(results), "keypoints")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="min_people"):
        SyntheticConfig(min_people=3, max_people=2)


@pytest.mark.parametrize("layout", ["aic", "mpii"])
def test_other_layouts_label_the_same_people_in_their_keypoint_set(dataset, layout):
    """AIC-14 / MPII-16 people (the second layout multi-dataset training needs): same images, same
    joints where the names agree, the set's extra points where they belong, valid COCO ground truth."""
    from vitpose_core.evaluation import evaluate_keypoints, load_ground_truth
    from vitpose_core.keypoints import get_keypoint_set

    keypoint_set = get_keypoint_set(layout)
    config = SyntheticConfig(num_images=40, seed=3, layout=layout)
    other = list(iter_dataset(config, stop=10))
    images, annotations = [], []
    for (entry, jpeg, anns), (_, coco_jpeg, coco_anns) in zip(other, dataset[:10], strict=True):
        assert jpeg == coco_jpeg  # the layout changes labels, not pixels
        for ann, coco_ann in zip(anns, coco_anns, strict=True):
            kp = np.asarray(ann["keypoints"]).reshape(keypoint_set.num_keypoints, 3)
            coco_kp = np.asarray(coco_ann["keypoints"]).reshape(COCO.num_keypoints, 3)
            for name in set(keypoint_set.names) & set(COCO.names):
                np.testing.assert_array_equal(kp[keypoint_set.names.index(name)], coco_kp[COCO.names.index(name)])
            top, neck = keypoint_set.names.index("head_top"), keypoint_set.names.index(
                "neck" if layout == "aic" else "thorax")
            shoulders = coco_kp[[COCO.names.index("left_shoulder"), COCO.names.index("right_shoulder")]]
            if kp[top, 2] and kp[neck, 2] and shoulders[:, 2].all():
                assert kp[top, 1] < kp[neck, 1]  # the head top is above the neck (people stand upright)
                np.testing.assert_allclose(kp[neck, :2], shoulders[:, :2].mean(axis=0), atol=0.02)
        images.append(entry)
        annotations += anns
    document = json.loads(coco_json(images, annotations, config))
    assert document["categories"][0]["keypoints"] == list(keypoint_set.names)
    results = [{"image_id": a["image_id"], "keypoints": a["keypoints"], "score": 1.0}
               for a in annotations if a["num_keypoints"]]
    metrics = evaluate_keypoints(load_ground_truth(document), results, keypoint_set.sigmas_array())
    assert metrics["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown synthetic layout"):
        SyntheticConfig(layout="horse")


@pytest.mark.parametrize("layout", ["aic", "mpii", "posetrack18"])
def test_layouts_without_segmentation_carry_the_box_area_their_real_files_are_scored_with(layout):
    """OKS divides by the annotation's area. Real AIC, MPII and PoseTrack18 files have no segmentation: their
    loaders (and AIC's official evaluation, whose small sigmas are calibrated for it) use the box area. With
    the silhouette instead (about a quarter of the box), AIC-layout OKS was twice as strict as on real AIC, and
    bench_multi_dataset's AIC AP was 0 even for the model trained on AIC alone (issue 16)."""
    from vitpose_core.evaluation import evaluate_keypoints, load_ground_truth
    from vitpose_core.keypoints import get_keypoint_set

    config = SyntheticConfig(num_images=20, seed=5, layout=layout)
    images, annotations = [], []
    for entry, _, anns in iter_dataset(config):
        images.append(entry)
        annotations += anns
    document = json.loads(coco_json(images, annotations, config))
    as_real_files_come = json.loads(json.dumps(document))
    for ann in as_real_files_come["annotations"]:
        del ann["area"]  # what load_ground_truth then fills in: w x h
    rng = np.random.default_rng(0)
    results = []
    for ann in annotations:
        if ann["num_keypoints"]:
            keypoints = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
            keypoints[:, :2] += rng.normal(0.0, 2.0, keypoints[:, :2].shape)  # a good model's few pixels
            results.append({"image_id": ann["image_id"], "keypoints": keypoints.reshape(-1).tolist(), "score": 1.0})
    sigmas = get_keypoint_set(layout).sigmas_array()
    synthetic = evaluate_keypoints(load_ground_truth(document), results, sigmas)["AP"]
    assert synthetic == pytest.approx(evaluate_keypoints(load_ground_truth(as_real_files_come), results, sigmas)["AP"])
    if layout == "aic":
        assert synthetic > 0.5  # 0.22 with the silhouette area


def test_coco_layout_area_is_the_visible_silhouette(dataset):
    """COCO's area is the segmentation's: here the visible silhouette, well inside the box."""
    people = [ann for _, _, anns in dataset for ann in anns if ann["num_keypoints"]]
    assert all(0 < ann["area"] < ann["bbox"][2] * ann["bbox"][3] for ann in people if ann["area"])
    assert np.median([ann["area"] / (ann["bbox"][2] * ann["bbox"][3]) for ann in people]) < 0.5
