"""The register stage: the one place that registers models and decides the champion.

Tune and distill only leave a checkpoint and a val AP in their records; `vitpose run` hands this stage
every candidate's checkpoint (finetune's best, tune's winner, distill's student), and `vitpose register`
takes them on the command line. Then:

1. every candidate *and* the current `<model_name>@<alias>` holder, if there is one, is scored with the
   same code on the same val set: the finetune stage's `validate` (flip test, COCO AP) over
   `scoring.data.shards`, each model at its own input resolution;
2. the best candidate is logged (as an MLflow pyfunc model) and registered as a new version;
3. `alias` moves to it only if it beats the current holder, so a worse run never demotes a champion
   from an earlier run in the same MLflow store. The comparison is kept as model-version tags.

Rescoring instead of trusting the stages' own `val_AP` keeps the comparison fair when stages evaluate
differently (e.g. `eval.max_instances` caps, or a tune trial's best epoch).

With `detections` (the detect stage's boxes on the val images) the champion is also scored the way the
ViTPose paper reports COCO AP: over the val images with a person detector's boxes, beside the same
evaluation with ground-truth boxes (`box_comparison`: the top-down path of `vitpose eval --checkpoint
--images --flip-test [--detections]`). Only the boxes differ between the two figures.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import registry, storage
from pipelines.contract import StageOutput
from pipelines.finetune.config import FinetuneConfig
from pipelines.register.config import RegisterConfig

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Path], float]  # local checkpoint dir -> val AP


def val_ap_scorer(scoring: FinetuneConfig) -> ScoreFn:
    """A scorer that runs the finetune stage's own validation (COCO AP, flip test) on any checkpoint."""

    def score(checkpoint_dir: Path) -> float:
        from pipelines.finetune.run import validate
        from pipelines.tracking import Tracker
        from vitpose_core.checkpoint import load_model

        model = load_model(checkpoint_dir)
        config = scoring.model_copy(update={
            "model": scoring.model.model_copy(update={"input_size": model.config.input_size}),
            "eval": scoring.eval.model_copy(update={"num_visualized": 0}),
        })
        return float(validate(model, config, Tracker({}, active=False), epoch=0)["val_AP"])

    return score


