"""MLflow for the training stages: one run per Train run, written from rank 0 only, resumable.

Pattern (RAY_NOTES.md section 6, as Ray's own e2e examples do it, without ``setup_mlflow``):

* the driver resolves an **absolute** tracking URI (default: ``sqlite:///<output>/mlflow.db``, so
  Train workers that ``chdir`` into their run directory still find it) and creates the experiment
  once with an explicit ``artifact_location``;
* rank 0 starts (or, after a restart, re-opens) the run: the run id is stored in every checkpoint,
  so a worker-group restart or a rerun on the same output continues the same MLflow run instead of
  leaving a RUNNING orphan behind; ``end_run`` always runs in ``finally``;
* other ranks get a tracker whose methods do nothing, so the training loop has no rank checks.

A ``tracking_uri`` of ``http://host:5000`` switches to a tracking server (needed on multi-node
clusters: a sqlite file on one node is invisible to the others).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines import storage
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


def resolve_tracking(config: TrackingConfig, output_uri: str) -> dict[str, Any]:
    """Absolute tracking URI, experiment id and parent run for the workers; creates the experiment once.

    Call on the driver: creating the experiment here, not in a worker, avoids both the concurrent
    create race between Tune trials and the relative-path trap under Ray's ``chdir``.
    """
    if not config.enabled:
        return {"enabled": False}
    import mlflow

    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_location = config.artifact_location
    if uri is None:
        if storage.is_s3(output_uri):
            raise ValueError("tracking.tracking_uri is required when the output is on s3:// (a local sqlite file is "
                             "not shared between nodes); set it to an MLflow server URL")
        local = Path(storage.normalize(output_uri)).resolve()
        local.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{local / 'mlflow.db'}"
        artifact_location = artifact_location or (local / "mlartifacts").as_uri()
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise ValueError(f"tracking_uri {uri!r} is relative; use sqlite:////absolute/path.db (Train workers chdir)")
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is None:
        try:
            experiment_id = mlflow.create_experiment(config.experiment, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:  # created concurrently by another stage or trial
            experiment_id = mlflow.get_experiment_by_name(config.experiment).experiment_id
    else:
        experiment_id = experiment.experiment_id
    return {"enabled": True, "tracking_uri": uri, "experiment_id": experiment_id,
            "parent_run_id": config.parent_run_id, "run_name": config.run_name,
            "log_every_n_steps": config.log_every_n_steps}


def forwarded_env() -> dict[str, str]:
    """Tracking and S3 variables of the driver, for ``RunConfig(worker_runtime_env={"env_vars": ...})``."""
    return {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}


class Tracker:
    """MLflow logging for one Train run; a no-op unless ``active`` (rank 0 with tracking enabled)."""

    def __init__(self, settings: dict[str, Any], active: bool) -> None:
        self.settings = settings
        self.active = active and settings.get("enabled", False)
        self.run_id: str | None = None
        self.log_every_n_steps = int(settings.get("log_every_n_steps", 10))

    def start(self, run_id: str | None = None, run_name: str | None = None) -> str | None:
        """Start a new run, or re-open ``run_id`` (from a checkpoint) so a resumed job logs into it."""
        if not self.active:
            return None
        import mlflow

        mlflow.set_tracking_uri(self.settings["tracking_uri"])
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else self.settings["experiment_id"],
                               run_name=None if run_id else (self.settings.get("run_name") or run_name),
                               parent_run_id=self.settings.get("parent_run_id"))
        self.run_id = run.info.run_id
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
