"""`tune` stage: Ray Tune over the finetune stage -- input resolution, attention, lr, layer decay, drop path.

Each trial runs the *same* finetune Train run as `vitpose finetune` (``pipelines.finetune.FINETUNE``
through ``pipelines.train.build_trainer``): a light function trainable builds the ``TorchTrainer`` with
``name=f"train-{trial_id}"`` and ``TuneReportCallback`` (``Tuner(TorchTrainer)`` fails in Ray 2.60, see
RAY_NOTES section 3) and with the trial's values applied to the base finetune config as overrides.

* Search space (YAML): ``{axis: {grid|choice|uniform|loguniform: ...}}``. An axis named after a
  finetune config key (``optim.lr``) sets that key; an axis whose values are mappings (``attention:
  {grid: [{model.attention: window, model.window_size: 4}, ...]}``) sets several coupled keys at once.
* ASHA early stopping on ``val_AP`` with ``time_attr="epoch"``: trials report once per epoch (their
  step checkpoints are switched off), and "epoch" keeps counting correctly when a restored trial resumes
  its Train run from a checkpoint mid-way (Tune's own iteration counter would restart at 1).
* Restore: the experiment lives at ``<out>/<name>-<config hash>``; when it exists the driver calls
  ``Tuner.restore`` instead of starting over, unfinished trials restart, and each resumes its own
  Train run from its latest checkpoint (Train v2 auto-resume on the same name + storage path).
* MLflow: one sweep run (child of the pipeline run, if any); each trial's Train run is its child
  (``tracking.parent_run_id``) holding its config and curves. The sweep run id is kept in
  ``<out>/sweep.json`` so a restored driver logs into the same run.
* Winner: the trial with the best val AP at any epoch; its exported best model, config and curve go to
  ``<out>/winner.json`` and the sweep run; it is registered and becomes ``champion`` only if it beats
  the current champion on the same val set (``pipelines.champion``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any

from pydantic import Field, model_validator

from pipelines import storage
from pipelines.config import StrictConfig, build_config, dump_config
from pipelines.tracking import TrackingConfig, resolve_tracking

logger = logging.getLogger(__name__)

SWEEP_STATE = "sweep.json"
WINNER_RECORD = "winner.json"
TRIALS_DIR = "trials"  # Ray Train storage of the trials' Train runs: <out>/trials/train-<trial_id>


class SearchAxis(StrictConfig):
    """One axis of the search space; exactly one field is set."""

    grid: list[Any] | None = Field(None, description="every value, crossed with the other grid axes")
    choice: list[Any] | None = Field(None, description="one value drawn uniformly per sample")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchAxis:
        kinds = [name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a search axis takes exactly one of grid/choice/uniform/loguniform, got {kinds or 'none'}")
        return self

    def to_tune(self) -> Any:
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)

    def examples(self) -> list[Any]:
        """Values that together exercise every key this axis can set (for validation)."""
        return list(self.grid or self.choice or []) or [(self.uniform or self.loguniform)[0]]


class AshaSection(StrictConfig):
    max_t: int | None = Field(None, ge=1, description="epochs a trial may run; None: the finetune schedule's epochs")
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class RegistrySection(StrictConfig):
    enabled: bool = True
    model_name: str = "vitpose"
    alias: str = "champion"


def _default_finetune() -> dict[str, Any]:
    # the embedded CPU default: short trials of the tiny preset (clusters give their own finetune section)
    return {"model": {"variant": "vitpose-tiny"}, "data": {"batch_size": 16, "shuffle_buffer": 256},
            "optim": {"lr": 1e-3}, "schedule": {"epochs": 4, "warmup_steps": 10, "kind": "cosine"},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.25}, "eval": {"batch_size": 32, "num_visualized": 4}}


def _default_search_space() -> dict[str, SearchAxis]:
    return {
        "model.input_size": SearchAxis(grid=[[96, 128], [144, 192]]),  # (W, H): 128x96 and 192x144 crops
        "attention": SearchAxis(grid=[{"model.attention": "full"},
                                      {"model.attention": "shifted_window", "model.window_size": 4}]),
        "optim.lr": SearchAxis(loguniform=(5e-4, 2e-3)),
    }


class TuneConfig(StrictConfig):
    out: str = Field(..., description="output directory (local or s3://): Tune experiment, trials, winner.json")
    shards: str = Field(..., description="shard stage output, given to every trial as data.shards")
    name: str = Field("tune", description="experiment name; the config hash is appended, so reruns restore")
    finetune: dict[str, Any] = Field(default_factory=_default_finetune,
                                     description="base pipelines.finetune.FinetuneConfig (without data.shards)")
    search_space: dict[str, SearchAxis] = Field(default_factory=_default_search_space)
    num_samples: int = Field(1, ge=1, description="samples of the random axes per grid point")
    metric: str = "val_AP"
    asha: AshaSection = AshaSection()
    max_concurrent_trials: int = Field(2, ge=1, description="set from the limiting resource (GPUs, CPUs)")
    trial_driver_cpus: float = Field(0.05, gt=0, description="the trial actor only builds and waits on a Train run")
    max_trial_failures: int = Field(1, ge=0)
    pretrain_checkpoint: str | None = Field(None, description="MAE encoder for every trial (model.pretrained)")
    registry: RegistrySection = RegistrySection()
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _trial_configs_are_valid(self) -> TuneConfig:
        # every value of every axis must make a valid FinetuneConfig: a typo fails here, not in trial 3
        for axis_name, axis in self.search_space.items():
            for value in axis.examples():
                trial_finetune_config(self, {axis_name: value}, f"search_space {axis_name}={json.dumps(value)}")
        return self

    @property
    def experiment_name(self) -> str:
        data = dump_config(self)
        for key in ("out", "tracking", "registry", "max_concurrent_trials"):  # don't change what is searched
            data.pop(key, None)
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"


def trial_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Trial params (``{axis: value}``) -> ``{finetune key: value}``; mapping values are coupled keys."""
    overrides: dict[str, Any] = {}
    for axis, value in params.items():
        overrides.update(value if isinstance(value, dict) else {axis: value})
    return overrides


