"""Keypoint sets as data: the built-in sets, sets read from COCO files and YAML, and every shared
sample read and evaluated with its own set (ground truth as predictions -> AP 1.0)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vitpose_core import build_model, load_model, save_checkpoint
from vitpose_core.datasets import mpii_to_coco, parse_annotation_bytes, records_to_coco
from vitpose_core.evaluation import evaluate_keypoints, infer_keypoint_set, load_ground_truth
from vitpose_core.keypoints import (
    DEFAULT_SIGMA,
    KEYPOINT_SETS,
    KeypointSet,
    KeypointSetError,
    canonical_name,
    get_keypoint_set,
    infer_flip_pairs,
    keypoint_set_from_category,
    keypoint_set_from_coco_file,
    load_keypoint_set_yaml,
    resolve_keypoint_set,
)
from vitpose_core.visualize import draw_poses


def _image_sizes(folder: Path, names) -> dict[str, tuple[int, int]]:
    sizes = {}
    for name in names:
        image = cv2.imread(str(folder / name))
        assert image is not None, folder / name
        sizes[name] = (image.shape[1], image.shape[0])
    return sizes


def _ground_truth_as_results(document: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a.get("category_id", 1), "keypoints": a["keypoints"],
             "score": 1.0} for a in document["annotations"] if max(a["keypoints"][2::3]) > 0]


def _coco_sample(shared: Path, relative: str) -> tuple[dict, str]:
    path = shared / relative
    return json.loads(path.read_text()), str(path)


def _aic_raw_sample(shared: Path) -> tuple[dict, str]:
    """The official raw AIC file, limited to the 3 images the sample holds, converted with our parser."""
    folder = shared / "aic"
    path = folder / "keypoint_annotations_example.json"
    parsed = parse_annotation_bytes(path.read_bytes(), "aic", "val", path.name)
    assert parsed.format == "aic_raw" and parsed.keypoint_set.name == "aic"
    present = {p.name for p in folder.glob("*.jpg")}
    records = [r for r in parsed.records if r["file_name"] in present]
    assert len(records) == 9  # the same 9 people as mmpose's COCO-style test_aic.json
    return records_to_coco(records, parsed.keypoint_set, _image_sizes(folder, present)), str(path)


def _mpii_sample(shared: Path) -> tuple[dict, str]:
    """MPII's own list layout (test_mpii.json) through mpii_to_coco."""
    folder = shared / "mpii"
    path = folder / "test_mpii.json"
    document = json.loads(path.read_text())
    return mpii_to_coco(document, _image_sizes(folder, {e["image"] for e in document}), source=str(path)), str(path)


SAMPLES = {
    "coco": (lambda s: _coco_sample(s, "coco/test_coco.json"), "coco", 17),
    "aic": (lambda s: _coco_sample(s, "aic/test_aic.json"), "aic", 14),
    "aic_raw": (_aic_raw_sample, "aic", 14),
    "mpii": (_mpii_sample, "mpii", 16),
    "crowdpose": (lambda s: _coco_sample(s, "crowdpose/test_crowdpose.json"), "crowdpose", 14),
    "ochuman": (lambda s: _coco_sample(s, "ochuman/test_ochuman.json"), "coco", 17),  # OCHuman is COCO-17
    "ap10k": (lambda s: _coco_sample(s, "ap10k/test_ap10k.json"), "ap10k", 17),
    "posetrack18": (lambda s: _coco_sample(s, "posetrack18/annotations/test_posetrack18_val.json"), "posetrack18", 17),
}


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_each_shared_sample_reads_and_evaluates_with_its_own_keypoint_set(shared_data, sample):
    load, expected_set, count = SAMPLES[sample]
    document, source = load(shared_data)
    ground_truth = load_ground_truth(document)
    keypoint_set = infer_keypoint_set(ground_truth)
    assert (keypoint_set.name, keypoint_set.num_keypoints) == (expected_set, count)
    assert keypoint_set == KEYPOINT_SETS[expected_set] and not keypoint_set.sigmas_guessed
    # the record parser (what sharding uses) reads every person with that layout
    parsed = parse_annotation_bytes(json.dumps(document).encode(), sample, "val", source)
    assert parsed.keypoint_set == keypoint_set
    assert parsed.records and all(len(r["keypoints"]) == 3 * count for r in parsed.records)
    metrics = evaluate_keypoints(ground_truth, _ground_truth_as_results(document), keypoint_set.sigmas_array())
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AR"] == pytest.approx(1.0)


