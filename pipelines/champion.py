"""Register a trained model and give it the `champion` alias only if it beats the current champion.

"Beats" is decided on one val set for both models: the candidate's own stage config (shards, val
annotations, eval settings) evaluates the candidate *and* the current champion, each at its own input
resolution (a champion trained at 256x192 is scored at 256x192, a 384x288 candidate at 384x288), with
the same flip test and decoding. The comparison is logged either way: to the caller's MLflow run (the
tune sweep run, the distill run) as `champion_comparison.json` + metrics, and as tags on the new
model version.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import registry

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Path], float]  # local checkpoint dir -> val AP


def val_ap_scorer(finetune_config: Any) -> ScoreFn:
    """A scorer that runs the finetune stage's own validation (COCO AP, flip test) on any checkpoint."""

    def score(checkpoint_dir: Path) -> float:
        from pipelines.finetune import validate
        from pipelines.tracking import Tracker
        from vitpose_core.checkpoint import load_model

        model = load_model(checkpoint_dir)
        height, width = model.config.img_size
        config = finetune_config.model_copy(update={
            "model": finetune_config.model.model_copy(update={"input_size": (width, height)}),
            "eval": finetune_config.eval.model_copy(update={"num_visualized": 0}),
        })
        return float(validate(model, config, Tracker({}, active=False), epoch=0)["val_AP"])

    return score


def register_and_maybe_promote(
    checkpoint_dir: str | Path,
    score: ScoreFn,
    *,
    model_name: str,
    alias: str = "champion",
    tracking_uri: str,
    run_id: str,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log + register ``checkpoint_dir`` as a new version of ``model_name``; move ``alias`` to it only if
    its score beats the current holder's (or there is none). Returns the comparison record.

    Args:
        score: evaluates a local checkpoint directory on the shared val set (``val_ap_scorer``).
        run_id: MLflow run that logs the model and the comparison (e.g. the tune sweep run).
        tags: extra model-version tags (a student's ``teacher_version``, the winning trial id, ...).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    candidate_ap = score(Path(checkpoint_dir))
    champion_version = registry.get_alias(model_name, alias, tracking_uri)
    champion_ap = None
    if champion_version is not None:
        with tempfile.TemporaryDirectory() as tmp:
            champion_dir = registry.resolve_model_source(f"models:/{model_name}/{champion_version}", tracking_uri, tmp)
            champion_ap = score(champion_dir)
    model_uri = registry.log_checkpoint_model(checkpoint_dir, run_id=run_id, tracking_uri=tracking_uri,
                                              metadata={"val_AP": candidate_ap, **(tags or {})})
    version = registry.register(model_uri, model_name, tracking_uri)
    promoted = champion_ap is None or candidate_ap > champion_ap
    if promoted:
        registry.set_alias(model_name, alias, version, tracking_uri)
    record = {"model_name": model_name, "alias": alias, "candidate_version": version, "candidate_val_AP": candidate_ap,
              "champion_version_before": champion_version, "champion_val_AP": champion_ap, "promoted": promoted,
              "champion_version_after": version if promoted else champion_version}
    client = MlflowClient()
    for key, value in {"val_AP": candidate_ap, "promoted": promoted, "compared_with_version": champion_version,
                       "compared_with_val_AP": champion_ap, **(tags or {})}.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.log_dict(run_id, record, "champion_comparison.json")
    client.log_metric(run_id, "candidate_val_AP", candidate_ap)
    if champion_ap is not None:
        client.log_metric(run_id, "champion_val_AP", champion_ap)
    client.set_tag(run_id, "champion_promoted", str(promoted))
    logger.info("%s v%s val AP %.4f vs champion %s (%s): %s", model_name, version, candidate_ap, champion_version,
                "none" if champion_ap is None else f"{champion_ap:.4f}", "promoted" if promoted else "not promoted")
    return record
