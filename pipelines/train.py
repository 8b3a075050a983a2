"""Ray Train wrapper shared by the training stages (pretrain, finetune, later distill).

A stage is a ``Stage``: a config, a ``Task`` (the loss), a model builder, and optional
validation / export hooks (pipelines/finetune.py, pipelines/pretrain.py). This module turns any
stage into a fault-tolerant ``TorchTrainer`` run:

* ``build_trainer(stage, config)`` -> ``TorchTrainer`` with ``ScalingConfig`` (workers, CPUs/GPUs
  per worker), ``RunConfig(name, storage_path)`` -- the name is deterministic (the config's hash
  unless given), so rerunning the same config on the same storage *resumes* (Train v2 reads the
  latest checkpoint back) -- and ``FailureConfig(max_failures)``, so a killed worker group is
  restarted from the last checkpoint;
* ``train_fn_per_worker(loop_config)``: the per-worker loop, short glue around
  ``vitpose_core.engine.run_epoch``. DDP (gloo on CPU, nccl on GPU) or FSDP is applied to the
  finished model from outside with ``prepare_model``.

Checkpoints (every ``checkpoint.every_n_steps`` and at each epoch end) hold model, optimiser,
scheduler, global step, epoch and batch position, the torch RNG and the MLflow run id; rank 0
writes them, every rank calls ``ray.train.report`` (it is a barrier).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines import storage
from pipelines.config import StrictConfig
from pipelines.sections import ScalingSection
from pipelines.tracking import Tracker, forwarded_env, resolve_tracking
from vitpose_core.checkpoint import unwrap_model
from vitpose_core.engine import EngineConfig, StepResult, Task, run_epoch
from vitpose_core.optim import build_adamw, build_scheduler

logger = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class Stage:
    """What differs between training stages; everything else is this module's shared loop.

    Attributes:
        name: "pretrain" / "finetune" / "distill"; prefixes run names and metric names.
        task: computes the loss from (model, batch).
        build_model: config -> plain ``nn.Module`` with its initial weights (e.g. pretrained encoder).
        validate: (unwrapped model, config, tracker, epoch) -> metrics, run on rank 0 after each epoch.
        export: (unwrapped model, config, local dir, metadata) -> writes the stage's deliverable.
        best_metric: metric of ``validate`` that selects the exported model (None: export the last).
        backbone_prefix: module prefix of the ViT, for layer-wise lr decay.
    """

    name: str
    task: Task
    build_model: Callable[[Any], nn.Module]
    export: Callable[[nn.Module, Any, Path, dict[str, Any]], None]
    validate: Callable[[nn.Module, Any, Tracker, int], dict[str, float]] | None = None
    best_metric: str | None = None
    backbone_prefix: str = "backbone."


def config_hash(config: StrictConfig) -> str:
    """Stable hash of a stage config, minus fields that do not change what is trained."""
    data = config.model_dump(mode="json")
    data.get("tracking", {}).pop("run_name", None)
    # `vitpose run` nests each attempt under a new pipeline run; the rerun must still find its checkpoints
    data.get("tracking", {}).pop("parent_run_id", None)
    data.get("checkpoint", {}).pop("max_failures", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def run_name(stage: Stage, config: Any) -> str:
    return config.checkpoint.name or f"{stage.name}-{config_hash(config)}"


def run_uri(stage: Stage, config: Any) -> str:
    """Where the run keeps its Ray state, checkpoints and exported model: ``<storage_path>/<name>``."""
    return storage.join(storage.normalize(config.checkpoint.storage_path), run_name(stage, config))


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


def check_schedule(stage_name: str, config: Any, rows: int) -> int:
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
        raise ValueError(f"{stage_name}: schedule.warmup_steps ({schedule.warmup_steps}) is larger than the run's "
                         f"{total} optimiser steps ({source}); set schedule.warmup_steps <= {total}")
    return total


def check_resources(scaling: ScalingSection) -> None:
    """Fail fast on the Train/Data CPU deadlock of RAY_NOTES 1.3: leave a whole CPU for Ray Data's tasks."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    needed = scaling.num_workers * scaling.cpus_per_worker
    if cpus and needed > cpus - 1:
        raise ValueError(f"scaling asks {needed:g} CPUs for Train workers but the cluster has {cpus:g}; leave >= 1 "
                         "CPU free for Ray Data (lower scaling.cpus_per_worker or num_workers)")


