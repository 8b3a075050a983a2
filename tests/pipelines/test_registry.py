"""MLflow registry helpers against a real sqlite-backed store, and Serve loading the model by alias."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from serve_helpers import free_port, running_app, tiny_checkpoint

from pipelines import registry

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An absolute sqlite tracking URI with an experiment whose artifacts live in the tmp dir."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.create_experiment("serve-tests", artifact_location=str(root / "artifacts"))
    yield tracking_uri, experiment_id
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def champion(store, tmp_path_factory):
    """Two versions of `vitpose-test` logged from two runs; `champion` on version 2."""
    import mlflow

    tracking_uri, experiment_id = store
    runs = []
    for seed in (0, 1):
        checkpoint = tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt{seed}") / "tiny", seed=seed)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            model_uri = registry.log_checkpoint_model(checkpoint, tracking_uri=tracking_uri)
        runs.append((run.info.run_id, model_uri, checkpoint))
    versions = [registry.register(uri, "vitpose-test", tracking_uri) for _, uri, _ in runs]
    registry.set_alias("vitpose-test", "champion", versions[1], tracking_uri)
    return tracking_uri, runs, versions


def test_register_alias_and_resolve(champion, tmp_path):
    tracking_uri, runs, versions = champion
    assert versions == ["1", "2"]
    assert registry.get_alias("vitpose-test", "champion", tracking_uri) == "2"
    assert registry.get_alias("vitpose-test", "nope", tracking_uri) is None

    resolved = registry.resolve_model("models:/vitpose-test@champion", tracking_uri, tmp_path / "a")
    assert (resolved.name, resolved.version) == ("vitpose-test", "2")
    expected = (runs[1][2] / "model.safetensors").read_bytes()
    assert (resolved.path / "model.safetensors").read_bytes() == expected
    by_run = registry.resolve_model_source(f"runs:/{runs[0][0]}/model", tracking_uri, tmp_path / "b")
    assert (by_run / "model.safetensors").read_bytes() == (runs[0][2] / "model.safetensors").read_bytes()
    by_version = registry.resolve_model("models:/vitpose-test/1", tracking_uri, tmp_path / "c")
    assert by_version.version == "1"
    assert registry.resolve_model_source(runs[0][2]) == runs[0][2].resolve()

    # moving the alias is what promotion is
    registry.set_alias("vitpose-test", "champion", "1", tracking_uri)
    assert registry.resolve_model("models:/vitpose-test@champion", tracking_uri, tmp_path / "d").version == "1"
    registry.set_alias("vitpose-test", "champion", "2", tracking_uri)


def test_pyfunc_model_predicts_keypoints(champion):
    import mlflow
    import pandas as pd

    tracking_uri, _, _ = champion
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/vitpose-test@champion")
    people = model.predict(pd.DataFrame({"image": [open_png()], "boxes": ["[[0, 0, 32, 24], [30, 20, 30, 28]]"]}))
    assert len(people) == 2 and all(len(keypoints) == 17 * 3 for keypoints in people["keypoints"])


def test_serve_loads_the_champion_by_alias(ray_local, champion):
    tracking_uri, _, _ = champion
    config = {"model": {"registered_model": "vitpose-test", "alias": "champion", "tracking_uri": tracking_uri},
              "batching": {"max_batch_size": 4}, "dtype": "fp32",
              "resources": {"model_num_cpus": 0.5, "ingress_num_cpus": 0.25}}
    with running_app(config, free_port()) as url:
        info = requests.get(f"{url}/v1/model", timeout=30).json()
        assert (info["name"], info["version"], info["source"]) == ("vitpose-test", "2",
                                                                   "models:/vitpose-test@champion")
        response = requests.post(f"{url}/v1/pose", data=open_png(), headers={"Content-Type": "image/png"}, timeout=60)
        assert response.status_code == 200 and response.json()["version"] == "2"


def open_png() -> bytes:
    from pipelines.serve.client import encode_png

    return encode_png(np.full((48, 64, 3), 128, np.uint8))
