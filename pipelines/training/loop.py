"""The per-worker training loop every training stage runs (pretrain, finetune, tune trials, distill).

Short glue around ``vitpose_core.engine.run_epoch``: build the recipe's model, restore the last
checkpoint, wrap it (DDP or FSDP2), stream batches from this worker's Ray Data shard, validate and
export on rank 0 after each epoch, and report checkpoints. Checkpoints (every
``checkpoint.every_n_steps`` and at each epoch end) hold model, optimiser, scheduler, the
``TrainProgress``, the torch RNG and the MLflow run id; rank 0 writes them, every rank calls
``ray.train.report`` (it is a barrier).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines import storage
from pipelines.config import config_hash
from pipelines.tracking import Tracker
from pipelines.training.fsdp import full_state, is_fsdp, load_full_state, wrap_model
from pipelines.training.recipe import TrainingRecipe, schedule_steps, steps_per_epoch
from vitpose_core.checkpoint import unwrap_model
from vitpose_core.engine import EngineConfig, StepResult, run_epoch
from vitpose_core.optim import build_adamw, build_scheduler

logger = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"


@dataclass
class TrainProgress:
    """Where a run is; saved in every checkpoint and restored on resume."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained (a mid-epoch resume skips them)
    best: float | None = None  # best value of the recipe's best_metric so far
    resumed_from: list[int] = field(default_factory=list)  # the step of each resume
    mlflow_run_id: str | None = None


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (``TorchTrainer(train_loop_config=...)``)."""

    recipe: TrainingRecipe
    config: Any  # the stage's config (FinetuneConfig, PretrainConfig, DistillConfig)
    tracking: dict[str, Any]  # pipelines.tracking.resolve_tracking(...)
    output: str  # <storage_path>/<run name>: checkpoints and the exported model
    train_rows: int


def train_fn_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Build, restore, wrap, then train epoch by epoch; returns a summary (``Result.return_value``)."""
    import ray.train
    import ray.train.torch

    from pipelines.data import iter_pose_batches, iter_prepared_batches, prefetch, shard_keypoint_sets

    setup: LoopConfig = loop_config["setup"]
    recipe, config = setup.recipe, setup.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.data.batch_size % world:
        raise ValueError(f"data.batch_size {config.data.batch_size} is not divisible by {world} workers")
    device = ray.train.torch.get_device()
    if config.scaling.torch_threads is not None:  # else Ray's OMP_NUM_THREADS = the worker's CPUs
        torch.set_num_threads(config.scaling.torch_threads)
    engine = EngineConfig(device=str(device), precision=config.scaling.precision,
                          max_grad_norm=config.optim.max_grad_norm)
    per_epoch = steps_per_epoch(config, setup.train_rows)
    total_steps, milestones = schedule_steps(config, per_epoch)

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = recipe.build_model(config)
    state = read_train_state(ray.train.get_checkpoint())
    model = wrap_model(model, config.scaling, device)
    optimizer = build_adamw(model, config.optim.lr, config.optim.weight_decay, config.optim.layer_decay_for(config),
                            config.optim.betas, backbone_prefix=recipe.backbone_prefix)
    scheduler = build_scheduler(optimizer, total_steps, config.schedule.warmup_steps, config.schedule.warmup_ratio,
                                config.schedule.kind, milestones, config.schedule.gamma, config.schedule.min_ratio)
    progress = TrainProgress()
    if state is not None:
        load_full_state(model, optimizer, state["model"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        progress = TrainProgress(**state["progress"])
        progress.resumed_from = [*progress.resumed_from, progress.step]
        logger.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, progress.step, progress.epoch,
                    progress.batch_in_epoch)

    tracker = Tracker(setup.tracking, active=rank == 0)
    progress.mlflow_run_id = tracker.start(progress.mlflow_run_id, run_name=Path(setup.output).name,
                                           output=setup.output)
    failed = True
    try:
        if state is None:
            tracker.log_params({"stage": recipe.name, **config.model_dump(mode="json"), "world_size": world,
                                "steps_per_epoch": per_epoch, "total_steps": total_steps})
            tracker.log_shards_input(config.data.shards, _read_manifest(config.data.shards))
        shard = ray.train.get_dataset_shard("train")
        stream = config.data.stream_config(config.model.input_size)
        # the rows' keypoint layouts (shard manifest); a recipe may add a multi-dataset mix
        stream_options = (recipe.stream_options(config) if recipe.stream_options is not None
                          else {"keypoint_sets": shard_keypoint_sets(config.data.shards)})
        per_worker_batch = config.data.batch_size // world

        def save(metrics: dict[str, float], gathered: tuple[dict, dict] | None = None) -> None:
            report_with_state(model, optimizer, scheduler, progress, metrics, rank, gathered)

        def on_step(result: StepResult) -> None:
            progress.step = result.step
            progress.batch_in_epoch += 1
            if result.step % tracker.log_every_n_steps == 0:
                tracker.log_metrics({"train_loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                                     "images_per_s": result.samples_per_second * world,
                                     **{f"train_{k}": v for k, v in result.metrics.items()}}, result.step)
            # the epoch's last step is checkpointed by the epoch-end report right after it
            if result.step % config.checkpoint.every_n_steps == 0 and progress.batch_in_epoch < per_epoch \
                    and result.step < total_steps:
                save({"step": result.step, "epoch": progress.epoch, "train_loss": result.loss})

        while progress.epoch < config.schedule.epochs and progress.step < total_steps:
            epoch = progress.epoch
            if config.data.preprocess.where == "ray_data":  # rows arrive transformed (trainer.train_dataset)
                batches = iter_prepared_batches(shard, batch_size=per_worker_batch, seed=config.seed, epoch=epoch,
                                                rank=rank, shuffle=stream.augment, drop_last=True,
                                                shuffle_buffer=config.data.shuffle_buffer,
                                                mixed_datasets=stream_options.get("mixed_datasets", ()),
                                                ratios=stream_options.get("ratios"))
            else:
                batches = iter_pose_batches(shard, stream, batch_size=per_worker_batch, seed=config.seed,
                                            epoch=epoch, rank=rank, drop_last=True,
                                            shuffle_buffer=config.data.shuffle_buffer, **stream_options)
            if config.data.prefetch_batches:
                batches = prefetch(batches, depth=config.data.prefetch_batches)
            try:
                # every rank takes the same number of steps, or DDP's all-reduce would wait forever
                summary = run_epoch(model, recipe.task, islice(batches, per_epoch), optimizer, scheduler, engine,
                                    step=progress.step, skip_batches=progress.batch_in_epoch,
                                    max_steps=total_steps, on_step=on_step)
            finally:
                if isinstance(batches, prefetch):
                    batches.close()
            progress.epoch, progress.batch_in_epoch = epoch + 1, 0
            metrics = {"step": progress.step, "epoch": epoch + 1, "train_loss_epoch": summary.mean_loss,
                       "epoch_seconds": summary.seconds}
            last_epoch = progress.epoch >= config.schedule.epochs or progress.step >= total_steps
            # gathered once per epoch for validation, export and the checkpoint (a collective under FSDP)
            gathered = full_state(model, optimizer)
            if rank == 0:
                plain = _plain_model(recipe, config, model, gathered[0], device)
                if recipe.validate is not None and validation_due(config, progress.epoch, last_epoch):
                    metrics.update(recipe.validate(plain, config, tracker, epoch + 1))
                tracker.log_metrics(metrics, progress.step)
                _maybe_export(recipe, plain, config, setup.output, tracker, progress, metrics)
                del plain
            save(metrics, gathered)
        failed = False
        return {"step": progress.step, "epoch": progress.epoch, "resumed_from": progress.resumed_from,
                "best": progress.best, "mlflow_run_id": progress.mlflow_run_id}
    finally:
        tracker.end(failed=failed)


def validation_due(config: Any, epoch: int, last_epoch: bool) -> bool:
    """Validate after every ``eval.every_n_epochs``-th epoch (counted from 1) and always after the last one."""
    every = getattr(getattr(config, "eval", None), "every_n_epochs", 1)
    return last_epoch or epoch % every == 0


def _plain_model(recipe: TrainingRecipe, config: Any, model: nn.Module, model_state: dict[str, torch.Tensor],
                 device: torch.device) -> nn.Module:
    """Rank 0's model for validation and export: the unwrapped model, or an unsharded copy under FSDP.

    An FSDP model cannot run a forward on one rank alone (every block all-gathers its shards from all
    ranks), so rank-0 validation works on a plain model built from the gathered full state instead.
    """
    if not is_fsdp(model):
        return unwrap_model(model)
    with torch.random.fork_rng(devices=[]):  # building must not move this rank's RNG (dropout, resume)
        plain = recipe.build_model(config)
    plain.load_state_dict(model_state)
    return plain.to(device)


def _maybe_export(recipe: TrainingRecipe, model: nn.Module, config: Any, output: str, tracker: Tracker,
                  progress: TrainProgress, metrics: dict[str, float]) -> None:
    """Rank 0: export ``model`` (unwrapped) when it is the best so far (or, without a metric, every epoch)."""
    if recipe.best_metric is not None:
        value = metrics.get(recipe.best_metric)
        if value is None or (progress.best is not None and value <= progress.best):
            return
        progress.best = value
    metadata = {"stage": recipe.name, "step": progress.step, "epoch": progress.epoch, "metrics": metrics,
                "mlflow_run_id": progress.mlflow_run_id, "config_hash": config_hash(config)}
    with tempfile.TemporaryDirectory() as tmp:
        recipe.export(model, config, Path(tmp), metadata)
        target = storage.join(output, f"{recipe.name}_export")
        storage.copy_dir(tmp, target)
        tracker.log_artifact(tmp, f"{recipe.name}_export")
    logger.info("exported %s model at step %d to %s", recipe.name, progress.step, target)


def report_with_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                      progress: TrainProgress, metrics: dict[str, float], rank: int,
                      gathered: tuple[dict, dict] | None = None) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 attaches the full training state.

    ``gathered``: the (model, optimiser) state ``full_state`` already gathered, if any.
    """
    import ray.train

    model_state, optim_state = gathered if gathered is not None else full_state(model, optimizer)
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "progress": dataclasses.asdict(progress), "torch_rng": torch.get_rng_state()},
                   Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def read_train_state(checkpoint: Any) -> dict[str, Any] | None:
    """The state dict a previous attempt reported, or None on a fresh start."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def _read_manifest(shards_uri: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(storage.join(shards_uri, "manifest.json")))
    except FileNotFoundError:
        return {}
