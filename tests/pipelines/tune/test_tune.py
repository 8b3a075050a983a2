"""Tune stage: strict search-space configs (fast) and real 4-trial ASHA sweeps with MLflow (slow).

The slow tests run real Ray Tune over the real finetune Train loop on tiny synthetic shards, with a
real sqlite MLflow store: a 4-trial sweep (early stop, winner = best val AP, trials as children of the
sweep run, no registration: the register stage alone registers), and a driver killed with SIGKILL
mid-sweep, then restored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_synthetic_shards
from paths import REPO_ROOT

from pipelines.config import ConfigError, build_config, load_yaml
from pipelines.tune.config import TuneConfig, trial_finetune_config, trial_overrides

REPO = REPO_ROOT
CONFIGS = REPO / "pipelines" / "configs"


@pytest.mark.parametrize("name", ["tune_tiny.yaml", "tune_sweep.yaml"])
def test_shipped_tune_configs_load_and_every_axis_value_builds_a_finetune_config(name):
    config = build_config(TuneConfig, {**load_yaml(CONFIGS / name), "out": "/tmp/o", "shards": "/tmp/s"})
    assert {"model.input_size", "attention", "optim.lr"} <= set(config.search_space)
    attention = config.search_space["attention"].grid
    trial = trial_finetune_config(config, {"model.input_size": [144, 192], "attention": attention[-1],
                                           "optim.lr": 1e-3}, "t1")
    assert trial.model.input_size == (144, 192) and trial.model.attention == attention[-1]["model.attention"]
    assert trial.data.shards == "/tmp/s" and trial.checkpoint.storage_path.endswith("trials")
    assert config.experiment_name.startswith(config.name + "-")


def test_search_space_typos_fail_at_load_time():
    with pytest.raises(ConfigError, match="optim.lrr|lrr"):
        build_config(TuneConfig, {"out": "o", "shards": "s", "search_space": {"optim.lrr": {"grid": [1e-3]}}})
    with pytest.raises(ConfigError, match="exactly one"):
        build_config(TuneConfig, {"out": "o", "shards": "s",
                                  "search_space": {"optim.lr": {"grid": [1e-3], "loguniform": [1e-4, 1e-3]}}})
    with pytest.raises(ConfigError, match="attention"):
        build_config(TuneConfig, {"out": "o", "shards": "s",
                                  "search_space": {"attention": {"grid": [{"model.attention": "global"}]}}})


def test_mapping_values_set_coupled_keys():
    params = {"attention": {"model.attention": "window", "model.window_size": 4}, "optim.lr": 1e-3}
    assert trial_overrides(params) == {"model.attention": "window", "model.window_size": 4, "optim.lr": 1e-3}


# ------------------------------------------------------------------------------------------ slow: Ray


@pytest.fixture(scope="module")
def tune_shards(ray_local, tmp_path_factory) -> str:
    return make_synthetic_shards(tmp_path_factory.mktemp("tune_data"), 40, 8, (144, 192))


@pytest.fixture(scope="module")
def finetuned_tiny(ray_local, tmp_path_factory) -> str:
    """A vitpose-tiny fine-tuned for a few epochs on the tune shards: the sweep's starting point.

    Trials started from scratch all score val AP 0.0 after 4 short epochs, and ASHA never stops a
    trial that ties the rung's cutoff; from a model that already finds people, learning rate,
    resolution and attention type separate the trials after one epoch, as in a real sweep.
    """
    from pipelines.finetune.config import FinetuneConfig
    from pipelines.finetune.run import FINETUNE
    from pipelines.training.trainer import fit

    root = tmp_path_factory.mktemp("tune_init")
    # ~10k crops of training (the sweep's 40-image shards give ~100 crops: far too few to leave AP 0)
    init_shards = make_synthetic_shards(root / "data", 200, 8, (144, 192))
    config = build_config(FinetuneConfig, {
        "model": {"variant": "vitpose-tiny", "input_size": [96, 128]},
        "data": {"shards": init_shards, "batch_size": 32, "shuffle_buffer": 512},
        "optim": {"lr": 1e-3}, "schedule": {"epochs": 20, "warmup_steps": 20, "kind": "cosine"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}, "eval": {"batch_size": 32, "num_visualized": 0},
        "checkpoint": {"storage_path": str(root), "name": "init"},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tune-init"}})
    result = fit(FINETUNE, config).return_value
    assert result["best"] > 0.0, "the starting model learned nothing; the sweep could not separate trials"
    return str(root / "init" / "finetune_export")


def tiny_tune_config(shards: str, out: Path, tracking_uri: str, **extra) -> TuneConfig:
    data = {**load_yaml(CONFIGS / "tune_tiny.yaml"), "out": str(out), "shards": shards,
            "tracking": {"tracking_uri": tracking_uri, "experiment": "vitpose"}, **extra}
    return build_config(TuneConfig, data)


@pytest.mark.slow
def test_four_trial_sweep_stops_early_picks_the_best_and_nests_trials_in_mlflow(tune_shards, finetuned_tiny, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tune.run import run_tune

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    output = run_tune(tiny_tune_config(tune_shards, tmp_path / "tune", tracking_uri, pretrain_checkpoint=finetuned_tiny))
    record = json.loads((tmp_path / "tune" / "winner.json").read_text())
    assert output.outputs["checkpoint"] == record["checkpoint"] and output.metrics["ap"] == record["metrics"]["ap"]
    print(json.dumps([{k: t.get(k) for k in ("trial_id", "params", "curve", "epochs", "stopped_early")}
                      for t in record["trials"]], indent=1, default=str))
    trials = record["trials"]
    assert len(trials) == 4 and all(t.get("error") is None for t in trials)
    assert any(t["stopped_early"] for t in trials), "ASHA stopped no trial"
    best = max(trials, key=lambda t: t["best_val_AP"])
    assert record["trial_id"] == best["trial_id"] and record["metrics"]["val_AP"] == best["best_val_AP"]
    assert Path(record["checkpoint"], "model.safetensors").is_file()

    mlflow.set_tracking_uri(tracking_uri)
    children = mlflow.search_runs(experiment_names=["vitpose"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{record['sweep_run_id']}'")
    assert sorted(r.info.run_name for r in children) == sorted(f"trial-{t['trial_id']}" for t in trials)
    assert all("val_AP" in r.data.metrics and "optim.lr" in r.data.params for r in children)
    # the winner is a candidate for the register stage; tune itself registers nothing
    assert MlflowClient(tracking_uri).search_registered_models() == []
    # trials ASHA stopped were killed mid-run; their runs are ended, not left RUNNING
    stopped = {f"trial-{t['trial_id']}" for t in trials if t["stopped_early"]}
    assert all(r.info.status == "FINISHED" and r.data.tags.get("vitpose.stopped_early")
               for r in children if r.info.run_name in stopped)
    artifacts = {a.path for a in MlflowClient(tracking_uri).list_artifacts(record["sweep_run_id"])}
    assert {"trials.json", "winner.json"} <= artifacts


@pytest.mark.slow
def test_killed_driver_is_restored_and_continues_the_same_experiment(tune_shards, tmp_path):
    import ray

    from pipelines.tune.run import run_tune

    out = tmp_path / "tune"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["--set", f"tracking.tracking_uri={tracking_uri}"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "tune", "--config", str(CONFIGS / "tune_tiny.yaml"),
                               "--shards", tune_shards, "--out", str(out), *overrides],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill it once some trial has a Train checkpoint (an epoch done) and before the sweep ends
    deadline = time.time() + 600
    while time.time() < deadline and not list((out / "trials").glob("train-*/checkpoint_*")):
        assert driver.poll() is None, "the tune driver exited before it could be killed"
        time.sleep(2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (out / "winner.json").exists()
    sweep_before = json.loads((out / "sweep.json").read_text())
    checkpoints_before = {p.parent.name: p.name for p in (out / "trials").glob("train-*/checkpoint_*")}
    assert checkpoints_before, "the driver was killed before any trial had a checkpoint: nothing to resume"
    experiment_dirs = list(out.glob("tune-tiny-*"))
    assert len(experiment_dirs) == 1

    config = tiny_tune_config(tune_shards, out, tracking_uri)
    run_tune(config)
    record = json.loads((out / "winner.json").read_text())
    # the same experiment and sweep run, the same four trials (not four new ones)
    assert list(out.glob("tune-tiny-*")) == experiment_dirs
    assert record["sweep_run_id"] == sweep_before["sweep_run_id"]
    assert len(record["trials"]) == 4
    assert {f"train-{t['trial_id']}" for t in record["trials"]} >= set(checkpoints_before)
    # a trial interrupted after its first epoch resumed its Train run: its curve starts at epoch 1, not over
    for name in checkpoints_before:
        trial = next(t for t in record["trials"] if f"train-{t['trial_id']}" == name)
        assert len(trial["curve"]) == trial["epochs"], "epochs were reported twice: the trial started over"
