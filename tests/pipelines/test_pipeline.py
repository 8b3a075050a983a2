"""`vitpose run` orchestration on a real local Ray and a real MLflow SQLite store (no mocks).

Fast tests: the shard stage end to end (synthetic data -> Parquet shards -> stage record -> MLflow
parent/child runs) with the skip-on-rerun rule, and a tiny shard -> finetune -> register run whose
rerun skips every stage; every shipped pipeline config is loaded strictly; the default pipeline through
the CLI at tiny sizes, every stage ok and a quiet console. Slow test (`-m slow`): the
`vitpose run` command itself with every stage, SIGKILLed during finetune, rerun to a served champion
that resumed finetune from its checkpoint, then rerun again to skip everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from paths import REPO_ROOT

from pipelines.config import ConfigError
from pipelines.contract import read_record
from pipelines.pipeline import STAGES, load_pipeline_config, run_pipeline, select_stages
from pipelines.progress import Reporter

CONFIGS_DIR = REPO_ROOT / "pipelines" / "configs"
PIPELINE_CONFIGS = [CONFIGS_DIR / name for name in ("local.yaml", "cocoaic_vitpose_b_8gpu.yaml", "vitpose_h_fsdp.yaml")]
TINY = ["shard.synthetic.train_images=8", "shard.synthetic.val_images=3", "shard.synthetic.max_people=2"]
# every training stage at a few steps of batch 8 on ~16 train images (1 CPU for the Train worker)
TINY_TRAINING = [
    "shard.synthetic.train_images=16",
    "pretrain.data.batch_size=8", "pretrain.schedule.max_steps=2", "pretrain.schedule.warmup_steps=1",
    "finetune.data.batch_size=8", "finetune.schedule.max_steps=4", "finetune.schedule.warmup_steps=1",
    "finetune.checkpoint.every_n_steps=2", "finetune.eval.num_visualized=0",
    "tune.finetune.data.batch_size=8", "tune.finetune.schedule.epochs=1", "tune.finetune.schedule.warmup_steps=1",
    "tune.asha.grace_period=1",
    "distill.data.batch_size=8", "distill.schedule.max_steps=2", "distill.schedule.warmup_steps=1",
    "distill.distill.token_max_steps=1", "distill.eval.num_visualized=0",
]


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_shipped_pipeline_configs_load_strictly(path: Path) -> None:
    config = load_pipeline_config(path)
    assert config.workdir


def test_unknown_keys_are_errors_that_name_them() -> None:
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_pipeline_config(None, ["shard.bogus=1"])
    with pytest.raises(ConfigError, match="unknown key 'workdirr'"):
        load_pipeline_config(None, ["workdirr=x"])


def test_stage_selection() -> None:
    names = [spec.name for spec in STAGES]
    assert select_stages(names, start="register") == ["register", "serve"]
    assert select_stages(names, stages=["serve", "shard"]) == ["shard", "serve"]
    with pytest.raises(ValueError, match="unknown stage 'fine'"):
        select_stages(names, stages=["fine"])


def test_shard_stage_runs_records_and_is_skipped_on_rerun(ray_local, tmp_path: Path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    config = load_pipeline_config(None, [*TINY, f"workdir={tmp_path / 'runs'}"])
    results = run_pipeline(config, stages=["shard"], reporter=Reporter())
    shard = next(r for r in results if r.name == "shard")
    assert shard.state == "done"
    record = read_record(str(tmp_path / "runs" / "shard"))
    assert record["outputs"]["shards"] == str(tmp_path / "runs" / "shard" / "out")
    assert record["metrics"]["rows_out"] > 0 and record["code_version"]
    out = capsys.readouterr().out
    assert "[1/7] shard     done in" in out and "stage     state" in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vitpose").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and [c.info.run_name for c in children] == ["shard"]
    assert children[0].data.metrics["rows_out"] == record["metrics"]["rows_out"]
    assert all(r.info.status == "FINISHED" for r in runs)

    # runs as a SIGKILLed attempt on this workdir leaves them (tests/pipelines/test_tracking.py kills a real process)
    experiment_id = parents[0].info.experiment_id
    dead_parent = client.create_run(experiment_id, run_name="pipeline-local", tags={
        "vitpose.pipeline": "local", "vitpose.workdir": str(tmp_path / "runs")}).info.run_id
    dead_stage = client.create_run(experiment_id, run_name="shard", tags={
        "mlflow.parentRunId": dead_parent, "vitpose.stage": "shard", "vitpose.state": "running"}).info.run_id

    started = time.perf_counter()
    rerun = run_pipeline(config, stages=["shard"], reporter=Reporter())
    assert next(r for r in rerun if r.name == "shard").state == "skipped"
    assert time.perf_counter() - started < 60
    assert read_record(str(tmp_path / "runs" / "shard"))["mlflow_run_id"] == record["mlflow_run_id"]
    runs = client.search_runs([experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]  # the skipped stage's run too
    new_parent = max((r for r in runs if r.info.run_name == "pipeline-local"), key=lambda r: r.info.start_time)
    for run_id in (dead_parent, dead_stage):
        dead = client.get_run(run_id)
        assert dead.info.status == "KILLED" and dead.data.tags["vitpose.superseded_by"] == new_parent.info.run_id

    # a changed config is not "the same config": the stage runs again
    changed = load_pipeline_config(None, [*TINY, "shard.rows_per_file=4", f"workdir={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match="--force"):  # the shard stage refuses to overwrite silently ...
        run_pipeline(changed, stages=["shard"], reporter=Reporter())
    forced = run_pipeline(changed, stages=["shard"], force=True, reporter=Reporter())  # ... unless forced
    assert next(r for r in forced if r.name == "shard").state == "done"


def test_a_stage_without_its_inputs_says_which_to_run_first(ray_local, tmp_path: Path) -> None:
    config = load_pipeline_config(None, [*TINY, f"workdir={tmp_path / 'runs'}"])
    with pytest.raises(RuntimeError, match="needs the output of 'register'"):
        run_pipeline(config, stages=["serve"], reporter=Reporter())


def test_tiny_shard_finetune_register_run_then_rerun_skips_everything(ray_local, tmp_path: Path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    config = load_pipeline_config(None, [*TINY, *TINY_TRAINING, f"workdir={tmp_path / 'runs'}"])
    stages = ["shard", "finetune", "register"]
    results = {r.name: r for r in run_pipeline(config, stages=stages, reporter=Reporter())}
    assert [results[name].state for name in stages] == ["done"] * 3
    finetune = read_record(str(tmp_path / "runs" / "finetune"))
    assert finetune["metrics"]["steps"] == 4 and (Path(finetune["outputs"]["checkpoint"]) / "config.json").is_file()
    register = read_record(str(tmp_path / "runs" / "register"))
    assert register["outputs"]["winner"] == "finetune" and register["outputs"]["promoted"] is True
    assert register["outputs"]["model_uri"] == "models:/vitpose@champion"
    assert 0.0 <= register["metrics"]["ap"] <= 1.0
    # pictures a person can open: the champion's poses on val images and the candidates' learning curves
    pictures = register["outputs"]["pictures"]
    assert set(pictures) == {"champion_predictions", "learning_curves"}
    for png in pictures.values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tracking_uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    assert str(client.get_model_version_by_alias("vitpose", "champion").version) == register["outputs"]["version"]
    runs = client.search_runs([client.get_experiment_by_name("vitpose").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline-local")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(stages)
    # the finetune Train run nests under the finetune stage's child run, tagged with its output (its identity
    # when a later attempt closes runs a killed one left RUNNING)
    logged = {a.path for a in client.list_artifacts(children["register"].info.run_id, "pictures")}
    assert {"pictures/champion_predictions.png", "pictures/learning_curves.png"} <= logged
    train_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == children["finetune"].info.run_id]
    assert len(train_runs) == 1 and train_runs[0].info.status == "FINISHED"
    assert train_runs[0].data.tags["vitpose.train_output"].endswith("/" + Path(finetune["outputs"]["run"]).name)
    out = capsys.readouterr().out
    assert "[3/7] finetune  done in" in out and "[6/7] register  done in" in out

    started = time.perf_counter()
    rerun = {r.name: r for r in run_pipeline(config, stages=stages, reporter=Reporter())}
    assert [rerun[name].state for name in stages] == ["skipped"] * 3
    assert time.perf_counter() - started < 60


def _tiny_run_command(workdir: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "pipelines.cli", "run", "--no-keep-serving", "--set", f"workdir={workdir}"]
    for override in [*TINY, *TINY_TRAINING, *extra]:
        command += ["--set", override]
    return command


# what Ray, Tune and MLflow print or log when nothing routes it to the log file
LIBRARY_CHATTER = (" INFO ", " WARNING ", "Configuration for experiment", "View detailed results here",
                   "Creating initial MLflow database tables", "streaming_executor", "Successfully registered model",
                   "Created version", "Downloading artifacts", "Started Serve", "(raylet)")


def test_vitpose_run_default_pipeline_every_stage_ok_with_a_quiet_console(tmp_path: Path) -> None:
    """The embedded default (`vitpose run`, local.yaml) at tiny sizes through the CLI: every stage ok, the
    champion served, and the console shows the stage lines, bars and table only; the chatter of Ray, Tune
    and MLflow is in the log file the header names."""
    workdir = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(_tiny_run_command(workdir), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    default_stages = ("shard", "pretrain", "finetune", "tune", "distill", "register", "serve")
    for index, name in enumerate(default_stages, start=1):
        assert f"[{index}/{len(default_stages)}] {name:<9} done in" in done.stdout, (name, done.stdout[-3000:])
    assert "champion     models:/vitpose@champion" in done.stdout and "endpoint     http://127.0.0.1:" in done.stdout
    noisy = [line for line in console.splitlines() if any(marker in line for marker in LIBRARY_CHATTER)
             or line.startswith(("INFO ", "WARNING "))]  # Serve's records start with the level
    assert not noisy, noisy[:10]
    logs = list((workdir / "logs").glob("run-*.log"))
    assert len(logs) == 1 and str(logs[0]) in done.stdout
    logged = logs[0].read_text()
    assert "Creating initial MLflow database tables" in logged and "Configuration for experiment" in logged
    assert "Successfully registered model" in logged and "Started Serve" in logged


@pytest.mark.slow
def test_vitpose_run_killed_during_finetune_resumes_then_serves_and_skips(tmp_path: Path) -> None:
    """The CLI end to end: SIGKILL mid-finetune, rerun resumes from the checkpoint and serves, rerun skips."""
    workdir = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    long_finetune = ["finetune.schedule.max_steps=12"]  # long enough to be caught between checkpoints
    first = subprocess.Popen(_tiny_run_command(workdir, *long_finetune), cwd=tmp_path, env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = workdir / "finetune" / "train"
    deadline = time.time() + 420
    while not list(checkpoints.glob("finetune-*/checkpoint_*")):
        assert first.poll() is None, "vitpose run ended before finetune wrote a checkpoint"
        assert time.time() < deadline, "finetune wrote no checkpoint in time"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert read_record(str(workdir / "finetune")) is None  # killed: no record, so the rerun runs it again

    second = subprocess.run(_tiny_run_command(workdir, *long_finetune), cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    finetune = read_record(str(workdir / "finetune"))
    assert finetune["outputs"]["resumed_from_steps"] and finetune["metrics"]["steps"] == 12
    assert "resumed at step" in second.stdout
    assert "/v1/pose answered" in second.stdout and "champion     models:/vitpose@champion" in second.stdout
    assert "mlflow ui" in second.stdout and "endpoint     http://127.0.0.1:" in second.stdout

    started = time.perf_counter()
    third = subprocess.run(_tiny_run_command(workdir, *long_finetune), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert third.returncode == 0, (third.stdout + third.stderr)[-4000:]
    assert third.stdout.count("skipped (same config and inputs)") == 6  # serve always starts the endpoint
    assert time.perf_counter() - started < 90


def _session_processes(temp_root: Path) -> list[str]:
    """Command lines of live processes that belong to a Ray cluster whose temp dir is under `temp_root`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and str(temp_root) in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def test_sigterm_stops_the_private_cluster_and_the_rerun_resumes(tmp_path: Path) -> None:
    """SIGTERM mid-run: exit 130, no Ray process of that run left behind, finished stages kept; the same
    command then finishes (the shard stage is skipped, the interrupted one runs again)."""
    workdir = tmp_path / "runs"
    ray_tmp = Path(tempfile.mkdtemp(prefix="vpr-sigterm-", dir="/tmp"))  # Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    command = [*_tiny_run_command(workdir), "--stages", "shard,pretrain"]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 300
    while read_record(str(workdir / "shard")) is None:
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, "the shard stage did not finish in time"
        time.sleep(0.5)
    assert _session_processes(ray_tmp), "the run's Ray cluster is not up"
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == 130, out[-3000:]
    assert "stopped by signal SIGTERM; run the same command again to resume" in out
    deadline = time.time() + 30
    while _session_processes(ray_tmp) and time.time() < deadline:
        time.sleep(1)
    assert not _session_processes(ray_tmp), _session_processes(ray_tmp)
    assert read_record(str(workdir / "pretrain")) is None

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "skipped (same config and inputs)" in second.stdout and read_record(str(workdir / "pretrain"))
    shutil.rmtree(ray_tmp, ignore_errors=True)