def trial_finetune_config(config: TuneConfig, params: dict[str, Any], trial_id: str,
                          tracking: dict[str, Any] | None = None):
    """The finetune config of one trial: the base, the sweep's storage/tracking, then the trial's values."""
    from pipelines.finetune import FinetuneConfig

    data = copy.deepcopy(config.finetune)
    data.setdefault("data", {})["shards"] = config.shards
    if config.pretrain_checkpoint:
        data.setdefault("model", {})["pretrained"] = config.pretrain_checkpoint
    # one report per epoch: every report carries val_AP (Tune's strict metric check) and is one ASHA step
    data["checkpoint"] = {**data.get("checkpoint", {}), "storage_path": storage.join(config.out, TRIALS_DIR),
                          "every_n_steps": 10**9}
    if tracking is not None:
        data["tracking"] = {**data.get("tracking", {}), "enabled": tracking.get("enabled", False),
                            "tracking_uri": tracking.get("tracking_uri"), "experiment": config.tracking.experiment,
                            "parent_run_id": tracking.get("sweep_run_id"), "run_name": f"trial-{trial_id}"}
    overrides = [f"{key}={json.dumps(value)}" for key, value in trial_overrides(params).items()]
    return build_config(FinetuneConfig, data, overrides, source=f"tune trial {trial_id}")


def run_trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Function trainable: one finetune Train run whose per-epoch reports reach Tune (and ASHA)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.finetune import FINETUNE
    from pipelines.train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    finetune_config = trial_finetune_config(sweep["config"], params, trial_id, sweep["tracking"])
    build_trainer(FINETUNE, finetune_config, name=f"train-{trial_id}", callbacks=[TuneReportCallback()]).fit()


def check_trial_schedules(config: TuneConfig) -> None:
    """Each axis value's warm-up against its trial's step total (which needs the shards' row count), before
    any trial starts: in a trial the error would only fail that trial, after Ray Tune had scheduled it."""
    from pipelines.train import check_schedule, train_rows

    rows = train_rows(config.shards)
    params = [{}] + [{name: value} for name, axis in config.search_space.items() for value in axis.examples()]
    for values in params:
        where = ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items()) or "the base finetune config"
        check_schedule(f"tune trial ({where})", trial_finetune_config(config, values, "check"), rows)


