"""`finetune` stage: ViTPose (backbone + heatmap decoder) on the crop shards, on Ray Train.

Model: a named variant at ``model.input_size``, its backbone optionally initialised from an MAE
encoder (pretrain stage output; position embeddings resized to the target grid) or any ViTPose
checkpoint. Loss: weighted joints-MSE on UDP heatmaps. After each epoch rank 0 evaluates on the
val shards: flip test, DARK-UDP decode, back to image pixels, rescoring + OKS-NMS, COCO AP
(``vitpose_core.engine.evaluate_coco_ap``); the best model by ``val_AP`` is exported in the
project's checkpoint format to ``<run>/finetune_export`` and to MLflow, with a PNG of predictions.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipelines import storage
from pipelines.contract import StageOutput
from pipelines.data import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, iter_pose_batches
from pipelines.finetune.config import FinetuneConfig
from pipelines.tracking import Tracker
from pipelines.training.recipe import TrainingRecipe
from pipelines.training.result import run_training
from vitpose_core.checkpoint import load_checkpoint, save_checkpoint
from vitpose_core.codec import UDPHeatmapCodec
from vitpose_core.engine import EngineConfig, FinetuneTask, evaluate_coco_ap, predict_keypoints
from vitpose_core.evaluation import load_ground_truth
from vitpose_core.keypoints import KEYPOINT_SETS
from vitpose_core.mae import ENCODER_WEIGHTS_NAME, load_pretrained_encoder
from vitpose_core.models import ViTPose, build_model
from vitpose_core.visualize import draw_poses


def build_finetune_model(config: FinetuneConfig) -> ViTPose:
    """The variant at the configured size; backbone from ``model.pretrained`` when given."""
    model = build_model(config.model.variant, **config.model.overrides())
    source = config.model.pretrained
    if source is None:
        return model
    local = storage.local_dir(source)
    if (local / ENCODER_WEIGHTS_NAME).exists():
        load_pretrained_encoder(model, local)
    else:
        load_checkpoint(model, local)
    return model


def val_annotations(config: FinetuneConfig) -> str:
    """The val split's COCO annotation file: configured, or the one the shard manifest records."""
    if config.data.val_annotations:
        return config.data.val_annotations
    manifest = json.loads(storage.read_text(storage.join(config.data.shards, "manifest.json")))
    files = [source["annotations"] for source in manifest.get("inputs", []) if source.get("split") == "val"]
    if len(files) != 1:
        raise ValueError(f"cannot tell the val annotations from {config.data.shards}/manifest.json ({len(files)} val "
                         "inputs); set data.val_annotations")
    return files[0]


def validate(model: ViTPose, config: FinetuneConfig, tracker: Tracker, epoch: int) -> dict[str, float]:
    """COCO AP on the val shards (rank 0, unwrapped model) and a PNG of predictions logged to MLflow."""
    stream = config.data.stream_config(config.model.input_size).model_copy(update={"augment": False})
    keypoint_set = KEYPOINT_SETS[stream.keypoints]
    codec = UDPHeatmapCodec(stream.input_size, stream.heatmap_size, stream.sigma)
    device = next(model.parameters()).device
    engine = EngineConfig(device=str(device), precision=config.scaling.precision)
    annotations = val_annotations(config)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "val.json"
        local.write_bytes(storage.read_bytes(annotations))
        ground_truth = load_ground_truth(local)

    def batches():
        seen = 0
        for batch in iter_pose_batches(config.data.shards, stream, batch_size=config.eval.batch_size, split="val"):
            if config.eval.max_instances is not None and seen >= config.eval.max_instances:
                return
            seen += len(batch["image"])
            yield batch

    if config.eval.max_instances is not None:  # evaluate only the images whose crops were predicted
        ground_truth = _subset(ground_truth, {int(i) for b in batches() for i in b["image_id"]})
    stats, _ = evaluate_coco_ap(model, batches(), codec, ground_truth, keypoint_set, engine, config.eval.flip_test)
    if config.eval.num_visualized:
        _log_predictions_png(model, next(batches()), codec, keypoint_set, engine, config, tracker, epoch)
    return {f"val_{name}": value for name, value in stats.items()}


def _subset(ground_truth: Any, image_ids: set[int]) -> Any:
    from pycocotools.coco import COCO

    subset = COCO()
    subset.dataset = {**ground_truth.dataset,
                      "images": [i for i in ground_truth.dataset["images"] if i["id"] in image_ids],
                      "annotations": [a for a in ground_truth.dataset["annotations"] if a["image_id"] in image_ids]}
    subset.createIndex()
    return subset


def _log_predictions_png(model: ViTPose, batch: dict, codec: UDPHeatmapCodec, keypoint_set: Any,
                         engine: EngineConfig, config: FinetuneConfig, tracker: Tracker, epoch: int) -> None:
    """Draw predicted keypoints on the first val crops (input pixels) as one grid image."""
    count = min(config.eval.num_visualized, len(batch["image"]))
    # the evaluation's own decode, with identity affines: keypoints stay in input pixels, where they are drawn
    identity = np.repeat(np.eye(2, 3)[None], count, axis=0)
    out = next(predict_keypoints(model, [{"image": batch["image"][:count], "input_to_image": identity}], codec, engine))
    keypoints, scores = out["keypoints"], out["scores"]
    images = batch["image"][:count].numpy().transpose(0, 2, 3, 1) * IMAGENET_STD_RGB + IMAGENET_MEAN_RGB
    tiles = [draw_poses(np.clip(image, 0, 255).astype(np.uint8),
                        np.concatenate([keypoints[i:i + 1], scores[i:i + 1, :, None]], axis=-1), keypoint_set,
                        score_threshold=0.2)
             for i, image in enumerate(images)]
    columns = min(8, count)
    tiles += [np.zeros_like(tiles[0])] * (-count % columns)
    rows = [np.concatenate(tiles[r:r + columns], axis=1) for r in range(0, len(tiles), columns)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"val_predictions_epoch{epoch:03d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
        tracker.log_artifact(path, "predictions")


def export_best(model: ViTPose, config: FinetuneConfig, directory: Path, metadata: dict[str, Any]) -> None:
    save_checkpoint(model, directory, metadata={**metadata, "shards": config.data.shards})


FINETUNE = TrainingRecipe(name="finetune", task=FinetuneTask(), build_model=build_finetune_model,
                          export=export_best, validate=validate, best_metric="val_AP")


def run_finetune(config: FinetuneConfig, **trainer_kwargs: Any) -> StageOutput:
    """Fine-tune (or resume fine-tuning) as configured; the record names the best-val-AP export.

    ``trainer_kwargs`` go to ``pipelines.training.trainer.build_trainer`` (``name``, ``callbacks``, ``train_fn``).
    """
    return run_training(FINETUNE, config, **trainer_kwargs)
