"""A training recipe + its config -> a fault-tolerant Ray Train run (``TorchTrainer``).

``build_trainer(recipe, config)`` sets ``ScalingConfig`` (workers, CPUs/GPUs per worker) and
``RunConfig(name, storage_path)``; the name is deterministic (the config's hash unless given), so
rerunning the same config on the same storage *resumes* (Train v2 reads the latest checkpoint back),
and ``FailureConfig(max_failures)`` restarts a killed worker group from the last checkpoint; a worker group
Ray cannot place within ``scaling.wait_for_workers_s`` fails the stage, naming what is missing. Tune
wraps the same builder: ``build_trainer(..., name=f"train-{trial_id}", callbacks=[TuneReportCallback()])``
inside a function trainable.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.tracking import forwarded_env, resolve_tracking
from pipelines.training.loop import LoopConfig, train_fn_per_worker
from pipelines.training.recipe import TrainingRecipe, check_schedule, run_name, train_rows
from pipelines.training.sections import ScalingSection
from vitpose_core.errors import UserError

logger = logging.getLogger(__name__)

# Ray Train waits this long for a worker group's placement group, then counts a controller failure and tries
# again (Train v2; the driver's value reaches Train's controller)
PLACEMENT_WAIT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class WorkersNotPlacedError(UserError, RuntimeError):
    """The cluster did not offer a stage's Train workers their resources within ``scaling.wait_for_workers_s``."""