def run_tune(config: TuneConfig, force: bool = False) -> dict[str, Any]:
    """Run, or restore and finish, the sweep; pick, record and register the winner. Returns the stage record."""
    import mlflow
    import ray
    from ray import tune

    out = storage.normalize(config.out)
    experiment = config.experiment_name
    winner_uri = storage.join(out, WINNER_RECORD)
    if not force and storage.exists(winner_uri):
        record = json.loads(storage.read_text(winner_uri))
        if record.get("experiment") == experiment:
            logger.info("tune %s already finished; winner %s (use force to rerun)", experiment, record["trial_id"])
            return record
    check_trial_schedules(config)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)

    tracking = resolve_tracking(config.tracking, out)
    sweep_run_id = _open_sweep_run(config, out, experiment, tracking)
    sweep = {"config": config, "tracking": {**tracking, "sweep_run_id": sweep_run_id}}
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"cpu": config.trial_driver_cpus})
    experiment_path = storage.join(out, experiment)
    try:
        if tune.Tuner.can_restore(experiment_path) and not force:
            logger.info("restoring tune experiment %s", experiment_path)
            tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space={k: a.to_tune() for k, a in config.search_space.items()},
                               tune_config=_tune_config(config), run_config=_run_config(config, out, experiment))
        results = tuner.fit()
        trials, winner = summarize_trials(results, config, out)
        record = _record_winner(config, experiment, trials, winner, sweep_run_id, tracking)
        mlflow.end_run()
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    storage.write_text(winner_uri, json.dumps(record, indent=1))
    return record


def _tune_config(config: TuneConfig):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    max_t = config.asha.max_t or trial_finetune_config(config, {}, "asha").schedule.epochs
    scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=config.asha.grace_period,
                              reduction_factor=config.asha.reduction_factor)
    return tune.TuneConfig(metric=config.metric, mode="max", scheduler=scheduler, num_samples=config.num_samples,
                           max_concurrent_trials=config.max_concurrent_trials, trial_dirname_creator=trial_dirname)


def trial_dirname(trial: Any) -> str:
    return f"trial-{trial.trial_id}"  # Tune's default name spells out every param and hits path limits


def _run_config(config: TuneConfig, out: str, experiment: str):
    from ray import tune

    return tune.RunConfig(name=experiment, storage_path=out,
                          failure_config=tune.FailureConfig(max_failures=config.max_trial_failures))


def _open_sweep_run(config: TuneConfig, out: str, experiment: str, tracking: dict[str, Any]) -> str | None:
    """Start the sweep's MLflow run, or re-open the one a killed driver left (id kept in sweep.json)."""
    if not tracking.get("enabled"):
        return None
    import mlflow

    state_uri = storage.join(out, SWEEP_STATE)
    state = json.loads(storage.read_text(state_uri)) if storage.exists(state_uri) else {}
    run_id = state.get("sweep_run_id") if state.get("experiment") == experiment else None
    mlflow.set_tracking_uri(tracking["tracking_uri"])
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else tracking["experiment_id"],
                           run_name=None if run_id else experiment, parent_run_id=tracking.get("parent_run_id"))
    if run_id is None:
        mlflow.log_params({"experiment": experiment, "metric": config.metric, "num_samples": config.num_samples,
                           "asha": json.dumps(dump_config(config.asha))})
        mlflow.log_dict(dump_config(config), "tune_config.json")
        storage.write_text(state_uri, json.dumps({"experiment": experiment, "sweep_run_id": run.info.run_id}))
    else:
        from mlflow.tracking import MlflowClient

        from pipelines.tracking import adopt_reopened_run

        # a restored sweep under `vitpose run`: the killed attempt's supersede closed it; it now belongs here
        adopt_reopened_run(MlflowClient(tracking["tracking_uri"]), run_id, tracking.get("parent_run_id"))
        logger.info("re-opened sweep MLflow run %s", run_id)
    return run.info.run_id


