"""MLflow for the training stages: one run per Train run, written from rank 0 only, resumable.

Pattern (RAY_NOTES.md section 6, as Ray's own e2e examples do it, without ``setup_mlflow``):

* the driver resolves an **absolute** tracking URI (default: ``sqlite:///<output>/mlflow.db``, so
  Train workers that ``chdir`` into their run directory still find it) and creates the experiment
  once with an explicit ``artifact_location``;
* rank 0 starts (or, after a restart, re-opens) the run: the run id is stored in every checkpoint,
  so a worker-group restart or a rerun on the same output continues the same MLflow run instead of
  leaving a RUNNING orphan behind; ``end_run`` always runs in ``finally``;
* other ranks get a tracker whose methods do nothing, so the training loop has no rank checks.

A SIGKILLed attempt runs no ``finally``, so its runs stay RUNNING. What takes over closes them:

* a Train run tags itself with its output URI (``vitpose.train_output``); when rank 0 starts (new or
  re-opened), any other RUNNING run of the same output is one a dead attempt started before its first
  checkpoint (so its id was never saved) and is set KILLED with ``vitpose.superseded_by`` = this run;
* a re-opened run (id from a checkpoint or ``sweep.json``) that a supersede had already closed gets its
  ``vitpose.superseded_by`` tag removed, and moves under the new attempt's parent run when that differs
  (``vitpose.previous_parent_run_id`` keeps the old one), so the tree shows where it finished;
* ``vitpose run`` closes the RUNNING pipeline runs of the same name and workdir, and every RUNNING run
  beneath them, the same way (``supersede_pipeline_attempts``, called by ``pipelines.pipeline``).

A ``tracking_uri`` of ``http://host:5000`` switches to a tracking server (needed on multi-node
clusters: a sqlite file on one node is invisible to the others).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.config import StrictConfig

logger = logging.getLogger(__name__)

# variables a worker needs to reach a tracking server or S3 artifacts; forwarded to Train workers
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


class TrackingConfig(StrictConfig):
    """Where and how a stage logs to MLflow."""

    enabled: bool = True
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else sqlite under the output")
    artifact_location: str | None = Field(None, description="None: <output>/mlartifacts (local) or the server's")
    experiment: str = "vitpose"
    run_name: str | None = None
    parent_run_id: str | None = Field(None, description="nest this run under a pipeline / sweep run")
    log_every_n_steps: int = Field(10, ge=1)
    system_metrics_every_s: float | None = Field(
        10.0, gt=0, description="training runs: MLflow's own system metrics (CPU, memory, GPU utilisation and "
        "memory where nvidia-ml-py is installed) of rank 0's node, sampled this often; None: off")


def resolve_tracking(config: TrackingConfig, output_uri: str) -> dict[str, Any]:
    """Absolute tracking URI, experiment id and parent run for the workers; creates the experiment once.

    Call on the driver: creating the experiment here, not in a worker, avoids both the concurrent
    create race between Tune trials and the relative-path trap under Ray's ``chdir``.
    """
    if not config.enabled:
        return {"enabled": False}
    from pipelines.session import experiment_id, mlflow_client, resolve_tracking_uri

    uri, default_artifacts = resolve_tracking_uri(config.tracking_uri, output_uri)
    experiment = experiment_id(mlflow_client(uri), config.experiment, config.artifact_location or default_artifacts)
    return {"enabled": True, "tracking_uri": uri, "experiment_id": experiment,
            "parent_run_id": config.parent_run_id, "run_name": config.run_name,
            "log_every_n_steps": config.log_every_n_steps, "system_metrics_every_s": config.system_metrics_every_s}


def forwarded_env() -> dict[str, str]:
    """Tracking and S3 variables of the driver, for ``RunConfig(worker_runtime_env={"env_vars": ...})``."""
    return {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}


SUPERSEDED_BY = "vitpose.superseded_by"  # on a run a dead attempt left RUNNING: the run that took over
PREVIOUS_PARENT = "vitpose.previous_parent_run_id"  # on a re-opened run moved under the new attempt's parent
TRAIN_OUTPUT = "vitpose.train_output"  # on a Train run: its output URI (<storage_path>/<name>)
PARENT = "mlflow.parentRunId"


def _search(client: Any, experiment_ids: list[str], filter_string: str) -> Iterator[Any]:
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def supersede(client: Any, run_ids: list[str], successor: str) -> list[str]:
    """Set the RUNNING ones of ``run_ids`` KILLED, tagged ``vitpose.superseded_by=successor``; returns those."""
    killed = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING" or run_id == successor:
            continue
        client.set_tag(run_id, SUPERSEDED_BY, successor)
        if "vitpose.state" in run.data.tags:  # a pipeline stage run: running -> killed
            client.set_tag(run_id, "vitpose.state", "killed")
        client.set_terminated(run_id, "KILLED")
        killed.append(run_id)
    if killed:
        logger.info("marked %d MLflow run(s) left RUNNING by a dead attempt KILLED (superseded by %s): %s",
                    len(killed), successor, ", ".join(killed))
    return killed


def descendants(client: Any, experiment_ids: list[str], root_id: str) -> list[str]:
    """Ids of every run nested under ``root_id`` (children, their children, ...), in any state."""
    found, todo = [], [root_id]
    while todo:
        parent = todo.pop()
        for run in _search(client, experiment_ids, f"tags.`{PARENT}` = '{parent}'"):
            if run.info.run_id not in found:
                found.append(run.info.run_id)
                todo.append(run.info.run_id)
    return found


def supersede_train_runs(client: Any, experiment_id: str, output: str, current_run_id: str) -> list[str]:
    """KILL the other RUNNING runs of the Train run at ``output``: a dead attempt's, started before its first
    checkpoint saved their id (nothing re-opens them); they stay in the store, marked."""
    stale = [run.info.run_id for run in _search(client, [experiment_id], "attributes.status = 'RUNNING'")
             if run.data.tags.get(TRAIN_OUTPUT) == output and run.info.run_id != current_run_id]
    return supersede(client, stale, current_run_id)


def adopt_reopened_run(client: Any, run_id: str, parent_run_id: str | None) -> None:
    """A run re-opened by a new attempt: no longer superseded, and nested under this attempt's parent."""
    run = client.get_run(run_id)
    if SUPERSEDED_BY in run.data.tags:
        client.delete_tag(run_id, SUPERSEDED_BY)
        if run.data.tags.get("vitpose.state") == "killed":
            client.set_tag(run_id, "vitpose.state", "running")
    old_parent = run.data.tags.get(PARENT)
    if parent_run_id and old_parent != parent_run_id:
        client.set_tag(run_id, PARENT, parent_run_id)
        if old_parent:
            client.set_tag(run_id, PREVIOUS_PARENT, old_parent)