def check_resources(scaling: ScalingSection) -> None:
    """Fail fast on the Train/Data CPU deadlock of RAY_NOTES 1.3: leave a whole CPU for Ray Data's tasks."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    needed = scaling.num_workers * scaling.cpus_per_worker
    if cpus and needed > cpus - 1:
        raise ValueError(f"scaling asks {needed:g} CPUs for Train workers but the cluster has {cpus:g}; leave >= 1 "
                         "CPU free for Ray Data (lower scaling.cpus_per_worker or num_workers)")


def placement_attempts(scaling: ScalingSection) -> int:
    """Train controller retries that add up to ``scaling.wait_for_workers_s`` of waiting for resources.

    Without a limit Train retries forever: on a fixed-size cluster that lost a node the job needs, it would
    wait without a word.
    """
    return max(1, math.ceil(scaling.wait_for_workers_s / _seconds_per_placement_attempt()))


def _seconds_per_placement_attempt() -> float:
    return float(os.environ.get(PLACEMENT_WAIT_ENV, 60))


def workers_not_placed(stage: str, scaling: ScalingSection) -> WorkersNotPlacedError:
    """What the stage asked, what the alive nodes have and what is free now, and what to change."""
    import ray

    from pipelines.session import format_resources as show

    per_worker = worker_resources(scaling)
    needed = {k: v * scaling.num_workers for k, v in per_worker.items()}
    free = ray.available_resources()
    short = [f"{k} {v:g} needed, {free.get(k, 0):g} free" for k, v in needed.items() if v > free.get(k, 0) + 1e-9]
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    listed = "; ".join(f"{node['NodeManagerAddress']} {show(node['Resources'])}" for node in nodes)
    waited = placement_attempts(scaling) * _seconds_per_placement_attempt()
    shortage = (f"Short: {', '.join(short)}." if short else
                "Enough is free in total, but split across nodes so that some worker fits on none.")
    return WorkersNotPlacedError(
        f"{stage}: Ray could not place {scaling.num_workers} Train workers of {show(per_worker)} within "
        f"{waited:g} s (scaling.wait_for_workers_s={scaling.wait_for_workers_s:g}). {shortage} "
        f"Alive nodes ({len(nodes)}): {listed}. A node the run needs may have been lost: add nodes (or let an "
        "autoscaler do it), lower scaling.num_workers or the per-worker resources, or raise "
        "scaling.wait_for_workers_s; the same command then resumes from the last checkpoint")


def worker_resources(scaling: ScalingSection) -> dict[str, float]:
    """What each Train worker reserves: CPUs, GPUs when used, and the node-type resources it is pinned to."""
    resources = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    return {**resources, **scaling.node_resources}


def train_dataset(recipe: TrainingRecipe, config: Any):
    """The train split as a Ray Dataset: shard rows, or rows Ray Data already transformed (``data.preprocess``)."""
    from pipelines.data import read_shards, shard_keypoint_sets, transform_in_ray_data

    rows = read_shards(config.data.shards, split="train")
    preprocess = config.data.preprocess
    if preprocess.where == "train_worker":
        return rows
    options = recipe.stream_options(config) if recipe.stream_options is not None else {}
    keypoint_sets = options.get("keypoint_sets") or shard_keypoint_sets(config.data.shards)
    # a multi-dataset run: the tasks emit each row in its dataset's layout; each worker mixes them by ratio
    return transform_in_ray_data(rows, config.data.stream_config(config.model.input_size), keypoint_sets=keypoint_sets,
                                 batch_size=config.data.batch_size // config.scaling.num_workers,
                                 num_cpus=preprocess.num_cpus, resources=preprocess.resources,
                                 max_tasks=preprocess.max_tasks, mixed_datasets=options.get("mixed_datasets", ()))


def build_trainer(recipe: TrainingRecipe, config: Any, *, name: str | None = None, callbacks: list | None = None,
                  train_fn: Callable[[dict], Any] | None = None, queued: bool = False):
    """The ``TorchTrainer`` of a training run.

    Args:
        name: Ray run name; default deterministic from the config, so reruns resume.
        callbacks: ``ray.train.UserCallback`` instances (e.g. Tune's ``TuneReportCallback``).
        train_fn: the per-worker function (default ``train_fn_per_worker``); tests wrap it.
        queued: a Tune trial, whose workers may wait for the trials ahead of it for as long as those run:
            no ``scaling.wait_for_workers_s`` limit.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if not config.data.shards:
        raise ValueError(f"{recipe.name}: data.shards is not set (the shard stage's output URI)")
    rows = train_rows(config.data.shards)
    check_schedule(recipe.name, config, rows)
    check_resources(config.scaling)
    name = name or run_name(recipe, config)
    storage_path = storage.normalize(config.checkpoint.storage_path)
    if not storage.is_s3(storage_path):
        storage_path = str(Path(storage_path).resolve())  # Ray needs an absolute local path
    output = storage.join(storage_path, name)
    setup = LoopConfig(recipe=recipe, config=config, tracking=resolve_tracking(config.tracking, output),
                       output=output, train_rows=rows)
    scaling = config.scaling
    return TorchTrainer(
        train_fn or train_fn_per_worker,
        train_loop_config={"setup": setup},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                               resources_per_worker=worker_resources(scaling),
                                               placement_strategy=scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures,
                                                   controller_failure_limit=-1 if queued else placement_attempts(scaling)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
            worker_runtime_env={"env_vars": forwarded_env()},
        ),
        datasets={"train": train_dataset(recipe, config)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        torch_config=TorchConfig(backend=None, timeout_s=1800),  # None: nccl on GPU, gloo on CPU
    )


def fit(recipe: TrainingRecipe, config: Any, **trainer_kwargs: Any):
    """Run (or resume) a training run to the end; returns the Ray ``Result``.

    Ray Train's ``fit`` installs its own SIGINT handler, which aborts the run and then calls ``sys.exit``,
    and leaves it installed. Here a SystemExit out of ``fit`` is that Ctrl-C, and goes on as the
    KeyboardInterrupt the CLI turns into exit 130 and the resume hint; the driver's handler is put back.
    """
    import signal
    import threading

    import ray.train

    from pipelines import session

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        result = build_trainer(recipe, config, **trainer_kwargs).fit()
    except ray.train.ControllerError as error:
        # Train's placement give-up (a worker-group start-up timeout); the class is internal to Train v2, so it
        # is matched by name and a rename leaves Ray's own error standing
        if type(getattr(error, "controller_failure", None)).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        raise workers_not_placed(recipe.name, config.scaling) from error
    except SystemExit as exit_:
        session.STOPPED_BY = session.STOPPED_BY or "SIGINT"
        raise KeyboardInterrupt(f"stopped by signal {session.STOPPED_BY}") from exit_
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGINT, previous)
    logger.info("%s finished: %s", recipe.name, result.metrics)
    return result