def summarize_trials(results: Any, config: TuneConfig, out: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per trial (params, best and last val AP, epochs run, early stop) and the best row."""
    max_t = config.asha.max_t or trial_finetune_config(config, {}, "asha").schedule.epochs
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        if frame is None or config.metric not in frame or frame[config.metric].isna().all():
            rows.append({"trial_id": trial_id, "error": str(result.error) if result.error else "no metric"})
            continue
        best = frame.loc[frame[config.metric].idxmax()]
        epochs = int(frame["epoch"].max())
        rows.append({
            "trial_id": trial_id, "params": trial_overrides(result.config), f"best_{config.metric}": float(best[config.metric]),
            "best_epoch": int(best["epoch"]), f"last_{config.metric}": float(frame[config.metric].iloc[-1]),
            "epochs": epochs, "stopped_early": result.error is None and epochs < max_t,
            "error": str(result.error) if result.error else None,
            "checkpoint": storage.join(out, TRIALS_DIR, f"train-{trial_id}", "finetune_export"),
            "curve": [float(v) for v in frame[config.metric].tolist()],
        })
    scored = [row for row in rows if f"best_{config.metric}" in row]
    if not scored:
        raise RuntimeError(f"no tune trial reported {config.metric}: {rows}")
    return rows, max(scored, key=lambda row: row[f"best_{config.metric}"])


def _end_stopped_trial_runs(trials: list[dict[str, Any]], sweep_run_id: str) -> None:
    """End the MLflow runs of trials ASHA stopped: Tune kills the trial's Train run mid-flight, so its
    rank-0 tracker never ends the run and it would stay RUNNING. They end FINISHED (the scheduler
    meant it) with the tag ``vitpose.stopped_early``; the trial table says at which epoch."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    sweep = client.get_run(sweep_run_id)
    stopped = {f"trial-{t['trial_id']}": t for t in trials if t.get("stopped_early")}
    if not stopped:
        return
    children = client.search_runs([sweep.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{sweep_run_id}'")
    for run in children:
        trial = stopped.get(run.info.run_name)
        if trial is not None and run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "vitpose.stopped_early", f"after epoch {trial['epochs']}")
            client.set_terminated(run.info.run_id, status="FINISHED")


def _record_winner(config: TuneConfig, experiment: str, trials: list[dict[str, Any]], winner: dict[str, Any],
                   sweep_run_id: str | None, tracking: dict[str, Any]) -> dict[str, Any]:
    """winner.json content; logs the trial table and the winner to the sweep run; registers the winner."""
    import mlflow

    metric = config.metric
    record = {"experiment": experiment, "trial_id": winner["trial_id"], "params": winner["params"],
              "checkpoint": winner["checkpoint"], "metrics": {"ap": winner[f"best_{metric}"], metric: winner[f"best_{metric}"]},
              # the winner's params are already flattened overrides: one mapping-valued axis applies them all
              "finetune_config": dump_config(trial_finetune_config(config, {"winner": winner["params"]},
                                                                   winner["trial_id"])),
              "trials": trials, "sweep_run_id": sweep_run_id}
    if sweep_run_id is not None:
        mlflow.log_dict({"trials": trials}, "trials.json")
        mlflow.log_dict(record, "winner.json")
        mlflow.log_metrics({f"winner_{metric}": winner[f"best_{metric}"],
                            "trials_stopped_early": sum(bool(t.get("stopped_early")) for t in trials)})
        mlflow.set_tags({"winner_trial_id": winner["trial_id"]})
        _end_stopped_trial_runs(trials, sweep_run_id)
    if config.registry.enabled and sweep_run_id is not None:
        from pipelines.champion import register_and_maybe_promote, val_ap_scorer

        local = _local_checkpoint(winner["checkpoint"])
        record["registry"] = register_and_maybe_promote(
            local, val_ap_scorer(trial_finetune_config(config, {}, "score")), model_name=config.registry.model_name,
            alias=config.registry.alias, tracking_uri=tracking["tracking_uri"], run_id=sweep_run_id,
            tags={"stage": "tune", "trial_id": winner["trial_id"], "experiment": experiment})
        record["version"] = record["registry"]["candidate_version"]
    return record


def _local_checkpoint(uri: str):
    """A local copy of a checkpoint directory (downloaded to a temporary directory when it is on s3://)."""
    import tempfile
    from pathlib import Path

    from pipelines.train import download_dir

    if not storage.is_s3(uri):
        return Path(uri)
    return download_dir(uri, Path(tempfile.mkdtemp(prefix="vitpose-winner-")))
