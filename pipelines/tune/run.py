"""`tune` stage: Ray Tune over the finetune stage -- input resolution, attention, lr, layer decay, drop path.

Each trial runs the *same* finetune Train run as `vitpose finetune` (``pipelines.finetune.run.FINETUNE``
through ``pipelines.training.trainer.build_trainer``): a light function trainable builds the ``TorchTrainer`` with
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
  ``<out>/winner.json`` and the sweep run. The stage registers nothing: the winner is a candidate of the
  register stage (``vitpose register``), the one place that decides the champion.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipelines import storage
from pipelines.config import dump_config
from pipelines.contract import StageOutput
from pipelines.session import connect_ray, mlflow_client, prints_to_log, use_tracking_uri
from pipelines.tracking import resolve_tracking
from pipelines.tune.config import TRIALS_DIR, TuneConfig, trial_finetune_config, trial_overrides

logger = logging.getLogger(__name__)

SWEEP_STATE = "sweep.json"
WINNER_RECORD = "winner.json"


def run_trial(params: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Function trainable: one finetune Train run whose per-epoch reports reach Tune (and ASHA)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.finetune.run import FINETUNE
    from pipelines.training.trainer import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    finetune_config = trial_finetune_config(sweep["config"], params, trial_id, sweep["tracking"])
    build_trainer(FINETUNE, finetune_config, name=f"train-{trial_id}", callbacks=[TuneReportCallback()],
                  queued=True).fit()


def check_trial_schedules(config: TuneConfig) -> None:
    """Each axis value's warm-up against its trial's step total (which needs the shards' row count), before
    any trial starts: in a trial the error would only fail that trial, after Ray Tune had scheduled it."""
    from pipelines.training.recipe import check_schedule, train_rows

    rows = train_rows(config.shards)
    params = [{}] + [{name: value} for name, axis in config.search_space.items() for value in axis.examples()]
    for values in params:
        where = ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items()) or "the base finetune config"
        check_schedule(f"tune trial ({where})", trial_finetune_config(config, values, "check"), rows)


def run_tune(config: TuneConfig, force: bool = False) -> StageOutput:
    """Run, or restore and finish, the sweep; pick and record the winner (``<out>/winner.json``)."""
    import mlflow
    from ray import tune

    out = storage.normalize(config.out)
    experiment = config.experiment_name
    winner_uri = storage.join(out, WINNER_RECORD)
    if not force and storage.exists(winner_uri):
        record = json.loads(storage.read_text(winner_uri))
        if record.get("experiment") == experiment:
            logger.info("tune %s already finished; winner %s (use force to rerun)", experiment, record["trial_id"])
            return tune_output(record)
    check_trial_schedules(config)
    connect_ray()

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
        with prints_to_log():  # Tune prints its experiment table whatever the verbosity
            results = tuner.fit()
        trials, winner = summarize_trials(results, config, out)
        record = _record_winner(config, experiment, trials, winner, sweep_run_id, tracking.get("tracking_uri"))
        mlflow.end_run()
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    storage.write_text(winner_uri, json.dumps(record, indent=1))
    return tune_output(record)


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

    # verbose=0: no trial-status tables between the pipeline's stage lines (the trial table is winner.json's
    # and the sweep run's; Tune's own log lines still reach the log file)
    return tune.RunConfig(name=experiment, storage_path=out, verbose=0,
                          failure_config=tune.FailureConfig(max_failures=config.max_trial_failures))


def _open_sweep_run(config: TuneConfig, out: str, experiment: str, tracking: dict[str, Any]) -> str | None:
    """Start the sweep's MLflow run, or re-open the one a killed driver left (id kept in sweep.json)."""
    if not tracking.get("enabled"):
        return None
    import mlflow

    state_uri = storage.join(out, SWEEP_STATE)
    state = json.loads(storage.read_text(state_uri)) if storage.exists(state_uri) else {}
    run_id = state.get("sweep_run_id") if state.get("experiment") == experiment else None
    use_tracking_uri(tracking["tracking_uri"])
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else tracking["experiment_id"],
                           run_name=None if run_id else experiment, parent_run_id=tracking.get("parent_run_id"))
    if run_id is None:
        mlflow.log_params({"experiment": experiment, "metric": config.metric, "num_samples": config.num_samples,
                           "asha": json.dumps(dump_config(config.asha))})
        mlflow.log_dict(dump_config(config), "tune_config.json")
        storage.write_text(state_uri, json.dumps({"experiment": experiment, "sweep_run_id": run.info.run_id}))
    else:
        from pipelines.tracking import adopt_reopened_run

        # a restored sweep under `vitpose run`: the killed attempt's supersede closed it; it now belongs here
        adopt_reopened_run(mlflow_client(tracking["tracking_uri"]), run_id, tracking.get("parent_run_id"))
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


def _end_stopped_trial_runs(trials: list[dict[str, Any]], sweep_run_id: str, tracking_uri: str) -> None:
    """End the MLflow runs of trials ASHA stopped: Tune kills the trial's Train run mid-flight, so its
    rank-0 tracker never ends the run and it would stay RUNNING. They end FINISHED (the scheduler
    meant it) with the tag ``vitpose.stopped_early``; the trial table says at which epoch."""
    client = mlflow_client(tracking_uri)
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
                   sweep_run_id: str | None, tracking_uri: str | None) -> dict[str, Any]:
    """winner.json content; logs the trial table and the winner to the sweep run."""
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
        _end_stopped_trial_runs(trials, sweep_run_id, tracking_uri)
    return record


def tune_output(record: dict[str, Any]) -> StageOutput:
    """The stage record of a finished sweep: the winner's checkpoint and AP (a candidate for `register`)."""
    metrics = {key: float(value) for key, value in record["metrics"].items()}
    stopped = sum(bool(t.get("stopped_early")) for t in record["trials"])
    return StageOutput(outputs={"checkpoint": record["checkpoint"], "trial_id": record["trial_id"],
                                "params": record["params"], "sweep_run_id": record.get("sweep_run_id")},
                       metrics={**metrics, "trials": float(len(record["trials"])), "stopped_early": float(stopped)},
                       summary=f"AP {metrics['ap']:.3f} (trial {record['trial_id']} of {len(record['trials'])}, "
                               f"{stopped} stopped early)")
