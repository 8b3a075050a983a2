"""The served person detector: a multi-person image sent without boxes gets one pose per person.

A real Serve app on 127.0.0.1 with the `TorchvisionPersonDetector` deployment in front of a tiny
pose model. The detector is trained here on synthetic people (once per pytest session, see
detector_helpers.py; ~2 CPU minutes, much longer wall time on a loaded 2-core box, hence `slow`).
The fast plumbing check with an untrained detector is in test_serve_fuzz.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from detector_helpers import separated_scene, trained_detector
from serve_helpers import free_port, running_app, tiny_checkpoint

from pipelines.serve.client import PoseClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return trained_detector(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-det-model") / "tiny")


@pytest.fixture(scope="module")
def service(ray_local, checkpoint, detector_dir):
    config = {
        "model": {"checkpoint": str(checkpoint)},
        "batching": {"max_batch_size": 8},
        "resources": {"model_num_cpus": 0.5, "ingress_num_cpus": 0.25, "torch_threads": 1},
        "detector": {"import_path": "pipelines.serve.detector:TorchvisionPersonDetector",
                     "init_kwargs": {"path": str(detector_dir), "score_threshold": 0.5}, "num_cpus": 0.5},
        "request_timeout_s": 60, "dtype": "fp32",
    }
    with running_app(config, free_port()) as url:
        yield url


def iou(a: list[float], b: list[float]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0.0, min(ax2, bx2) - max(a[0], b[0])) * max(0.0, min(ay2, by2) - max(a[1], b[1]))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_multi_person_image_without_boxes_gets_one_pose_per_person(service, checkpoint, detector_dir):
    from vitpose_core.checkpoint import load_model
    from vitpose_core.detection import load_detector
    from vitpose_core.inference import TopDownPredictor

    image, people = separated_scene()
    served = PoseClient(service).predict(image)  # no boxes: the detector deployment finds them
    boxes = [person["box"] for person in served["persons"]]
    print("people", people, "served boxes", np.round(boxes, 1).tolist())
    assert len(served["persons"]) == len(people) == 3
    for person in people:  # each person found once, where it is
        assert max(iou(person, box) for box in boxes) > 0.5
    assert all(len(person["keypoints"]) == 17 for person in served["persons"])

    # the served boxes are the detector's, and the keypoints are the pose model's on those boxes
    offline_boxes = load_detector(detector_dir, score_threshold=0.5).detect(image)
    np.testing.assert_allclose(boxes, offline_boxes[:, :4], atol=1e-6)
    expected = TopDownPredictor(load_model(checkpoint)).predict(image, np.asarray(boxes))
    got = np.array([person["keypoints"] for person in served["persons"]])
    assert np.abs(got[..., :2] - expected[..., :2]).max() <= 1e-3


def test_client_boxes_bypass_the_detector(service):
    image, people = separated_scene()
    served = PoseClient(service).predict(image, boxes=people[:1])
    assert [person["box"] for person in served["persons"]] == [[float(v) for v in people[0]]]