def build_trainer(stage: Stage, config: Any, *, name: str | None = None, callbacks: list | None = None,
                  train_fn: Callable[[dict], Any] | None = None):
    """The ``TorchTrainer`` of a stage run. Tune wraps this: ``build_trainer(..., name=f"train-{trial_id}",
    callbacks=[TuneReportCallback()]).fit()`` inside a function trainable.

    Args:
        name: Ray run name; default deterministic from the config, so reruns resume.
        callbacks: ``ray.train.UserCallback`` instances (e.g. Tune's ``TuneReportCallback``).
        train_fn: the per-worker function (default ``train_fn_per_worker``); tests wrap it.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.data import read_shards

    if not config.data.shards:
        raise ValueError(f"{stage.name}: data.shards is not set (the shard stage's output URI)")
    rows = train_rows(config.data.shards)
    check_schedule(stage.name, config, rows)
    check_resources(config.scaling)
    name = name or run_name(stage, config)
    storage_path = storage.normalize(config.checkpoint.storage_path)
    if not storage.is_s3(storage_path):
        storage_path = str(Path(storage_path).resolve())  # Ray needs an absolute local path
    output = storage.join(storage_path, name)
    tracking = resolve_tracking(config.tracking, output)
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    loop_config = {"stage": stage, "config": config, "tracking": tracking, "output": output, "train_rows": rows}
    return TorchTrainer(
        train_fn or train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
            worker_runtime_env={"env_vars": {**forwarded_env(), "RAY_TRAIN_STAGE": stage.name}},
        ),
        datasets={"train": read_shards(config.data.shards, split="train")},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        torch_config=TorchConfig(backend=None, timeout_s=1800),  # None: nccl on GPU, gloo on CPU
    )


def run_stage(stage: Stage, config: Any, **trainer_kwargs: Any):
    """Run (or resume) a stage to the end; returns the Ray ``Result``."""
    result = build_trainer(stage, config, **trainer_kwargs).fit()
    logger.info("%s finished: %s", stage.name, result.metrics)
    return result


# ---------------------------------------------------------------------------------------------
# per-worker loop


def train_fn_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Build, restore, wrap, then train epoch by epoch; returns a summary (``Result.return_value``)."""
    import ray.train
    import ray.train.torch

    from pipelines.data import iter_pose_batches

    stage: Stage = loop_config["stage"]
    config = loop_config["config"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config.data.batch_size % world:
        raise ValueError(f"data.batch_size {config.data.batch_size} is not divisible by {world} workers")
    device = ray.train.torch.get_device()
    engine = EngineConfig(device=str(device), precision=config.scaling.precision,
                          max_grad_norm=config.optim.max_grad_norm)
    per_epoch = steps_per_epoch(config, loop_config["train_rows"])
    total_steps, milestones = schedule_steps(config, per_epoch)

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = stage.build_model(config)
    state = read_train_state(ray.train.get_checkpoint())
    if state is not None:
        model.load_state_dict(state["model"])
    model = wrap_model(model, config.scaling, device)
    optimizer = build_adamw(model, config.optim.lr, config.optim.weight_decay, config.optim.layer_decay_for(config),
                            config.optim.betas, backbone_prefix=stage.backbone_prefix)
    scheduler = build_scheduler(optimizer, total_steps, config.schedule.warmup_steps, config.schedule.warmup_ratio,
                                config.schedule.kind, milestones, config.schedule.gamma, config.schedule.min_ratio)
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "resumed_from": [],
                "mlflow_run_id": None}
    if state is not None:
        _load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        progress.update(state["progress"])
        progress["resumed_from"] = [*progress["resumed_from"], progress["step"]]
        logger.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, progress["step"], progress["epoch"],
                    progress["batch_in_epoch"])

    tracker = Tracker(loop_config["tracking"], active=rank == 0)
    progress["mlflow_run_id"] = tracker.start(progress["mlflow_run_id"], run_name=Path(loop_config["output"]).name,
                                              output=loop_config["output"])
    failed = True
    try:
        if state is None:
            tracker.log_params({"stage": stage.name, **config.model_dump(mode="json"), "world_size": world,
                                "steps_per_epoch": per_epoch, "total_steps": total_steps})
            tracker.log_shards_input(config.data.shards, _read_manifest(config.data.shards))
        shard = ray.train.get_dataset_shard("train")
        stream = config.data.stream_config(config.model.input_size)
        per_worker_batch = config.data.batch_size // world

        def save(metrics: dict[str, float], full_state: tuple[dict, dict] | None = None) -> None:
            report_with_state(model, optimizer, scheduler, progress, metrics, rank, full_state)

        def on_step(result: StepResult) -> None:
            progress["step"] = result.step
            progress["batch_in_epoch"] += 1
            if result.step % tracker.log_every_n_steps == 0:
                tracker.log_metrics({"train_loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                                     "images_per_s": result.samples_per_second * world,
                                     **{f"train_{k}": v for k, v in result.metrics.items()}}, result.step)
            if result.step % config.checkpoint.every_n_steps == 0:
                save({"step": result.step, "epoch": progress["epoch"], "train_loss": result.loss})

        while progress["epoch"] < config.schedule.epochs and progress["step"] < total_steps:
            epoch = progress["epoch"]
            batches = iter_pose_batches(shard, stream, batch_size=per_worker_batch, seed=config.seed, epoch=epoch,
                                        rank=rank, drop_last=True, shuffle_buffer=config.data.shuffle_buffer)
            # every rank takes the same number of steps, or DDP's all-reduce would wait forever
            summary = run_epoch(model, stage.task, islice(batches, per_epoch), optimizer, scheduler, engine,
                                step=progress["step"], skip_batches=progress["batch_in_epoch"],
                                max_steps=total_steps, on_step=on_step)
            progress.update(epoch=epoch + 1, batch_in_epoch=0)
            metrics = {"step": progress["step"], "epoch": epoch + 1, "train_loss_epoch": summary.mean_loss,
                       "epoch_seconds": summary.seconds}
            # gathered once per epoch for validation, export and the checkpoint (a collective under FSDP)
            full_state = _full_state(model, optimizer)
            if rank == 0:
                plain = _plain_model(stage, config, model, full_state[0], device)
                if stage.validate is not None:
                    metrics.update(stage.validate(plain, config, tracker, epoch + 1))
                tracker.log_metrics(metrics, progress["step"])
                _maybe_export(stage, plain, config, loop_config["output"], tracker, progress, metrics)
                del plain
            save(metrics, full_state)
        failed = False
        return {"step": progress["step"], "epoch": progress["epoch"], "resumed_from": progress["resumed_from"],
                "best": progress["best"], "mlflow_run_id": progress["mlflow_run_id"]}
    finally:
        tracker.end(failed=failed)


