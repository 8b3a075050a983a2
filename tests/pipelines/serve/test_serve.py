"""The serve stage end to end: a real Serve app on 127.0.0.1 with a tiny model, spoken to over HTTP.

One app for the module (Serve startup is ~15 s on 2 cores): 2 model replicas so a killed replica has
a peer, small ingress limits so a burst hits backpressure.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from serve_helpers import free_port, running_app, tiny_checkpoint, wait_healthy

from pipelines.serve.client import PoseClient, encode_png
from vitpose_core.synthetic import SyntheticConfig, render_image

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-model") / "tiny")


@pytest.fixture(scope="module")
def service(ray_local, checkpoint):
    config = {
        "model": {"checkpoint": str(checkpoint)},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        "resources": {"model_num_cpus": 0.5, "ingress_num_cpus": 0.25, "torch_threads": 1},
        "max_ongoing_requests": 4, "max_queued_requests": 4, "retry_after_s": 1,
        "request_timeout_s": 60, "dtype": "fp32", "flip_test": False,
    }
    with running_app(config, free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def scene():
    """A synthetic RGB image with people, and their boxes."""
    image_bgr, people = render_image(3, SyntheticConfig(width=320, height=240, min_people=2, max_people=3, seed=7))
    return np.ascontiguousarray(image_bgr[..., ::-1]), [p["bbox"] for p in people]


def offline_keypoints(checkpoint, image_rgb, boxes):
    from vitpose_core.checkpoint import load_model
    from vitpose_core.inference import TopDownPredictor

    return TopDownPredictor(load_model(checkpoint), flip_test=False, dtype=None).predict(image_rgb, boxes)


def test_served_keypoints_equal_offline(service, checkpoint, scene):
    image, boxes = scene
    client = PoseClient(service)
    served = client.predict(image, boxes=boxes)
    served_whole = client.predict(image)  # no boxes: one whole-image box
    expected = offline_keypoints(checkpoint, image, np.asarray(boxes, float))
    expected_whole = offline_keypoints(checkpoint, image, None)

    assert served["image_size"] == [320, 240]
    assert [p["box"] for p in served["persons"]] == [[float(v) for v in box] for box in boxes]
    got = np.array([p["keypoints"] for p in served["persons"]])
    got_whole = np.array([p["keypoints"] for p in served_whole["persons"]])
    assert got.shape == expected.shape == (len(boxes), 17, 3)
    error_px = max(np.abs(got[..., :2] - expected[..., :2]).max(), np.abs(got_whole[..., :2] - expected_whole[..., :2]).max())
    print(f"served vs offline max keypoint error: {error_px:.2e} px")
    assert error_px <= 1e-3
    np.testing.assert_allclose(got[..., 2], expected[..., 2], atol=1e-4)
    assert served_whole["persons"][0]["box"] == [0.0, 0.0, 320.0, 240.0]


def test_json_and_raw_bodies_agree_with_multipart(service, scene):
    import base64

    image, boxes = scene
    png = encode_png(image)
    multipart = PoseClient(service).predict(png, boxes=boxes[:1])
    as_json = requests.post(f"{service}/v1/pose", json={"image": base64.b64encode(png).decode(), "boxes": boxes[:1]},
                            timeout=60)
    raw = requests.post(f"{service}/v1/pose", data=png, headers={"Content-Type": "image/png"},
                        params={"boxes": json.dumps(boxes[:1])}, timeout=60)
    assert as_json.status_code == raw.status_code == 200
    assert as_json.json()["persons"] == multipart["persons"] == raw.json()["persons"]


def test_health_model_and_docs(service):
    health = requests.get(f"{service}/healthz", timeout=10).json()
    info = PoseClient(service).model_info()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["version"] == "local"
    assert info["keypoint_set"] == "coco" and len(info["keypoint_names"]) == 17
    assert info["input_size"] == [192, 256] and info["dtype"] == "fp32" and info["flip_test"] is False
    schema = requests.get(f"{service}/openapi.json", timeout=10).json()
    assert {"/v1/pose", "/v1/model", "/healthz"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/pose"]["post"]["requestBody"]["content"]


def test_overload_gets_quick_503_not_a_hang(service, scene):
    """64 concurrent 8-person requests against 4 ongoing + 4 queued slots: the excess gets 503 at once."""
    image, _ = scene
    png = encode_png(image)
    boxes = json.dumps([[10.0 + i, 10.0, 150.0, 200.0] for i in range(8)])

    def call(_: int) -> tuple[int, float, str | None]:
        start = time.monotonic()
        response = requests.post(f"{service}/v1/pose", files={"image": ("a.png", png)}, data={"boxes": boxes},
                                 timeout=120)
        return response.status_code, time.monotonic() - start, response.headers.get("Retry-After")

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(call, range(64)))
    codes = [code for code, _, _ in results]
    rejected = [(seconds, retry) for code, seconds, retry in results if code == 503]
    print(f"overload: {codes.count(200)} x 200, {len(rejected)} x 503, "
          f"slowest 503 {max(s for s, _ in rejected):.2f} s" if rejected else f"overload codes {codes}")
    assert set(codes) <= {200, 503}
    assert rejected and codes.count(200) >= 8
    assert all(retry == "1" for _, retry in rejected)
    assert np.median([seconds for seconds, _ in rejected]) < 2.0
    assert requests.get(f"{service}/healthz", timeout=10).status_code == 200


def test_killing_a_model_replica_under_load_recovers(service, scene):
    import ray

    image, boxes = scene
    png = encode_png(image)
    form = {"boxes": json.dumps(boxes[:1])}
    outcomes: list[int] = []
    stop = threading.Event()

    def client_loop() -> None:
        session = requests.Session()
        while not stop.is_set() and len(outcomes) < 400:
            try:
                code = session.post(f"{service}/v1/pose", files={"image": ("a.png", png)}, data=form,
                                    timeout=60).status_code
            except requests.RequestException:
                code = -1
            outcomes.append(code)

    workers = [threading.Thread(target=client_loop) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(3)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "PoseModel" in a["name"]]
    assert len(names) == 2, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    killed_at = len(outcomes)
    time.sleep(12)
    stop.set()
    for worker in workers:
        worker.join(timeout=90)

    failed = sum(code != 200 for code in outcomes)
    print(f"replica kill: {len(outcomes)} requests, {failed} failed ({failed / len(outcomes):.1%}), "
          f"kill after request {killed_at}, codes {sorted(set(outcomes))}")
    assert set(outcomes) <= {200, 503}  # a lost replica is "retry later", never a 500
    assert failed / len(outcomes) < 0.25
    # recovered: healthy, and the tail of the run succeeded
    wait_healthy(service, 60)
    assert all(code == 200 for code in outcomes[-10:])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Serve replaces the dead replica
        alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if "PoseModel" in a["name"]]
        if len(alive) == 2 and names[0] not in {a["name"] for a in alive}:
            break
        time.sleep(1)
    else:
        pytest.fail("the killed replica was not replaced")


def test_person_score_keypoint_scores_and_coco_results_shape(service, scene):
    """Each person carries box_score, keypoint_scores and the mmpose person score; ?format=coco answers
    COCO keypoint results records that pycocotools loads."""
    from pycocotools.coco import COCO

    from vitpose_core.evaluation import instance_score

    image, boxes = scene
    client = PoseClient(service)
    served = client.predict(image, boxes=boxes)
    for person in served["persons"]:
        keypoints = np.asarray(person["keypoints"])
        assert person["box_score"] == 1.0  # client boxes carry no score
        assert person["keypoint_scores"] == keypoints[:, 2].tolist()
        confident = keypoints[:, 2][keypoints[:, 2] > 0.2]
        assert person["score"] == pytest.approx(confident.mean() if len(confident) else 0.0)
        assert person["score"] == pytest.approx(instance_score(keypoints[:, 2], 1.0))

    records = client.predict_coco(image, boxes=boxes, image_id=42)
    assert [sorted(r) for r in records] == [["category_id", "image_id", "keypoints", "score"]] * len(boxes)
    for record, person in zip(records, served["persons"], strict=True):
        assert record["image_id"] == 42 and record["category_id"] == 1
        assert record["keypoints"] == np.asarray(person["keypoints"]).reshape(-1).tolist()
        assert record["score"] == person["score"]
    ground_truth = COCO()
    ground_truth.dataset = {"images": [{"id": 42, "width": 320, "height": 240}],
                            "categories": [{"id": 1, "name": "person"}],
                            "annotations": [{"id": i + 1, "image_id": 42, "category_id": 1, "bbox": list(box),
                                             "area": box[2] * box[3], "iscrowd": 0, "num_keypoints": 17,
                                             "keypoints": [0] * 51} for i, box in enumerate(boxes)]}
    ground_truth.createIndex()
    assert len(ground_truth.loadRes(records).getAnnIds()) == len(boxes)

    raw = requests.post(f"{service}/v1/pose", data=encode_png(image), headers={"Content-Type": "image/png"},
                        params={"boxes": json.dumps(boxes[:1]), "format": "coco"}, timeout=60)
    assert raw.status_code == 200 and raw.json()[0]["image_id"] == 0 and raw.headers["X-Model-Version"] == "local"
    for params in ({"format": "xml"}, {"image_id": "7"}, {"format": "coco", "image_id": "-1"},
                   {"format": "coco", "image_id": "1e3"}, {"format": "coco", "image_id": str(2**63)}):
        bad = requests.post(f"{service}/v1/pose", data=encode_png(image), headers={"Content-Type": "image/png"},
                            params=params, timeout=60)
        assert bad.status_code == 422 and "error" in bad.json(), (params, bad.text)