def test_ochuman_is_available_by_name_with_coco_layout():
    assert get_keypoint_set("ochuman").same_layout(KEYPOINT_SETS["coco"])
    assert get_keypoint_set("wholebody").name == "coco_wholebody"


def test_wrong_predictions_do_not_score_one(shared_data):
    """The AP 1.0 above is earned: shifting every keypoint by a few pixels lowers it."""
    document, _ = _mpii_sample(shared_data)
    results = _ground_truth_as_results(document)
    for result in results:
        result["keypoints"] = [v + 25.0 if i % 3 < 2 else v for i, v in enumerate(result["keypoints"])]
    metrics = evaluate_keypoints(load_ground_truth(document), results, KEYPOINT_SETS["mpii"].sigmas_array())
    assert metrics["AP"] < 0.9


def test_builtin_sets_are_consistent():
    for name, keypoint_set in KEYPOINT_SETS.items():
        assert keypoint_set.name == name
        for left, right in keypoint_set.flip_pairs:  # flip pairs join a left and a right keypoint
            names = {canonical_name(keypoint_set.names[left]), canonical_name(keypoint_set.names[right])}
            if not name == "coco_wholebody" or left < 23:
                assert any("left" in n for n in names) and any("right" in n for n in names), names
        assert len(keypoint_set.upper_body) < keypoint_set.num_keypoints
    wholebody = KEYPOINT_SETS["coco_wholebody"]
    assert wholebody.num_keypoints == len(wholebody.sigmas) == 133
    assert wholebody.flip_index[23] == 23 + 16 and wholebody.flip_index[91] == 112  # jaw end, hand roots
    for name in ("coco", "aic", "mpii", "crowdpose", "ap10k", "posetrack18"):  # names carry the flips
        assert infer_flip_pairs(KEYPOINT_SETS[name].names) == KEYPOINT_SETS[name].flip_pairs


WIDGET = {"id": 1, "name": "widget", "supercategory": "thing",
          "keypoints": ["Top", "Left Corner", "Right Corner", "bottom"],
          "skeleton": [[1, 2], [1, 3], [2, 4], [3, 4]]}


def _widget_file(tmp_path: Path) -> Path:
    document = {
        "images": [{"id": 7, "file_name": "w.jpg", "width": 200, "height": 160}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [40, 20, 100, 120], "area": 12000, "iscrowd": 0,
             "keypoints": [90, 30, 2, 50, 80, 2, 130, 80, 1, 90, 130, 2], "num_keypoints": 4},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [10, 10, 60, 60], "area": 3600, "iscrowd": 0,
             "keypoints": [40, 15, 2, 15, 40, 2, 0, 0, 0, 40, 65, 2], "num_keypoints": 3},
        ],
        "categories": [WIDGET],
    }
    path = tmp_path / "widgets.json"
    path.write_text(json.dumps(document))
    return path