def wrap_model(model: nn.Module, scaling: ScalingSection, device: torch.device) -> nn.Module:
    """DDP through Ray's ``prepare_model``, or FSDP wrapped here.

    Ray's FSDP path refuses to run without CUDA; torch's FSDP itself runs on CPU over gloo, which is how
    the test suite exercises the sharded path (checkpoint gather, resume, validation) on this machine.
    """
    import ray.train.torch

    if scaling.strategy != "fsdp":
        return ray.train.torch.prepare_model(model, parallel_strategy=scaling.strategy)
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model.to(device), device_id=device, **scaling.fsdp_kwargs())


def is_fsdp(model: nn.Module) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel"


def _plain_model(stage: Stage, config: Any, model: nn.Module, model_state: dict[str, torch.Tensor],
                 device: torch.device) -> nn.Module:
    """Rank 0's model for validation and export: the unwrapped model, or an unsharded copy under FSDP.

    An FSDP model cannot run a forward on one rank alone (every layer all-gathers its shards from all
    ranks), so rank-0 validation works on a plain model built from the gathered full state instead.
    """
    if not is_fsdp(model):
        return unwrap_model(model)
    with torch.random.fork_rng(devices=[]):  # building must not move this rank's RNG (dropout, resume)
        plain = stage.build_model(config)
    plain.load_state_dict(model_state)
    return plain.to(device)


def _maybe_export(stage: Stage, model: nn.Module, config: Any, output: str, tracker: Tracker,
                  progress: dict[str, Any], metrics: dict[str, float]) -> None:
    """Rank 0: export ``model`` (unwrapped) when it is the best so far (or, without a metric, every epoch)."""
    if stage.best_metric is not None:
        value = metrics.get(stage.best_metric)
        if value is None or (progress["best"] is not None and value <= progress["best"]):
            return
        progress["best"] = value
    metadata = {"stage": stage.name, "step": progress["step"], "epoch": progress["epoch"], "metrics": metrics,
                "mlflow_run_id": progress["mlflow_run_id"], "config_hash": config_hash(config)}
    with tempfile.TemporaryDirectory() as tmp:
        stage.export(model, config, Path(tmp), metadata)
        target = storage.join(output, f"{stage.name}_export")
        upload_dir(Path(tmp), target)
        tracker.log_artifact(tmp, f"{stage.name}_export")
    logger.info("exported %s model at step %d to %s", stage.name, progress["step"], target)


def report_with_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                      progress: dict[str, Any], metrics: dict[str, float], rank: int,
                      full_state: tuple[dict, dict] | None = None) -> None:
    """``ray.train.report`` on every rank (a barrier); rank 0 attaches the full training state.

    ``full_state``: the (model, optimiser) state ``_full_state`` already gathered, if any.
    """
    import ray.train

    model_state, optim_state = full_state if full_state is not None else _full_state(model, optimizer)
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "progress": dict(progress), "torch_rng": torch.get_rng_state()}, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimiser state on CPU (FSDP gathers on every rank: a collective)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # model keys are the plain model's names (no FSDP prefixes): the export and rank-0 copy load them
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap_model(model).state_dict(), optimizer.state_dict()


def _load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict) -> None:
    """Restore what ``_full_state`` saved: FSDP re-shards the full optimiser state onto this rank."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim_state)


def read_train_state(checkpoint: Any) -> dict[str, Any] | None:
    """The state dict a previous attempt reported, or None on a fresh start."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local directory's files to a local path or s3:// prefix."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes(storage.join(uri, str(path.relative_to(local))), path.read_bytes())


def download_dir(uri: str, local: Path) -> Path:
    """Copy the files under ``uri`` (local or s3://) into ``local``; returns ``local``."""
    prefix = storage.normalize(uri).rstrip("/")
    for file_uri in storage.list_files(prefix, recursive=True):
        target = local / file_uri[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(file_uri))
    return local


def _read_manifest(shards_uri: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_text(storage.join(shards_uri, "manifest.json")))
    except FileNotFoundError:
        return {}


def local_ray_init_kwargs() -> dict[str, Any]:
    """ray.init arguments for the embedded default (token auth off only when the user did not choose)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    return {"include_dashboard": False}