def run_register(config: RegisterConfig, run_id: str | None = None) -> StageOutput:
    """Score the candidates and the champion, register the best candidate, move the alias if it wins.

    Args:
        run_id: the MLflow run that logs the model (the pipeline's register stage run); None starts one.
    """
    from pipelines.session import experiment_id, mlflow_client, resolve_tracking_uri

    if not config.checkpoints:
        raise ValueError(f"register: no candidate checkpoints (candidates {list(config.candidates)} left no "
                         "checkpoint); run at least one of them first, or give --checkpoint NAME=URI")
    if not config.scoring.data.shards:
        raise ValueError("register: scoring.data.shards is not set: the val set every candidate is scored on")
    # without a URI and MLFLOW_TRACKING_URI: the embedded pipeline's store in ./vitpose_runs
    tracking_uri, artifacts = resolve_tracking_uri(config.tracking_uri, "vitpose_runs")
    client = mlflow_client(tracking_uri)
    if run_id is None:
        run_id = client.create_run(experiment_id(client, config.scoring.tracking.experiment, artifacts),
                                   run_name="register").info.run_id
    score = val_ap_scorer(config.scoring)
    scores = {}
    for name, checkpoint in config.checkpoints.items():
        scores[name] = score(registry.resolve_model_source(checkpoint))
        logger.info("register: %s val AP %.4f (%s)", name, scores[name], checkpoint)
    winner = max(scores, key=lambda name: scores[name])

    holder = registry.get_alias(config.model_name, config.alias, tracking_uri)
    holder_ap = None
    if holder is not None:
        with tempfile.TemporaryDirectory() as tmp:
            holder_ap = score(registry.resolve_model_source(f"models:/{config.model_name}/{holder}", tracking_uri, tmp))
    model_uri = registry.log_checkpoint_model(registry.resolve_model_source(config.checkpoints[winner]), run_id=run_id,
                                              tracking_uri=tracking_uri,
                                              metadata={"stage": winner, "val_AP": scores[winner]})
    version = registry.register(model_uri, config.model_name, tracking_uri=tracking_uri)
    promoted = holder_ap is None or scores[winner] > holder_ap
    if promoted:
        registry.set_alias(config.model_name, config.alias, version, tracking_uri=tracking_uri)
    tags = {"stage": winner, "val_AP": scores[winner], "promoted": promoted, "compared_with_version": holder,
            "compared_with_val_AP": holder_ap, **{f"{name}_val_AP": value for name, value in scores.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(config.model_name, version, key, str(value))

    champion = config.checkpoints[winner] if promoted else f"models:/{config.model_name}/{holder}"
    pictures = _pictures(config, client, run_id, champion=champion, tracking_uri=tracking_uri)
    champion_version = version if promoted else holder
    champion_ap = scores[winner] if promoted else holder_ap
    metrics = {f"{name}_ap": value for name, value in scores.items()}
    metrics.update(ap=float(champion_ap), candidate_ap=scores[winner], promoted=float(promoted))
    verdict = (f"v{version} from {winner} is {config.alias}" if promoted else
               f"v{version} from {winner} (AP {scores[winner]:.3f}) did not beat v{holder}; {config.alias} stays")
    boxes = ""
    if config.detections:
        with tempfile.TemporaryDirectory() as tmp:
            local = registry.resolve_model_source(champion, tracking_uri, Path(tmp) / "champion")
            comparison = box_comparison(local, config.scoring, config.detections)
        metrics.update(comparison)
        for key in ("ap_detected_boxes", "ap_gt_boxes"):
            client.set_model_version_tag(config.model_name, champion_version, f"val_{key}", str(comparison[key]))
        boxes = (f"; with detected boxes AP {comparison['ap_detected_boxes']:.3f} "
                 f"(ground-truth boxes {comparison['ap_gt_boxes']:.3f})")
    return StageOutput(
        outputs={"model_uri": f"models:/{config.model_name}@{config.alias}", "model_name": config.model_name,
                 "alias": config.alias, "version": champion_version, "candidate_version": version, "winner": winner,
                 "promoted": promoted, "checkpoint": config.checkpoints[winner], "scores": scores,
                 "pictures": pictures, "detections": config.detections},
        metrics=metrics,
        summary=f"{verdict}, AP {champion_ap:.3f} ({', '.join(f'{n} {s:.3f}' for n, s in scores.items())}){boxes}")


def box_comparison(checkpoint: Path, scoring: FinetuneConfig, detections: str) -> dict[str, float]:
    """Pose AP (and AP50, AR) of a checkpoint over the val images with ground-truth boxes and with `detections`.

    One top-down path for both, the one `vitpose eval --checkpoint CK --annotations A --images I
    --flip-test [--detections D]` runs: crop every box, run the model (fp32, flip test as
    `scoring.eval.flip_test`), decode to image pixels, rescore with the box score + OKS-NMS, COCO keypoint AP.
    The val images and annotations are the shard manifest's val source (local or s3://).
    """
    from pipelines.detect.images import read_split
    from vitpose_core.checkpoint import load_model
    from vitpose_core.evaluation import (
        evaluate_keypoints,
        ground_truth_boxes,
        load_detections,
        load_ground_truth,
        rescore_and_nms,
    )
    from vitpose_core.inference import TopDownPredictor, predict_dataset

    model = load_model(checkpoint)
    keypoint_set = model.config.keypoint_set_data
    predictor = TopDownPredictor(model, keypoint_set, flip_test=scoring.eval.flip_test,
                                 batch_size=scoring.eval.batch_size)
    metrics = {}
    with tempfile.TemporaryDirectory() as tmp:
        val = read_split(scoring.data.shards, "val", tmp, one_source=True)
        ground_truth = load_ground_truth(val.document)
        boxes = {"gt_boxes": ground_truth_boxes(ground_truth),
                 "detected_boxes": load_detections(json.loads(storage.read_text(detections)),
                                                   image_ids=ground_truth.getImgIds())}
        for name, by_image in boxes.items():
            results = rescore_and_nms(predict_dataset(predictor, val.paths, by_image), keypoint_set.sigmas_array())
            stats = evaluate_keypoints(ground_truth, results, keypoint_set.sigmas_array())
            metrics.update({f"ap_{name}": stats["AP"], f"ap50_{name}": stats["AP50"], f"ar_{name}": stats["AR"]})
    return metrics



def _pictures(config: RegisterConfig, client: Any, run_id: str, champion: str, tracking_uri: str) -> dict[str, str]:
    """The champion's poses on val images and the candidates' learning curves: PNGs logged to the run
    (`log_image`, shown in the MLflow UI) and written to `config.out`; returns where they are."""
    from PIL import Image

    from pipelines.pictures import learning_curves, predictions_on_val

    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        local = registry.resolve_model_source(champion, tracking_uri, Path(tmp) / "champion")
        pngs = {"champion_predictions": predictions_on_val(local, config.scoring.data.shards,
                                                           Path(tmp) / "champion_predictions.png")}
        if config.curves:
            pngs["learning_curves"] = learning_curves(client, config.curves, Path(tmp) / "learning_curves.png")
        for name, png in pngs.items():
            client.log_image(run_id, np.asarray(Image.open(png).convert("RGB")), f"pictures/{name}.png")
            if config.out:
                written[name] = storage.join(storage.normalize(config.out), f"{name}.png")
                storage.write_bytes(written[name], png.read_bytes())
    return written