def test_custom_set_defined_only_by_a_coco_category_round_trips(tmp_path, caplog):
    path = _widget_file(tmp_path)
    with caplog.at_level(logging.WARNING):
        widget = resolve_keypoint_set(str(path))
    assert "no OKS sigmas" in caplog.text and str(path) in caplog.text  # the guess is said out loud
    assert widget.name == "widget" and widget.names == tuple(WIDGET["keypoints"])
    assert widget.flip_pairs == ((1, 2),)  # Left Corner <-> Right Corner, from the names
    assert widget.skeleton == ((0, 1), (0, 2), (1, 3), (2, 3))  # COCO's 1-based skeleton, 0-based here
    assert widget.sigmas == (DEFAULT_SIGMA,) * 4 and widget.sigmas_guessed
    assert widget.upper_body == ()  # the names say nothing about upper/lower body
    # the category it writes reads back as the same set
    assert keypoint_set_from_category(widget.coco_category(), name="widget") == widget
    # data: parsed with its own layout, evaluated with its own sigmas
    parsed = parse_annotation_bytes(path.read_bytes(), "widgets", "train", path.name)
    assert parsed.keypoint_set == widget and len(parsed.records) == 2
    document = json.loads(path.read_text())
    ground_truth = load_ground_truth(document)
    assert infer_keypoint_set(ground_truth) == widget
    metrics = evaluate_keypoints(ground_truth, _ground_truth_as_results(document), widget.sigmas_array())
    assert metrics["AP"] == pytest.approx(1.0)
    # a model for it records the set in its checkpoint and gets it back
    model = build_model("vitpose-tiny", keypoint_set=widget).eval()
    assert model(torch.zeros(1, 3, 256, 192)).shape[1] == 4
    restored = load_model(save_checkpoint(model, tmp_path / "ckpt"))
    assert restored.config.keypoint_set_data == widget
    # drawing uses its skeleton: the Top -> Left Corner limb is drawn
    canvas = np.zeros((160, 200, 3), np.uint8)
    keypoints = np.array([[[90, 30, 1.0], [50, 80, 1.0], [130, 80, 0.0], [90, 130, 0.0]]])
    drawn = draw_poses(canvas, keypoints, widget, radius=1, thickness=1)
    assert drawn[55, 70].any()  # the midpoint of Top (90, 30) -> Left Corner (50, 80)
    assert not drawn[105, 110].any()  # Right Corner -> bottom is not drawn (scores below threshold)


def test_keypoint_set_yaml_adds_sigmas_and_overrides(tmp_path):
    coco_file = _widget_file(tmp_path)
    yaml_file = tmp_path / "widget.yaml"
    yaml_file.write_text(f"""
name: widget
coco_file: {coco_file.name}
sigmas: {{top: 0.03, left_corner: 0.04, right corner: 0.04, bottom: 0.05}}
upper_body: [Top, 1, 2]
""")
    widget = load_keypoint_set_yaml(yaml_file)
    assert widget.sigmas == (0.03, 0.04, 0.04, 0.05) and not widget.sigmas_guessed
    assert widget.upper_body == (0, 1, 2) and widget.skeleton == ((0, 1), (0, 2), (1, 3), (2, 3))
    assert resolve_keypoint_set(str(yaml_file)) == widget
    listed = tmp_path / "listed.yaml"
    listed.write_text("name: stick\nkeypoints: [head, left_hand, right_hand]\nskeleton: [[head, left_hand], [0, 2]]\n"
                      "flip_pairs: []\nsigmas: [0.1, 0.05, 0.05]\n")
    stick = load_keypoint_set_yaml(listed)
    assert stick.flip_pairs == () and stick.skeleton == ((0, 1), (0, 2)) and stick.upper_body == (0, 1, 2)


def test_bad_keypoint_set_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": [{**WIDGET, "skeleton": [[1, 2], [4, 5]]}], "images": [],
                               "annotations": []}))
    with pytest.raises(KeypointSetError, match=r"bad\.json.*skeleton entry \[4, 5\] is outside the 4 keypoints"):
        keypoint_set_from_coco_file(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nkeypoints: [a, b]\nsigma: [0.1, 0.1]\n")  # misspelt field
    with pytest.raises(KeypointSetError, match=r"bad\.yaml.*sigma"):
        load_keypoint_set_yaml(bad_yaml)
    with pytest.raises(KeypointSetError, match="neither a built-in set"):
        resolve_keypoint_set("horses")
    with pytest.raises(KeypointSetError, match="2 sigmas for 3 keypoints"):
        KeypointSet("x", ("a", "b", "c"), (), (), (0.1, 0.1), ())
