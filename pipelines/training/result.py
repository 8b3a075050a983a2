"""A training run to the end -> the stage record's outputs and metrics."""

from __future__ import annotations

from typing import Any

from pipelines import storage
from pipelines.contract import StageOutput, numbers
from pipelines.training.recipe import TrainingRecipe, export_uri, run_uri
from pipelines.training.trainer import fit


def run_training(recipe: TrainingRecipe, config: Any, *, name: str | None = None, **trainer_kwargs: Any) -> StageOutput:
    """Run (or resume) ``recipe`` under ``config`` and return its record; ``name`` replaces the run name
    (``checkpoint.name``), other keyword arguments go to ``build_trainer`` (``callbacks``, ``train_fn``)."""
    if name:
        config = config.model_copy(update={"checkpoint": config.checkpoint.model_copy(update={"name": name})})
    return training_output(recipe, config, fit(recipe, config, **trainer_kwargs))


def training_output(recipe: TrainingRecipe, config: Any, result: Any) -> StageOutput:
    """The run's export (for finetune and distill the best-val-AP model, whose AP is the loop's `best`, not
    the last epoch's), its run directory, the steps trained and the steps it resumed at."""
    if getattr(result, "error", None):
        raise RuntimeError(f"{recipe.name} failed: {result.error}")
    export = export_uri(recipe, config)
    metrics = numbers(result.metrics or {})
    summary = result.return_value or {}
    if summary.get("best") is not None:
        metrics["ap"] = float(summary["best"])
    metrics["steps"] = float(summary.get("step", metrics.get("step", 0)))
    has_export = bool(storage.list_files(export, recursive=True))  # also right on s3://, where dirs are implicit
    resumed = summary.get("resumed_from", [])
    text = f"AP {metrics['ap']:.3f}" if "ap" in metrics else ", ".join(
        f"{k} {metrics[k]:.4g}" for k in ("steps", "train_loss_epoch") if k in metrics)
    if resumed:  # Train v2 restored the latest checkpoint of an interrupted run
        text += f" (resumed at step {resumed[-1]})"
    return StageOutput(outputs={"checkpoint": export if has_export else None, "run": run_uri(recipe, config),
                                "resumed_from_steps": resumed, "mlflow_run_id": summary.get("mlflow_run_id")},
                       metrics=metrics, summary=text)
