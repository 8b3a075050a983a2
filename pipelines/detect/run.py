"""The detect stage: a person detector trained on the pipeline's own images, scored, registered.

ViTPose is top-down: served without boxes, a multi-person image needs a person detector. This stage

1. reads the shard stage's source images and person boxes (the manifest's train and val inputs,
   `pipelines.detect.images`: local or s3://);
2. trains the small torchvision detector (`vitpose_core.detection`; random init, or `weights`, a
   torchvision file, nothing downloaded) in one Ray task with the resources the config names, logging
   `train_loss` to a child MLflow run under the stage's run;
3. scores it on the val split: COCO box AP, and the COCO detection results (`val_detections.json`) that
   the register stage turns into pose AP with detected boxes;
4. registers it in the MLflow Model Registry as a new version of `model_name` (the pose model's name +
   `-detector` in `vitpose run`), a plain directory (`detector.safetensors` + `detector.json`); `alias`
   moves to it unless the current holder scores a higher box AP on the same val images (scored in the
   same task), as the register stage does for pose models.

Serve loads `models:/<model_name>@<alias>` into its `TorchvisionPersonDetector` deployment.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines import registry, storage
from pipelines.contract import StageOutput
from pipelines.detect.config import DetectConfig

logger = logging.getLogger(__name__)

DETECTOR_DIR = "detector"  # under `out`, and the artifact path in MLflow
DETECTIONS_NAME = "val_detections.json"
HOLDER_DETECTIONS_NAME = "val_detections_holder.json"
BOX_METRICS = {"AP": "box_ap", "AP50": "box_ap50", "AP75": "box_ap75", "AR100": "box_ar100"}


def run_detect(config: DetectConfig, run_id: str | None = None) -> StageOutput:
    """Train, score and register the detector; the alias moves only if it beats the holder's box AP.

    Args:
        run_id: the MLflow run the stage logs into (the pipeline's detect stage run); None starts one.
    """
    import ray
    from mlflow.entities import Param

    from pipelines.session import experiment_id, mlflow_client, resolve_tracking_uri
    from pipelines.tracking import forwarded_env

    if not config.data.shards:
        raise ValueError("detect: data.shards is not set: the shard stage's output, whose manifest names the images")
    if not config.out:
        raise ValueError("detect: out is not set: where the detector and its val detections go")
    tracking_uri, artifacts = resolve_tracking_uri(config.tracking_uri, "vitpose_runs")
    client = mlflow_client(tracking_uri)
    experiment = experiment_id(client, config.experiment, artifacts)
    if run_id is None:
        run_id = client.create_run(experiment, run_name="detect").info.run_id
    params = _flat({"detector": config.detector.model_dump(), "train": config.train.model_dump(),
                    "weights": config.weights, "data": config.data.model_dump()})
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])

    holder = registry.get_alias(config.model_name, config.alias, tracking_uri)
    holder_source = f"models:/{config.model_name}/{holder}" if holder is not None else None
    # a joined cluster's workers reach the tracking server and S3 with the driver's variables, as Train workers do
    env = forwarded_env()
    task = ray.remote(train_and_score).options(num_cpus=config.resources.num_cpus,
                                               num_gpus=config.resources.num_gpus,
                                               **({"runtime_env": {"env_vars": env}} if env else {}))
    started = time.time()
    result = ray.get(task.remote(config, tracking_uri, experiment, run_id, holder_source))
    seconds = time.time() - started

    out = storage.normalize(config.out)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / DETECTOR_DIR
        local.mkdir()
        for name, data in result["files"].items():
            (local / name).write_bytes(data)
            storage.write_bytes(storage.join(out, DETECTOR_DIR, name), data)
        box = result["box"]
        version = registry.register_directory(local, config.model_name, run_id, DETECTOR_DIR, tracking_uri, tags={
            "box_AP": box["AP"], "box_AP50": box["AP50"], "train_steps": result["history"][-1]["step"]})
    holder_box = result.get("holder_box")
    promoted = holder_box is None or box["AP"] > holder_box["AP"]
    if promoted:
        registry.set_alias(config.model_name, config.alias, version, tracking_uri=tracking_uri)
    tags = {"promoted": promoted, "compared_with_version": holder,
            "compared_with_box_AP": None if holder_box is None else holder_box["AP"]}
    for key, value in tags.items():
        client.set_model_version_tag(config.model_name, version, key, str(value))

    detections_uri = storage.join(out, DETECTIONS_NAME)
    storage.write_text(detections_uri, json.dumps(result["detections"]))
    champion_detections = detections_uri
    if not promoted:  # pose AP with detected boxes is measured with the champion's boxes
        champion_detections = storage.join(out, HOLDER_DETECTIONS_NAME)
        storage.write_text(champion_detections, json.dumps(result["holder_detections"]))
    client.log_dict(run_id, {"history": result["history"]}, "detector_history.json")

    champion_box = box if promoted else holder_box
    last = result["history"][-1]
    metrics = {name: box[key] for key, name in BOX_METRICS.items()}
    metrics.update(train_steps=float(last["step"]), train_seconds=float(last["seconds"]),
                   train_cpu_seconds=float(last["cpu_seconds"]), final_loss=float(last["loss"]),
                   ms_per_image=result["ms_per_image"], train_images=float(result["train_images"]),
                   val_images=float(result["val_images"]), stage_task_seconds=round(seconds, 1),
                   champion_box_ap=champion_box["AP"], promoted=float(promoted))
    if holder_box is not None:
        metrics["holder_box_ap"] = holder_box["AP"]
    verdict = (f"v{version} is {config.alias}" if promoted else
               f"v{version} (box AP {box['AP']:.3f}) did not beat v{holder}; {config.alias} stays")
    return StageOutput(
        outputs={"model_uri": f"models:/{config.model_name}@{config.alias}", "model_name": config.model_name,
                 "alias": config.alias, "version": version if promoted else holder, "candidate_version": version,
                 "promoted": promoted, "detector": storage.join(out, DETECTOR_DIR),
                 "val_detections": champion_detections, "loaded_weights": result["loaded_weights"]},
        metrics=metrics,
        summary=f"{config.model_name} {verdict}, box AP {champion_box['AP']:.3f} (AP50 {champion_box['AP50']:.3f}), "
                f"{last['step']} steps in {last['seconds']:.0f} s")


def train_and_score(config: DetectConfig, tracking_uri: str, experiment: str, parent_run_id: str,
                    holder_source: str | None) -> dict[str, Any]:
    """The Ray task: read the images, train, save, detect on val, box AP (and the holder's). Returns the
    detector's files as bytes (a few MB), the training history and the val detections."""
    import torch

    from pipelines.detect.images import read_split
    from pipelines.session import mlflow_client
    from vitpose_core.detection import (
        DETECTOR_CONFIG_NAME,
        build_detector,
        detect_dataset,
        evaluate_boxes,
        load_detector,
        load_matching_weights,
        read_person_boxes,
        read_weights_file,
        save_detector,
        train_detector,
    )
    from vitpose_core.evaluation import load_ground_truth

    if config.resources.torch_threads:
        torch.set_num_threads(config.resources.torch_threads)
    device = torch.device("cuda" if config.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu")
    client = mlflow_client(tracking_uri)
    train_run = client.create_run(experiment, run_name="detector-train",
                                  tags={"mlflow.parentRunId": parent_run_id}).info.run_id
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train = read_split(config.data.shards, "train", Path(tmp) / "images", config.data.datasets,
                               config.data.max_train_images)
            samples = read_person_boxes(train.document, "")
            for sample in samples:
                sample.path = train.paths[sample.image_id]
            torch.manual_seed(config.train.seed)
            model = build_detector(config.detector)
            loaded: list[str] = []
            if config.weights:
                local_weights = Path(tmp) / Path(config.weights).name
                local_weights.write_bytes(storage.read_bytes(config.weights))
                loaded = load_matching_weights(model, read_weights_file(local_weights))
            model.to(device)
            total_steps = -(-len(samples) // config.train.batch_size) * config.train.epochs
            client.log_param(train_run, "total_steps", total_steps)  # the pipeline's progress bar reads these

            def log(point: dict[str, Any]) -> None:
                client.log_metric(train_run, "train_loss", point["loss"], step=point["step"])

            history = train_detector(model, samples, config.train, log=log)
            saved = save_detector(model.cpu(), config.detector, Path(tmp) / DETECTOR_DIR,
                                  metadata={"train": config.train.model_dump(), "weights": config.weights,
                                            "loaded_weights": len(loaded), "history": history})
            files = {path.name: path.read_bytes() for path in saved.iterdir() if path.is_file()}

            val = read_split(config.data.shards, "val", Path(tmp) / "images", config.data.datasets,
                             config.data.max_val_images, one_source=True)
            ground_truth = load_ground_truth(val.document)

            def score(directory: Path) -> tuple[dict[str, float], list[dict[str, Any]], float]:
                detector = load_detector(directory)
                detector.model.to(device)
                detections, seconds = detect_dataset(detector, val.paths, config.eval_score_threshold)
                return evaluate_boxes(ground_truth, detections), detections, seconds

            box, detections, seconds = score(saved)
            result = {"files": files, "history": history, "box": box, "detections": detections,
                      "ms_per_image": round(seconds * 1000, 1), "train_images": len(samples),
                      "val_images": len(val.paths), "loaded_weights": len(loaded)}
            if holder_source is not None:
                held = registry.resolve_directory(holder_source, DETECTOR_CONFIG_NAME, tracking_uri, Path(tmp) / "held")
                result["holder_box"], result["holder_detections"], _ = score(held)
        client.log_metric(train_run, "box_AP", box["AP"], step=history[-1]["step"])
        status = "FINISHED"
        return result
    finally:
        client.set_terminated(train_run, status)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