def supersede_pipeline_attempts(client: Any, experiment_id: str, pipeline: str, workdir: str,
                                current_run_id: str) -> list[str]:
    """KILL the earlier RUNNING pipeline runs of ``pipeline`` on ``workdir`` and every RUNNING run beneath them.

    A pipeline run still RUNNING when a new attempt starts on the same workdir belongs to an attempt that
    died without its ``finally`` (SIGKILL, lost node); two live attempts on one workdir are not supported
    (they would share stage directories and Train runs). Runs a new attempt re-opens later (a resumed Train
    run, a restored tune sweep) become RUNNING again and move under it (``adopt_reopened_run``).
    """
    killed: list[str] = []
    for run in _search(client, [experiment_id], "attributes.status = 'RUNNING'"):
        tags, params = run.data.tags, run.data.params
        if (run.info.run_id == current_run_id or tags.get("vitpose.pipeline") != pipeline
                or tags.get("vitpose.workdir", params.get("workdir")) != workdir):
            continue
        beneath = descendants(client, [experiment_id], run.info.run_id)
        killed += supersede(client, [*reversed(beneath), run.info.run_id], current_run_id)
    return killed


class Tracker:
    """MLflow logging for one Train run; a no-op unless ``active`` (rank 0 with tracking enabled)."""

    def __init__(self, settings: dict[str, Any], active: bool) -> None:
        self.settings = settings
        self.active = active and settings.get("enabled", False)
        self.run_id: str | None = None
        self.log_every_n_steps = int(settings.get("log_every_n_steps", 10))

    def start(self, run_id: str | None = None, run_name: str | None = None, output: str | None = None) -> str | None:
        """Start a new run, or re-open ``run_id`` (from a checkpoint) so a resumed job logs into it.

        ``output``: the Train run's output URI; other RUNNING runs of it (a dead attempt's, started before
        its first checkpoint) are set KILLED (``supersede_train_runs``).
        """
        if not self.active:
            return None
        import mlflow

        from pipelines.session import mlflow_client, use_tracking_uri

        use_tracking_uri(self.settings["tracking_uri"])  # the fluent API below logs from this worker
        parent_run_id = self.settings.get("parent_run_id")
        every_s = self.settings.get("system_metrics_every_s")
        if every_s:  # whether the GPU waits on its data shows here first (GPU utilisation next to CPU)
            mlflow.set_system_metrics_sampling_interval(every_s)
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else self.settings["experiment_id"],
                               run_name=None if run_id else (self.settings.get("run_name") or run_name),
                               parent_run_id=parent_run_id, tags={TRAIN_OUTPUT: output} if output else None,
                               log_system_metrics=bool(every_s))
        self.run_id = run.info.run_id
        client = mlflow_client(self.settings["tracking_uri"])
        if run_id:
            adopt_reopened_run(client, run_id, parent_run_id)
        if output:
            supersede_train_runs(client, run.info.experiment_id, output, self.run_id)
        logger.info("MLflow run %s (%s) at %s", self.run_id, "resumed" if run_id else "new",
                    self.settings["tracking_uri"])
        return self.run_id

    def end(self, failed: bool = False) -> None:
        if self.active and self.run_id:
            import mlflow

            mlflow.end_run(status="FAILED" if failed else "FINISHED")

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            import mlflow

            flat = _flatten(params)
            existing = mlflow.get_run(self.run_id).data.params
            # params are immutable in MLflow: a resumed run only adds the ones it lacks
            new = {k: str(v)[:6000] for k, v in flat.items() if k not in existing}
            for start in range(0, len(new), 100):
                mlflow.log_params(dict(list(new.items())[start:start + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], file_name: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_dict(data, file_name)

    def log_shards_input(self, shards_uri: str, manifest: dict[str, Any]) -> None:
        """The shard manifest as the run's dataset input (name, source URI, fingerprint digest) and artifact."""
        if not self.active:
            return
        import mlflow
        import pandas as pd

        counts = manifest.get("counts", {})
        table = pd.DataFrame([{"subset": k, **{c: v for c, v in value.items() if isinstance(v, int)}}
                              for k, value in counts.items()])
        dataset = mlflow.data.from_pandas(table, source=shards_uri, name=f"shards-{_basename(shards_uri)}",
                                          digest=str(manifest.get("fingerprint", ""))[:36] or None)
        try:
            mlflow.log_input(dataset, context="training")
        except Exception as error:  # noqa: BLE001 - MLflow wraps the store's error in several types
            # Concurrent tune trials log the same dataset to one experiment: MLflow checks for the
            # dataset, then inserts it, so the slower trial hits the unique constraint (seen with
            # sqlite, and it failed the trial's worker group). The dataset now exists, so logging
            # again just links it to this run.
            if "UNIQUE constraint" not in str(error) and "IntegrityError" not in str(error) \
                    and "Duplicate entry" not in str(error) and "duplicate key" not in str(error):
                raise
            logger.info("dataset %s was logged concurrently by another run; linking it", dataset.name)
            mlflow.log_input(dataset, context="training")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "manifest.json"
            path.write_text(json.dumps(manifest, indent=1))
            mlflow.log_artifact(str(path), "data")


def _basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
