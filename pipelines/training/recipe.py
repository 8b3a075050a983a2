"""What differs between training stages (``TrainingRecipe``) and the schedule arithmetic they share."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipelines import storage
from pipelines.config import config_hash
from vitpose_core.engine import Task


@dataclass(frozen=True)
class TrainingRecipe:
    """One kind of training run; everything else is the shared loop (``pipelines.training.loop``).

    Attributes:
        name: "pretrain" / "finetune" / "distill_token" / "distill"; prefixes run names and export folders.
        task: computes the loss from (model, batch).
        build_model: config -> plain ``nn.Module`` with its initial weights (e.g. pretrained encoder).
        export: (unwrapped model, config, local dir, metadata) -> writes the run's deliverable.
        validate: (unwrapped model, config, tracker, epoch) -> metrics, run on rank 0 after each epoch.
        best_metric: metric of ``validate`` that selects the exported model (None: export the last).
        backbone_prefix: module prefix of the ViT, for layer-wise lr decay.
        stream_options: config -> extra ``iter_pose_batches`` arguments (keypoint sets, a multi-dataset
            mix); None: the shard manifest's keypoint sets.
    """

    name: str
    task: Task
    build_model: Callable[[Any], nn.Module]
    export: Callable[[nn.Module, Any, Path, dict[str, Any]], None]
    validate: Callable[[nn.Module, Any, Any, int], dict[str, float]] | None = None
    best_metric: str | None = None
    backbone_prefix: str = "backbone."
    stream_options: Callable[[Any], dict[str, Any]] | None = None


def run_name(recipe: TrainingRecipe, config: Any) -> str:
    """``checkpoint.name``, else ``<recipe>-<config hash>``: the same config reruns into the same run and resumes."""
    return config.checkpoint.name or f"{recipe.name}-{config_hash(config)}"


def run_uri(recipe: TrainingRecipe, config: Any) -> str:
    """Where the run keeps its Ray state, checkpoints and exported model: ``<storage_path>/<name>``."""
    return storage.join(storage.normalize(config.checkpoint.storage_path), run_name(recipe, config))


def export_uri(recipe: TrainingRecipe, config: Any) -> str:
    """The exported model of a run (the best by ``best_metric``, else the last)."""
    return storage.join(run_uri(recipe, config), f"{recipe.name}_export")


def train_rows(shards_uri: str) -> int:
    """Training rows in a shard set, from its manifest (no data is read)."""
    manifest = json.loads(storage.read_text(storage.join(shards_uri, "manifest.json")))
    return sum(c["rows_out"] for key, c in manifest["counts"].items() if key.endswith("/train"))


def steps_per_epoch(config: Any, rows: int) -> int:
    steps = rows // config.data.batch_size
    if steps < 1:
        raise ValueError(f"{rows} training rows make no full global batch of data.batch_size={config.data.batch_size}")
    return steps


def schedule_steps(config: Any, per_epoch: int) -> tuple[int, list[int]]:
    """(total optimiser steps, step milestones) from the epoch-based schedule config."""
    total = config.schedule.epochs * per_epoch
    if config.schedule.max_steps is not None:
        total = min(total, config.schedule.max_steps)
    return total, [m * per_epoch for m in config.schedule.milestones]


def check_schedule(run: str, config: Any, rows: int) -> int:
    """Fail before any worker starts when the warm-up outlasts the run; returns the total optimiser steps.

    The total (``schedule.epochs`` x steps per epoch, capped by ``schedule.max_steps``) depends on the
    number of training rows, so only the ``max_steps`` bound can be checked when the config is loaded
    (``ScheduleSection``); inside the workers ``build_scheduler`` would raise the same error on every
    rank and on every restart ``checkpoint.max_failures`` allows.
    """
    per_epoch = steps_per_epoch(config, rows)
    total, _ = schedule_steps(config, per_epoch)
    schedule = config.schedule
    if schedule.warmup_steps > total:
        capped = schedule.max_steps is not None and schedule.max_steps < schedule.epochs * per_epoch
        source = (f"schedule.max_steps={schedule.max_steps}" if capped else
                  f"schedule.epochs={schedule.epochs} x {per_epoch} steps per epoch ({rows} training rows // "
                  f"data.batch_size={config.data.batch_size})")
        raise ValueError(f"{run}: schedule.warmup_steps ({schedule.warmup_steps}) is larger than the run's "
                         f"{total} optimiser steps ({source}); set schedule.warmup_steps <= {total}")
    return total
