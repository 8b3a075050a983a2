"""Zero-downtime promotion: the champion alias moves in MLflow while clients hammer the service.

Real Ray Serve on 127.0.0.1, a real MLflow sqlite store, real HTTP. Version 2 has another input size
(128x96 instead of 256x192), so the ingress must also re-cut crops for the new model mid-stream.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests
from serve_helpers import free_port, running_app, tiny_checkpoint

from pipelines import registry
from pipelines.serve.client import encode_png
from vitpose_core.synthetic import SyntheticConfig, render_image

pytestmark = pytest.mark.timeout(420)

MODEL = "vitpose-promo"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two registered versions of `vitpose-promo` (different weights and input sizes), champion on 1."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow-promo")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.create_experiment("promotion", artifact_location=str(root / "artifacts"))
    checkpoints = {}
    for version, (seed, img_size) in {"1": (0, (256, 192)), "2": (1, (128, 96))}.items():
        checkpoint = save_tiny(root / f"v{version}", seed, img_size)
        with mlflow.start_run(experiment_id=experiment_id):
            uri = registry.log_checkpoint_model(checkpoint, tracking_uri=tracking_uri)
        assert registry.register(uri, MODEL, tracking_uri) == version
        checkpoints[version] = checkpoint
    registry.set_alias(MODEL, "champion", "1", tracking_uri)
    yield tracking_uri, checkpoints
    mlflow.set_tracking_uri(None)


def save_tiny(directory, seed: int, img_size: tuple[int, int]):
    import torch

    from vitpose_core.checkpoint import save_checkpoint
    from vitpose_core.models.vitpose import build_model

    if img_size == (256, 192):
        return tiny_checkpoint(directory, seed=seed)
    torch.manual_seed(seed)
    return save_checkpoint(build_model("vitpose-tiny", img_size=img_size), directory)


@pytest.fixture(scope="module")
def scene():
    image_bgr, people = render_image(5, SyntheticConfig(width=320, height=240, min_people=2, max_people=2, seed=3))
    return np.ascontiguousarray(image_bgr[..., ::-1]), [p["bbox"] for p in people]


def offline(checkpoint, image, boxes):
    from vitpose_core.checkpoint import load_model
    from vitpose_core.inference import TopDownPredictor

    return TopDownPredictor(load_model(checkpoint), flip_test=False, dtype=None).predict(image, np.asarray(boxes))


def test_moving_the_champion_alias_under_load_fails_no_request(ray_local, store, scene):
    tracking_uri, checkpoints = store
    image, boxes = scene
    png, form = encode_png(image), {"boxes": json.dumps(boxes)}
    config = {"model": {"registered_model": MODEL, "alias": "champion", "tracking_uri": tracking_uri,
                        "watch_interval_s": 1.0},
              "autoscaling": {"min_replicas": 2, "max_replicas": 2}, "batching": {"max_batch_size": 4},
              "resources": {"model_num_cpus": 0.5, "ingress_num_cpus": 0.25, "torch_threads": 1},
              "max_ongoing_requests": 16, "max_queued_requests": 64, "request_timeout_s": 60, "dtype": "fp32"}
    outcomes: list[tuple[int, str | None, list | None]] = []  # (status, version, keypoints)
    model_versions: list[str] = []
    stop = threading.Event()

    with running_app(config, free_port(), startup_timeout_s=180) as url:
        assert requests.get(f"{url}/v1/model", timeout=30).json()["version"] == "1"

        def client_loop() -> None:
            session = requests.Session()
            while not stop.is_set():
                try:
                    response = session.post(f"{url}/v1/pose", files={"image": ("a.png", png)}, data=form, timeout=60)
                    body = response.json() if response.status_code == 200 else None
                    outcomes.append((response.status_code, body and body["version"],
                                     body and [p["keypoints"] for p in body["persons"]]))
                except requests.RequestException as error:
                    outcomes.append((-1, str(error)[:80], None))

        def model_loop() -> None:
            while not stop.is_set():
                try:
                    response = requests.get(f"{url}/v1/model", timeout=30)
                    model_versions.append(response.json()["version"] if response.status_code == 200
                                          else f"HTTP {response.status_code}")
                except requests.RequestException as error:
                    model_versions.append(str(error)[:80])
                time.sleep(0.25)

        threads = [threading.Thread(target=client_loop) for _ in range(3)] + [threading.Thread(target=model_loop)]
        for thread in threads:
            thread.start()
        try:
            # the load is on v1 first: at least 3 answers (a fixed sleep saw none on a loaded box)
            ready_by = time.monotonic() + 120
            while sum(version == "1" for _, version, _ in outcomes) < 3 and time.monotonic() < ready_by:
                time.sleep(0.5)
            before = len(outcomes)
            promoted_at = time.monotonic()
            registry.set_alias(MODEL, "champion", "2", tracking_uri)
            deadline = promoted_at + 120
            while time.monotonic() < deadline:  # both replicas on v2: the last 20 answers all say so
                recent = [version for _, version, _ in outcomes[-20:]]
                if len(outcomes) > before + 20 and set(recent) == {"2"}:
                    break
                time.sleep(0.5)
            switched_s = time.monotonic() - promoted_at
            time.sleep(3)  # keep the load on after the switch
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=90)
        final_info = requests.get(f"{url}/v1/model", timeout=30).json()

    codes = [code for code, _, _ in outcomes]
    failed = [(code, version) for code, version, _ in outcomes if code != 200]
    versions = [version for code, version, _ in outcomes if code == 200]
    print(f"promotion under load: {len(outcomes)} requests, {len(failed)} non-2xx, "
          f"{versions.count('1')} answered by v1, {versions.count('2')} by v2; all recent answers v2 "
          f"{switched_s:.1f} s after the alias moved; /v1/model sequence "
          f"{[v for i, v in enumerate(model_versions) if i == 0 or model_versions[i - 1] != v]}")
    assert not failed, failed[:10]
    assert versions.count("1") >= 3 and versions.count("2") >= 20
    assert set(versions[-20:]) == {"2"}
    assert model_versions[0] == "1" and model_versions[-1] == "2" and set(model_versions) == {"1", "2"}
    assert final_info["version"] == "2" and final_info["input_size"] == [96, 128]
    assert final_info["watching"] == f"models:/{MODEL}@champion" and final_info["promotion_error"] is None
    assert len(codes) >= 40

    # each answer is the weights of the version it names (v2 also at v2's input size), not only its label
    expected = {version: offline(checkpoint, image, boxes) for version, checkpoint in checkpoints.items()}
    for version in ("1", "2"):
        got = [np.asarray(keypoints) for code, v, keypoints in outcomes if code == 200 and v == version]
        error = max(np.abs(k[..., :2] - expected[version][..., :2]).max() for k in got)
        assert error <= 1e-3, (version, error)
    assert np.abs(expected["1"][..., :2] - expected["2"][..., :2]).max() > 1.0  # the versions really differ


def test_a_version_that_fails_to_load_keeps_the_old_one_serving(ray_local, store, scene, tmp_path):
    """The alias moves to a version whose files are broken: the replica keeps v2 and says why in /v1/model."""
    import mlflow

    tracking_uri, checkpoints = store
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    (broken / "config.json").write_text("{}")
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("promotion").experiment_id):
        uri = registry.log_checkpoint_model(broken, tracking_uri=tracking_uri)
    bad_version = registry.register(uri, MODEL, tracking_uri)
    registry.set_alias(MODEL, "champion", "2", tracking_uri)
    image, boxes = scene
    config = {"model": {"registered_model": MODEL, "alias": "champion", "tracking_uri": tracking_uri,
                        "watch_interval_s": 0.5},
              "batching": {"max_batch_size": 4}, "dtype": "fp32",
              "resources": {"model_num_cpus": 0.5, "ingress_num_cpus": 0.25, "torch_threads": 1}}
    with running_app(config, free_port(), startup_timeout_s=180) as url:
        registry.set_alias(MODEL, "champion", bad_version, tracking_uri)
        deadline = time.monotonic() + 60
        info = {}
        while time.monotonic() < deadline:
            info = requests.get(f"{url}/v1/model", timeout=30).json()
            if info.get("promotion_error"):
                break
            time.sleep(0.5)
        response = requests.post(f"{url}/v1/pose", files={"image": ("a.png", encode_png(image))},
                                 data={"boxes": json.dumps(boxes)}, timeout=60)
    registry.set_alias(MODEL, "champion", "2", tracking_uri)
    print("promotion error reported:", info.get("promotion_error"))
    assert info["version"] == "2" and f"version {bad_version}" in (info["promotion_error"] or "")
    assert response.status_code == 200 and response.json()["version"] == "2"


def test_reconfigure_loads_a_pinned_version_and_refuses_unknown_keys(store):
    """`reconfigure` is what Serve calls when `serve deploy` changes the deployment's user_config."""
    from pipelines.serve.config import ServeConfig
    from pipelines.serve.model import PoseModel

    tracking_uri, _ = store
    replica = PoseModel.func_or_class(ServeConfig(dtype="fp32", batching={"max_batch_size": 2}).model_dump(mode="json"))
    source = {"registered_model": MODEL, "tracking_uri": tracking_uri, "watch_interval_s": 0}
    replica.reconfigure({"model": {**source, "version": "1"}})
    assert replica.info()["version"] == "1" and replica.info()["watching"] is None
    first = replica._loaded
    replica.reconfigure({"model": {**source, "version": "1"}})  # unchanged: no reload
    assert replica._loaded is first
    replica.reconfigure({"model": {**source, "version": "2"}})
    assert replica.info()["version"] == "2" and replica.info()["input_size"] == (96, 128)
    with pytest.raises(ValueError, match="unknown keys"):
        replica.reconfigure({"model": {**source, "version": "1"}, "batching": {}})
    with pytest.raises(Exception, match="version"):
        replica.reconfigure({"model": {**source, "version": "one"}})
    assert replica.info()["version"] == "2"  # a refused update leaves the served model alone
