"""The person detector of vitpose_core.detection: build without downloads, data, save/load, train, detect, AP."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from detector_helpers import separated_scene, trained_detector, write_synthetic

from vitpose_core.detection import (
    DetectorConfig,
    DetectorTrainConfig,
    PersonDetector,
    build_detector,
    detect_dataset,
    evaluate_boxes,
    load_detector,
    read_detector_config,
    read_person_boxes,
    save_detector,
    train_detector,
)
from vitpose_core.evaluation import load_detections, load_ground_truth

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Detector training on 2 shared, loaded cores: 2 OpenMP threads spin at barriers and crawl; 1 does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synthetic_val(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("det-val"), 24, seed=1, split="val")


@pytest.mark.parametrize("architecture", ["fcos_mobilenet_v3_small_fpn", "ssdlite320_mobilenet_v3_large",
                                          "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_every_architecture_builds_offline_and_detects(architecture, monkeypatch, tmp_path):
    # any download attempt would need a socket: refuse them all, and point torch's cache at an empty dir
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(*args, **kwargs):
        raise AssertionError("building a detector tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    torch.manual_seed(0)
    detector = PersonDetector(build_detector(DetectorConfig(architecture=architecture)), DetectorConfig())
    boxes = detector.detect(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8), 0.0)
    assert boxes.ndim == 2 and boxes.shape[1] == 5
    assert not (tmp_path / "torch-home").exists()


def test_read_person_boxes_matches_the_annotations(synthetic_val):
    annotations, images = synthetic_val
    samples = read_person_boxes(annotations, images)
    document = json.loads(annotations.read_text())
    assert [s.image_id for s in samples] == [image["id"] for image in document["images"]]
    first = samples[0]
    expected = [a["bbox"] for a in document["annotations"] if a["image_id"] == first.image_id]
    xywh = np.concatenate([first.boxes_xyxy[:, :2], first.boxes_xyxy[:, 2:] - first.boxes_xyxy[:, :2]], axis=1)
    np.testing.assert_allclose(xywh, expected, atol=1e-4)
    assert first.path.is_file()
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        read_person_boxes(annotations.parent / "nowhere.json", images)
    bad = annotations.parent / "bad.json"
    bad.write_text('{"images": [], "annotations": [{"id": 5, "image_id": 99, "bbox": [0, 0, 1, 1]}]}')
    with pytest.raises(ValueError, match="annotation 5"):
        read_person_boxes(bad, images)


def test_detect_returns_clipped_boxes_sorted_by_score():
    torch.manual_seed(0)
    # a random SSD: its default boxes (offsets ~0) cover the image and beyond, so there are many to clip
    config = DetectorConfig(architecture="ssdlite320_mobilenet_v3_large", min_box_side=4.0)
    detector = PersonDetector(build_detector(config), config)
    image = np.random.default_rng(1).integers(0, 255, (90, 200, 3), dtype=np.uint8)
    boxes = detector.detect(image, score_threshold=0.0)
    assert len(boxes) > 0
    x, y, w, h, score = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 200 + 1e-6).all() and (y + h <= 90 + 1e-6).all()
    assert (w >= 4.0).all() and (h >= 4.0).all()
    assert (np.diff(score) <= 0).all()
    assert len(detector.detect(image, score_threshold=1.0)) == 0
    with pytest.raises(ValueError, match="RGB uint8"):
        detector.detect(image.astype(np.float32))


@pytest.mark.parametrize("architecture", ["fcos_mobilenet_v3_small_fpn", "ssdlite320_mobilenet_v3_large"])
def test_extreme_image_shapes_are_detected_without_error(architecture):
    """A 4096x1 image would be resized to a zero-pixel side: it is padded, and boxes stay inside it."""
    torch.manual_seed(0)
    config = DetectorConfig(architecture=architecture, min_box_side=0.0)
    detector = PersonDetector(build_detector(config), config)
    for height, width in [(1, 1), (1, 4096), (4096, 1), (3, 2000), (2, 2)]:
        image = np.full((height, width, 3), 128, np.uint8)
        boxes = detector.detect(image, score_threshold=0.0)
        assert boxes.shape[1:] == (5,)
        assert (boxes[:, 0] + boxes[:, 2] <= width + 1e-6).all() and (boxes[:, 1] + boxes[:, 3] <= height + 1e-6).all()


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    config = DetectorConfig(architecture="ssdlite320_mobilenet_v3_large", score_threshold=0.0)
    detector = PersonDetector(build_detector(config), config)
    directory = save_detector(detector.model, config, tmp_path / "det", metadata={"note": "round trip"})
    loaded = load_detector(directory)
    image = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    expected = detector.detect(image)
    assert len(expected) > 0
    np.testing.assert_array_equal(loaded.detect(image), expected)
    assert read_detector_config(directory) == (config, {"note": "round trip"})
    assert load_detector(directory, score_threshold=0.7).config.score_threshold == 0.7
    with pytest.raises(FileNotFoundError, match="detector.json"):
        load_detector(tmp_path / "missing")
    (directory / "detector.json").write_text(json.dumps({"detector": {"architecture": "yolo"}}))
    with pytest.raises(ValueError, match="architecture"):
        load_detector(directory)


def test_box_ap_of_ground_truth_is_one_and_results_load(synthetic_val):
    annotations, _ = synthetic_val
    ground_truth = load_ground_truth(annotations)
    results = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
               for a in ground_truth.dataset["annotations"]]
    assert evaluate_boxes(ground_truth, results)["AP"] == pytest.approx(1.0)
    assert evaluate_boxes(ground_truth, [])["AP"] == 0.0
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2], *r["bbox"][1:]]} for r in results]  # beside each person
    assert evaluate_boxes(ground_truth, shifted)["AP"] < 0.05
    assert sum(len(v) for v in load_detections(results).values()) == len(results)


def test_training_lowers_the_loss(synthetic_val):
    annotations, images = synthetic_val
    torch.manual_seed(0)
    model = build_detector(DetectorConfig())
    history = train_detector(model, read_person_boxes(annotations, images)[:12],
                             DetectorTrainConfig(epochs=3, batch_size=4, lr=2e-3, warmup_steps=3), log_every=3)
    losses = [point["loss"] for point in history]
    print("detector loss", losses)
    assert len(history) == 3 and history[-1]["step"] == 9 and history[-1]["cpu_seconds"] > 0
    assert losses[-1] < 0.85 * losses[0]
    assert not model.training


def test_training_stops_at_max_seconds_and_logs_the_last_step(synthetic_val):
    annotations, images = synthetic_val
    model = build_detector(DetectorConfig())
    history = train_detector(model, read_person_boxes(annotations, images),
                             DetectorTrainConfig(epochs=50, batch_size=2, max_seconds=0.01), log_every=100)
    assert [point["step"] for point in history] == [1]


@pytest.mark.slow
def test_trained_detector_finds_the_people(tmp_path_factory, synthetic_val):
    """A detector trained ~2.5 CPU minutes on synthetic people: one box per person, decent box AP."""
    annotations, images = synthetic_val
    detector = load_detector(trained_detector(tmp_path_factory.getbasetemp()))
    image, boxes = separated_scene()
    found = detector.detect(image)
    print("scene boxes", boxes, "detected", found.round(1).tolist())
    assert len(found) == len(boxes)
    ground_truth = load_ground_truth(annotations)
    paths = {image_id: images / info["file_name"] for image_id, info in ground_truth.imgs.items()}
    results, seconds_per_image = detect_dataset(detector, paths, score_threshold=0.05)
    stats = evaluate_boxes(ground_truth, results)
    print(f"val box AP {stats['AP']:.3f} AP50 {stats['AP50']:.3f}, {seconds_per_image * 1000:.0f} ms/image")
    assert stats["AP50"] > 0.7
