"""The MLflow pyfunc model: logged as code with vitpose_core as a code path and a signature, loaded by
`mlflow.pyfunc.load_model` in another Python process, predicting keypoints from encoded images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from serve_helpers import tiny_checkpoint

from pipelines import registry
from pipelines.serve.client import encode_png
from vitpose_core.synthetic import SyntheticConfig, render_image

pytestmark = pytest.mark.timeout(300)

LOAD_AND_PREDICT = """
import json, sys
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
import vitpose_core
images = [open(path, "rb").read() for path in sys.argv[3:5]]
people = model.predict(pd.DataFrame({"image": images, "boxes": [sys.argv[5], None]}))
print(json.dumps({"vitpose_core": vitpose_core.__file__, "rows": people.to_dict(orient="records")}))
"""


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("pyfunc")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.create_experiment("pyfunc", artifact_location=str(root / "artifacts"))
    checkpoint = tiny_checkpoint(root / "tiny", seed=3)
    with warnings.catch_warnings(record=True) as caught, mlflow.start_run(experiment_id=experiment_id):
        warnings.simplefilter("always")
        model_uri = registry.log_checkpoint_model(checkpoint, tracking_uri=tracking_uri)
    yield tracking_uri, model_uri, checkpoint, [str(w.message) for w in caught]
    mlflow.set_tracking_uri(None)


def test_logged_with_signature_code_and_pinned_requirements_without_warnings(logged):
    import mlflow

    tracking_uri, model_uri, _, messages = logged
    assert not [m for m in messages if "type hint" in m or "CloudPickle" in m or "signature" in m.lower()], messages
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.inputs.input_names() == ["image", "boxes"]
    assert info.signature.outputs.input_names() == ["image_index", "box", "keypoints", "keypoint_scores", "score"]
    assert info.signature.params.to_dict()[0]["name"] == "flip_test"
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)
    requirements = open(os.path.join(local, "requirements.txt")).read().split()
    assert any(r.startswith("torch==") for r in requirements) and any(r.startswith("mlflow==") for r in requirements)
    assert os.path.isfile(os.path.join(local, "code", "vitpose_core", "inference.py"))
    assert os.path.isfile(os.path.join(local, "artifacts", "checkpoint", "model.safetensors"))


def test_loads_in_another_process_and_equals_offline_inference(logged, tmp_path):
    from vitpose_core.checkpoint import load_model
    from vitpose_core.inference import TopDownPredictor

    tracking_uri, model_uri, checkpoint, _ = logged
    image_bgr, people = render_image(1, SyntheticConfig(width=320, height=240, min_people=2, max_people=2, seed=11))
    image = np.ascontiguousarray(image_bgr[..., ::-1])
    boxes = [p["bbox"] for p in people]
    small = image[:120, :160].copy()
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    paths[0].write_bytes(encode_png(image))
    paths[1].write_bytes(encode_png(small))
    # a clean process started outside the checkout: no PYTHONPATH, the checkout not on sys.path
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_AND_PREDICT, tracking_uri, model_uri, *map(str, paths),
                           json.dumps(boxes)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    # the model's own copy of vitpose_core was used, not the checkout's
    assert "/code/vitpose_core/" in answer["vitpose_core"], answer["vitpose_core"]

    rows = pd.DataFrame(answer["rows"])
    assert list(rows["image_index"]) == [0, 0, 1]
    predictor = TopDownPredictor(load_model(checkpoint), flip_test=False, dtype=None)
    expected = np.concatenate([predictor.predict(image, np.asarray(boxes)), predictor.predict(small)])
    got = np.array([np.reshape(k, (17, 3)) for k in rows["keypoints"]])
    print(f"pyfunc (subprocess) vs in-process inference: max |diff| {np.abs(got - expected).max():.2e}")
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert rows["box"][2] == [0.0, 0.0, 160.0, 120.0]
    np.testing.assert_allclose(np.array(list(rows["keypoint_scores"])), expected[..., 2], atol=1e-4)
    from vitpose_core.evaluation import instance_score

    np.testing.assert_allclose(rows["score"], [instance_score(person[:, 2]) for person in expected], atol=1e-6)


def test_bad_rows_are_errors_naming_the_row(logged):
    import mlflow

    tracking_uri, model_uri, _, _ = logged
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    png = encode_png(np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(Exception, match="row 1: image is not a decodable image"):
        model.predict(pd.DataFrame({"image": [png, b"junk"]}))
    with pytest.raises(Exception, match="row 0: boxes must be"):
        model.predict(pd.DataFrame({"image": [png], "boxes": ["[[0, 0, -5, 10]]"]}))
    empty = model.predict(pd.DataFrame({"image": [png], "boxes": ["[]"]}))
    assert len(empty) == 0 and list(empty.columns) == ["image_index", "box", "keypoints", "keypoint_scores", "score"]
