"""`finetune` stage: ViTPose (backbone + heatmap decoder) on the crop shards, on Ray Train.

Model: a named variant at ``model.input_size``, its backbone optionally initialised from an MAE
encoder (pretrain stage output; position embeddings resized to the target grid) or any ViTPose
checkpoint. Loss: weighted joints-MSE on UDP heatmaps. After each epoch rank 0 evaluates on the
val shards: flip test, DARK-UDP decode, back to image pixels, rescoring + OKS-NMS, COCO AP
(``vitpose_core.engine.evaluate_coco_ap``); the best model by ``val_AP`` is exported in the
project's checkpoint format to ``<run>/finetune_export`` and to MLflow, with a PNG of predictions.

Keypoints come from the data: the model's decoder is built for the shard manifest's keypoint set
(any set, custom ones included) and the exported checkpoint records it.

Multi-dataset (ViTPose+): with a ``datasets:`` section (name + ratio per decoder), or when the
shards' training datasets have different keypoint sets and ``data.stream.keypoints`` is unset (then
every such dataset, ratio 1 each), the model gets one shared backbone and one decoder per dataset
(``model.num_experts`` > 0: ViTPose++ MoE FFNs), batches are mixed by the ratios
(``pipelines.data.mix_by_ratio``) and each sample's loss goes through its own decoder. Validation
reports ``val_<stat>_<dataset>`` for every dataset, and ``val_<stat>`` (so ``val_AP``, which picks
the exported model) is the *first* (primary) dataset's: the paper's multi-dataset models are chosen
and reported by their COCO AP, and a mean over datasets would trade the target dataset for others.
A single-dataset model comes out of the exported one with ``load_model(path, dataset=NAME)``
(``vitpose eval/predict --dataset NAME``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipelines import storage
from pipelines.contract import StageOutput
from pipelines.data import iter_pose_batches, row_keypoint_set, shard_keypoint_sets, stream_keypoint_set
from pipelines.finetune.config import FinetuneConfig
from pipelines.tracking import Tracker
from pipelines.training.recipe import TrainingRecipe
from pipelines.training.result import run_training
from vitpose_core.checkpoint import load_checkpoint, save_checkpoint, unwrap_model
from vitpose_core.codec import UDPHeatmapCodec
from vitpose_core.datasets import parse_annotation_bytes, records_to_coco
from vitpose_core.engine import EngineConfig, FinetuneTask, evaluate_coco_ap, predict_keypoints
from vitpose_core.evaluation import load_ground_truth
from vitpose_core.inference import IMAGENET_MEAN, IMAGENET_STD
from vitpose_core.keypoints import KeypointSet
from vitpose_core.mae import ENCODER_WEIGHTS_NAME, load_pretrained_encoder
from vitpose_core.models import ViTPose, build_model
from vitpose_core.multi_dataset import MultiDatasetFinetuneTask, dataset_view
from vitpose_core.visualize import draw_poses


def _manifest(config: FinetuneConfig) -> dict[str, Any]:
    uri = storage.join(storage.normalize(config.data.shards), "manifest.json")
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {uri} (data.shards must be the shard stage's output)") from None


def train_keypoint_sets(config: FinetuneConfig) -> dict[str, KeypointSet]:
    """dataset -> keypoint set, for the datasets with training rows (shard manifest order)."""
    manifest = _manifest(config)
    trained = [key.split("/")[0] for key, count in manifest["counts"].items()
               if key.endswith("/train") and count["rows_out"]]
    sets = shard_keypoint_sets(config.data.shards)
    found = {name: row_keypoint_set(name, sets) for name in trained}
    unknown = [name for name, layout in found.items() if layout is None]
    if unknown:
        raise ValueError(f"{config.data.shards}/manifest.json records no keypoint set for datasets {unknown}; "
                         "reshard them with this version")
    return found  # type: ignore[return-value]


def finetune_datasets(config: FinetuneConfig) -> list[tuple[str, KeypointSet, float]]:
    """(dataset, keypoint set, ratio) per decoder of a multi-dataset run; [] for one decoder."""
    sets = train_keypoint_sets(config)
    if config.datasets:
        missing = [d.name for d in config.datasets if d.name not in sets]
        if missing:
            raise ValueError(f"datasets {missing} have no training rows in {config.data.shards} "
                             f"(it has {sorted(sets)})")
        extra = sorted(set(sets) - {d.name for d in config.datasets})
        if extra:  # every training row goes through some decoder; the mix has no place for these
            raise ValueError(f"the shards' training split also holds datasets {extra}: list them in `datasets:` "
                             "or shard them separately")
        return [(d.name, sets[d.name], d.ratio) for d in config.datasets]
    layouts = list(sets.values())
    if config.data.stream.keypoints is None and any(not layouts[0].same_layout(o) for o in layouts[1:]):
        return [(name, layout, 1.0) for name, layout in sets.items()]
    return []


def finetune_keypoint_set(config: FinetuneConfig) -> KeypointSet:
    """The single decoder's keypoint set: ``data.stream.keypoints``, else the shards' one layout."""
    return stream_keypoint_set(config.data.stream, train_keypoint_sets(config))


def build_finetune_model(config: FinetuneConfig) -> ViTPose:
    """The variant at the configured size, for the shards' keypoint set(s); backbone from
    ``model.pretrained`` when given."""
    plan = finetune_datasets(config)
    if plan:
        model = build_model(config.model.variant, datasets=[(name, layout) for name, layout, _ in plan],
                            **config.model.overrides())
    else:
        model = build_model(config.model.variant, keypoint_set=finetune_keypoint_set(config),
                            **config.model.overrides())
    source = config.model.pretrained
    if source is None:
        return model
    local = storage.local_dir(source)
    if (local / ENCODER_WEIGHTS_NAME).exists():
        load_pretrained_encoder(model, local)
    else:
        load_checkpoint(model, local)
    return model


def val_annotations(config: FinetuneConfig, dataset: str | None = None) -> str:
    """The val split's annotation file: ``data.val_annotations``, else the one the shard manifest records (of
    ``dataset`` when given: a multi-dataset model's decoders each use their dataset's file from the manifest)."""
    if config.data.val_annotations and dataset is None:
        return config.data.val_annotations
    manifest = _manifest(config)
    files = [source["annotations"] for source in manifest.get("inputs", [])
             if source.get("split") == "val" and (dataset is None or source.get("dataset") == dataset)]
    if len(files) != 1:
        which = f" of dataset {dataset!r}" if dataset else ""
        raise ValueError(f"cannot tell the val annotations{which} from {config.data.shards}/manifest.json "
                         f"({len(files)} val inputs); set data.val_annotations")
    return files[0]


def _ground_truth(config: FinetuneConfig, annotations: str, dataset: str | None) -> Any:
    """pycocotools index of a val file; raw AIC / MPII files are converted to COCO layout first."""
    data = storage.read_bytes(annotations)
    entry = next((i for i in _manifest(config).get("inputs", []) if i.get("annotations") == annotations), {})
    if entry.get("format", "coco") != "coco":
        parsed = parse_annotation_bytes(data, dataset or entry.get("dataset", "val"), "val", annotations)
        return load_ground_truth(records_to_coco(parsed.records, parsed.keypoint_set))
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "val.json"
        local.write_bytes(data)
        return load_ground_truth(local)


def validate(model: ViTPose, config: FinetuneConfig, tracker: Tracker, epoch: int) -> dict[str, float]:
    """COCO AP on the val shards (rank 0, unwrapped model) and a PNG of predictions logged to MLflow.

    A multi-dataset model is scored per dataset (``val_<stat>_<dataset>``); ``val_<stat>`` is the
    first dataset's (module docstring).
    """
    if not model.config.datasets:
        return _validate_one(model, config, tracker, epoch, model.config.keypoint_set_data, None)
    metrics: dict[str, float] = {}
    for index, name in enumerate(model.config.dataset_names):
        view = dataset_view(model, index)
        stats = _validate_one(view, config, tracker, epoch, view.config.keypoint_set_data, name,
                              draw=index == 0)
        metrics.update({f"{key}_{name}": value for key, value in stats.items()})
        if index == 0:
            metrics.update(stats)
    return metrics


def _validate_one(model: Any, config: FinetuneConfig, tracker: Tracker, epoch: int, keypoint_set: KeypointSet,
                  dataset: str | None, draw: bool = True) -> dict[str, float]:
    """One decoder's AP: val rows of ``dataset`` (None: all) in ``keypoint_set``'s layout."""
    stream = config.data.stream_config(config.model.input_size).model_copy(update={"augment": False})
    datasets = None if dataset is None else [dataset]
    if dataset is None and stream.keypoints is None:
        # a single-decoder model is scored on the val rows of the datasets in its own layout
        same = [name for name, layout in shard_keypoint_sets(config.data.shards).items()
                if layout.same_layout(keypoint_set)]
        datasets = same or None
        # its val file: data.val_annotations if set, else that dataset's in the manifest
        dataset = same[0] if len(same) == 1 and not config.data.val_annotations else None
    # rows in the model's layout: a dataset's own set is found by its name in the manifest
    stream = stream.model_copy(update={"keypoints": stream.keypoints or keypoint_set.name})
    codec = UDPHeatmapCodec(stream.input_size, stream.heatmap_size, stream.sigma)
    device = next(model.parameters()).device
    engine = EngineConfig(device=str(device), precision=config.scaling.precision)
    ground_truth = _ground_truth(config, val_annotations(config, dataset), dataset)

    def batches():
        seen = 0
        for batch in iter_pose_batches(config.data.shards, stream, batch_size=config.eval.batch_size, split="val",
                                       datasets=datasets):
            if config.eval.max_instances is not None and seen >= config.eval.max_instances:
                return
            seen += len(batch["image"])
            yield batch

    if config.eval.max_instances is not None:  # evaluate only the images whose crops were predicted
        ground_truth = _subset(ground_truth, {int(i) for b in batches() for i in b["image_id"]})
    stats, _ = evaluate_coco_ap(model, batches(), codec, ground_truth, keypoint_set, engine, config.eval.flip_test)
    if config.eval.num_visualized and draw:
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
    images = batch["image"][:count].numpy().transpose(0, 2, 3, 1) * IMAGENET_STD + IMAGENET_MEAN
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


@dataclasses.dataclass(frozen=True)
class PoseFinetuneTask:
    """Heatmap loss of a single-decoder batch, or of a mixed multi-dataset batch (it carries
    ``dataset_index``): then each sample through its dataset's decoder (``MultiDatasetFinetuneTask``)."""

    name: str = "finetune"

    def loss(self, model: Any, batch: Any) -> Any:
        if "dataset_index" not in batch:
            return FinetuneTask().loss(model, batch)
        names = tuple(unwrap_model(model).config.dataset_names)
        return MultiDatasetFinetuneTask(names).loss(model, batch)


def stream_options(config: FinetuneConfig) -> dict[str, Any]:
    """The training stream's keypoint layouts, and the mix of a multi-dataset run."""
    options: dict[str, Any] = {"keypoint_sets": shard_keypoint_sets(config.data.shards)}
    plan = finetune_datasets(config)
    if plan:
        options.update(mixed_datasets=[name for name, _, _ in plan], ratios=[ratio for _, _, ratio in plan])
    return options


FINETUNE = TrainingRecipe(name="finetune", task=PoseFinetuneTask(), build_model=build_finetune_model,
                          export=export_best, validate=validate, best_metric="val_AP", stream_options=stream_options)


def run_finetune(config: FinetuneConfig, **trainer_kwargs: Any) -> StageOutput:
    """Fine-tune (or resume fine-tuning) as configured; the record names the best-val-AP export.

    ``trainer_kwargs`` go to ``pipelines.training.trainer.build_trainer`` (``name``, ``callbacks``, ``train_fn``).
    """
    return run_training(FINETUNE, config, **trainer_kwargs)
