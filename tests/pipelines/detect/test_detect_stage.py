"""The detect stage through the real pipeline: local Ray, a real MLflow SQLite store and registry, no mocks.

On a tiny synthetic shard set (local_detect.yaml shrunk), shard -> detect once per module:

- fast: the detector is trained in its Ray task and registered as `vitpose-detector@champion` with a box AP
  above a floor, its training run nests under the stage run, serve's detector is the registered one and loads
  from the registry, and a rerun skips both stages;
- slow (the register stage's pyfunc logging and pictures take a minute or more on the shared box): register,
  with a tiny random pose checkpoint as its only candidate (the pose model's quality is not what is tested),
  records the champion's pose AP with detected and with ground-truth boxes, the very figures
  `vitpose eval --checkpoint --images [--detections]` prints, and the run summary shows them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from paths import REPO_ROOT
from serve_helpers import tiny_checkpoint

from pipelines.contract import read_record
from pipelines.pipeline import load_pipeline_config, run_pipeline
from pipelines.progress import Reporter

CONFIG = REPO_ROOT / "pipelines" / "configs" / "local_detect.yaml"
# 48 train images x 4 epochs = 24 detector steps of 8 at 160x120 (~5 CPU s), 8 val images
TINY = ["shard.synthetic.train_images=48", "shard.synthetic.val_images=8", "shard.synthetic.max_people=2",
        "detect.train.epochs=4", "detect.train.warmup_steps=2", "detect.train.lr=3.0e-3"]
# measured: box AP 0.024, AP50 0.094 after these 24 steps; the full recipe (600 steps) reaches AP 0.31,
# AP50 0.85 (bench/results/detector.md)
BOX_AP_FLOOR, BOX_AP50_FLOOR = 0.005, 0.03


@pytest.fixture(scope="module")
def detected(ray_local, tmp_path_factory):
    """(config, workdir, results) of shard -> detect on the tiny set, register's candidate a random tiny model."""
    root = tmp_path_factory.mktemp("detect-stage")
    pose = tiny_checkpoint(root / "pose")
    workdir = root / "runs"
    config = load_pipeline_config(CONFIG, [*TINY, f"workdir={workdir}", "register.candidates=[]",
                                           f"register.checkpoints={{tiny: {pose}}}"])
    results = {r.name: r for r in run_pipeline(config, stages=["shard", "detect"], reporter=Reporter())}
    return config, workdir, results, pose


@pytest.mark.timeout(600)
def test_detect_stage_trains_registers_serves_and_is_skipped_on_rerun(detected) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.contract import Upstream
    from pipelines.serve.detector import TorchvisionPersonDetector
    from pipelines.serve.spec import SPEC as SERVE
    from pipelines.serve.spec import section as serve_section
    from vitpose_core.detection import read_image_rgb

    config, workdir, results, _ = detected
    assert [results[name].state for name in ("shard", "detect")] == ["done", "done"]
    detect = read_record(str(workdir / "detect"))
    outputs, metrics = detect["outputs"], detect["metrics"]
    assert outputs["model_uri"] == "models:/vitpose-detector@champion" and outputs["version"] == "1"
    assert outputs["promoted"] is True and metrics["train_steps"] == 24 and metrics["train_images"] == 48
    assert metrics["box_ap"] > BOX_AP_FLOOR and metrics["box_ap50"] > BOX_AP50_FLOOR, metrics
    assert (Path(outputs["detector"]) / "detector.safetensors").is_file()
    assert len(json.loads(Path(outputs["val_detections"]).read_text())) > 0

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias("vitpose-detector", "champion")
    assert str(version.version) == "1" and float(version.tags["box_AP"]) == metrics["box_ap"]
    assert version.run_id == detect["mlflow_run_id"]  # logged by the stage's own run ...
    stage_run = client.get_run(detect["mlflow_run_id"])
    parent = client.get_run(stage_run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "pipeline-local-detect"  # ... under the pipeline's parent run
    assert stage_run.data.metrics["box_ap"] == metrics["box_ap"]
    train_runs = [r for r in client.search_runs([stage_run.info.experiment_id])
                  if r.data.tags.get("mlflow.parentRunId") == detect["mlflow_run_id"]]
    assert [r.info.run_name for r in train_runs] == ["detector-train"]
    assert train_runs[0].data.params["total_steps"] == "24" and train_runs[0].info.status == "FINISHED"

    # serve's detector: the registered one, loaded from the registry
    register = {"outputs": {"model_name": "vitpose", "alias": "champion"}}  # what serve reads of register's record
    upstream = Upstream(records={"register": register, "detect": detect}, stage_dir=str(workdir / "serve"),
                        tracking_uri=tracking_uri, experiment="vitpose", parent_run_id=None)
    serve = SERVE.build(serve_section(config.sections()), upstream)
    assert serve.detector.init_kwargs == {"path": "models:/vitpose-detector@champion", "tracking_uri": tracking_uri}
    served = TorchvisionPersonDetector(**serve.detector.init_kwargs, score_threshold=0.0)
    val_images = workdir / "shard" / "out" / "synthetic" / "val" / "images"
    boxes = served.detector.detect(read_image_rgb(sorted(val_images.iterdir())[0]))
    assert boxes.ndim == 2 and boxes.shape[1] == 5 and len(boxes) > 0

    started = time.perf_counter()
    rerun = {r.name: r for r in run_pipeline(config, stages=["shard", "detect"], reporter=Reporter())}
    assert [rerun[name].state for name in ("shard", "detect")] == ["skipped", "skipped"]
    assert time.perf_counter() - started < 60
    assert str(client.get_model_version_by_alias("vitpose-detector", "champion").version) == "1"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_register_reports_pose_ap_with_detected_and_ground_truth_boxes(detected, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main
    from pipelines.commands.run import summary_lines

    config, workdir, _, pose = detected
    results = {r.name: r for r in run_pipeline(config, stages=["shard", "detect", "register"], reporter=Reporter())}
    assert [results[name].state for name in ("shard", "detect", "register")] == ["skipped", "skipped", "done"]
    detect, register = read_record(str(workdir / "detect")), read_record(str(workdir / "register"))
    figures = register["metrics"]
    for key in ("ap_detected_boxes", "ap_gt_boxes"):
        assert 0.0 <= figures[key] <= 1.0
    assert register["outputs"]["detections"] == detect["outputs"]["val_detections"]
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    register_run = MlflowClient(tracking_uri).get_run(register["mlflow_run_id"])
    assert register_run.data.metrics["ap_detected_boxes"] == figures["ap_detected_boxes"]
    # the same figures as `vitpose eval` over the val images, with each kind of box (one inference path)
    val = workdir / "shard" / "out" / "synthetic" / "val"
    eval_args = ["eval", "--checkpoint", str(pose), "--annotations",
                 str(val / "annotations" / "person_keypoints_val.json"), "--images", str(val / "images"),
                 "--flip-test", "--batch-size", "64"]
    detections = ["--detections", detect["outputs"]["val_detections"]]
    for key, extra in (("ap_gt_boxes", []), ("ap_detected_boxes", detections)):
        report = tmp_path / f"{key}.json"
        assert main([*eval_args, *extra, "--output", str(report)]) == 0
        assert json.loads(report.read_text())["metrics"]["AP"] == pytest.approx(figures[key], abs=1e-9), key
    lines = "\n".join(summary_lines(list(results.values()), config, tracking_uri))
    assert "detector     models:/vitpose-detector@champion = v1" in lines
    assert f"champion AP {figures['ap_detected_boxes']:.3f} with detected boxes" in lines
