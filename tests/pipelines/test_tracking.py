"""MLflow runs a killed attempt leaves RUNNING are closed or re-opened by the attempt that takes over.

Real sqlite MLflow stores, no mocks. The dead attempt is a real process that starts its runs with the
same code (``Tracker.start``, ``MlflowClient.create_run`` with the pipeline's tags) and then SIGKILLs
itself, so no ``finally`` and no atexit hook runs, exactly as a killed driver or Train worker leaves
them. The takeover is exercised at the tracking-helper level (``Tracker.start`` as rank 0 calls it,
``supersede_pipeline_attempts`` as ``run_pipeline`` calls it); a full SIGKILLed ``vitpose run`` is the
slow test in tests/pipelines/test_pipeline.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from paths import REPO_ROOT

from pipelines.tracking import (
    PREVIOUS_PARENT,
    SUPERSEDED_BY,
    TRAIN_OUTPUT,
    Tracker,
    TrackingConfig,
    resolve_tracking,
    supersede_pipeline_attempts,
)

REPO = REPO_ROOT


def _die_after(code: str, **values) -> dict:
    """Run ``code`` in a fresh interpreter, which prints a JSON dict and SIGKILLs itself; returns the dict."""
    script = "import json, os, signal, sys\nvalues = json.loads(sys.argv[1])\n" + textwrap.dedent(code) + (
        "\nprint(json.dumps(out), flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(values)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = resolve_tracking(TrackingConfig(tracking_uri=uri, experiment="vitpose"), str(tmp_path / "runs"))
    return settings, MlflowClient(uri)


DEAD_TRAIN_ATTEMPT = """
from pipelines.tracking import Tracker
tracker = Tracker(values["settings"], active=True)
run_id = tracker.start(None, run_name="finetune-abc", output=values["output"])
tracker.log_metrics({"train_loss": 1.0}, step=1)
out = {"run_id": run_id}
"""


def test_a_train_run_a_dead_attempt_started_before_its_first_checkpoint_is_killed_by_the_next(store, tmp_path):
    settings, client = store
    output, other_output = str(tmp_path / "runs" / "finetune-abc"), str(tmp_path / "runs" / "finetune-def")
    dead = _die_after(DEAD_TRAIN_ATTEMPT, settings=settings, output=output)["run_id"]
    unrelated = _die_after(DEAD_TRAIN_ATTEMPT, settings=settings, output=other_output)["run_id"]
    assert client.get_run(dead).info.status == "RUNNING"  # what a SIGKILL leaves

    # the restarted attempt found no checkpoint, so no run id: it starts a new run of the same output
    tracker = Tracker(settings, active=True)
    new = tracker.start(None, run_name="finetune-abc", output=output)
    assert new != dead
    killed = client.get_run(dead)
    assert killed.info.status == "KILLED" and killed.data.tags[SUPERSEDED_BY] == new
    assert killed.data.metrics["train_loss"] == 1.0  # kept, only closed
    assert client.get_run(new).data.tags[TRAIN_OUTPUT] == output
    assert client.get_run(unrelated).info.status == "RUNNING"  # another Train run's: not this one's to close
    tracker.end()
    assert client.get_run(new).info.status == "FINISHED"


DEAD_CHECKPOINTED_ATTEMPT = """
from pipelines.tracking import Tracker
tracker = Tracker(values["settings"], active=True)
out = {"run_id": tracker.start(values["run_id"], output=values["output"])}
"""


def test_a_run_re_opened_from_its_checkpoint_finishes_as_the_same_run(store, tmp_path):
    settings, client = store
    output = str(tmp_path / "runs" / "finetune-abc")
    first = _die_after(DEAD_TRAIN_ATTEMPT, settings=settings, output=output)["run_id"]
    # the second attempt re-opened it from a checkpoint and was killed too
    assert _die_after(DEAD_CHECKPOINTED_ATTEMPT, settings=settings, output=output, run_id=first)["run_id"] == first
    tracker = Tracker(settings, active=True)
    assert tracker.start(first, output=output) == first
    tracker.end()
    runs = client.search_runs([settings["experiment_id"]])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(first, "FINISHED")]
    assert SUPERSEDED_BY not in runs[0].data.tags


DEAD_PIPELINE_ATTEMPT = """
from mlflow.tracking import MlflowClient
from pipelines.tracking import Tracker
client = MlflowClient(values["settings"]["tracking_uri"])
experiment = values["settings"]["experiment_id"]
# the runs `run_pipeline` / `_run_stage` create, with their tags
parent = client.create_run(experiment, run_name="pipeline-local", tags={
    "vitpose.pipeline": "local", "vitpose.workdir": values["workdir"]}).info.run_id
client.log_param(parent, "workdir", values["workdir"])
shard = client.create_run(experiment, run_name="shard", tags={
    "mlflow.parentRunId": parent, "vitpose.stage": "shard", "vitpose.state": "running"}).info.run_id
client.set_tag(shard, "vitpose.state", "done")
client.set_terminated(shard, "FINISHED")
stage = client.create_run(experiment, run_name="finetune", tags={
    "mlflow.parentRunId": parent, "vitpose.stage": "finetune", "vitpose.state": "running"}).info.run_id
# the stage's Train run, under its stage run, as rank 0 starts it
tracker = Tracker({**values["settings"], "parent_run_id": stage}, active=True)
train = tracker.start(None, run_name="finetune-abc", output=values["output"])
out = {"parent": parent, "shard": shard, "stage": stage, "train": train}
"""


def test_a_new_pipeline_attempt_kills_the_dead_attempts_runs_and_adopts_the_run_it_resumes(store, tmp_path):
    settings, client = store
    workdir, output = str(tmp_path / "work"), str(tmp_path / "work" / "finetune" / "train" / "finetune-abc")
    dead = _die_after(DEAD_PIPELINE_ATTEMPT, settings=settings, workdir=workdir, output=output)
    elsewhere = _die_after(DEAD_PIPELINE_ATTEMPT, settings=settings, workdir=str(tmp_path / "other"),
                           output=str(tmp_path / "other" / "finetune-abc"))
    assert {client.get_run(dead[k]).info.status for k in ("parent", "stage", "train")} == {"RUNNING"}

    # the new attempt's pipeline run, then the supersede run_pipeline does right after creating it
    experiment = settings["experiment_id"]
    parent = client.create_run(experiment, run_name="pipeline-local",
                               tags={"vitpose.pipeline": "local", "vitpose.workdir": workdir}).info.run_id
    killed = supersede_pipeline_attempts(client, experiment, "local", workdir, parent)
    assert set(killed) == {dead["parent"], dead["stage"], dead["train"]}
    for key in ("parent", "stage", "train"):
        run = client.get_run(dead[key])
        assert run.info.status == "KILLED" and run.data.tags[SUPERSEDED_BY] == parent, key
    assert client.get_run(dead["stage"]).data.tags["vitpose.state"] == "killed"
    assert client.get_run(dead["shard"]).info.status == "FINISHED" and SUPERSEDED_BY not in client.get_run(
        dead["shard"]).data.tags
    # another workdir's pipeline is not this attempt's to close
    assert {client.get_run(elsewhere[k]).info.status for k in ("parent", "stage", "train")} == {"RUNNING"}
    assert supersede_pipeline_attempts(client, experiment, "local", workdir, parent) == []  # idempotent

    # the new finetune stage resumes the Train run from its checkpoint: RUNNING again, under the new stage run
    stage = client.create_run(experiment, run_name="finetune", tags={
        "mlflow.parentRunId": parent, "vitpose.stage": "finetune", "vitpose.state": "running"}).info.run_id
    tracker = Tracker({**settings, "parent_run_id": stage}, active=True)
    assert tracker.start(dead["train"], output=output) == dead["train"]
    resumed = client.get_run(dead["train"])
    assert resumed.info.status == "RUNNING" and SUPERSEDED_BY not in resumed.data.tags
    assert resumed.data.tags["mlflow.parentRunId"] == stage and resumed.data.tags[PREVIOUS_PARENT] == dead["stage"]
    tracker.end()
    assert client.get_run(dead["train"]).info.status == "FINISHED"


CONCURRENT_TRIAL = """
import time
from pathlib import Path
from pipelines.tracking import Tracker
tracker = Tracker(values["settings"], active=True)
tracker.start(None, run_name=f"trial-{values['index']}")
Path(values["ready"]).touch()
while not Path(values["go"]).exists():  # start logging together: the race needs overlapping inserts
    time.sleep(0.001)
tracker.log_shards_input(values["shards"], {"fingerprint": "f" * 64, "counts": {"coco/train": {"rows_out": 7}}})
tracker.end(failed=False)
"""


def test_concurrent_trials_logging_the_same_dataset_all_succeed(store, tmp_path):
    """Tune trials start together and log the same shards to one experiment; none may fail on MLflow's
    dataset unique constraint (a real race: it failed a trial's worker group in a 4-trial sweep)."""
    settings, client = store
    go = tmp_path / "go"
    procs = []
    for index in range(6):
        values = {"settings": settings, "index": index, "ready": str(tmp_path / f"ready{index}"), "go": str(go),
                  "shards": str(tmp_path / "shards")}
        script = "import json, sys\nvalues = json.loads(sys.argv[1])\n" + textwrap.dedent(CONCURRENT_TRIAL)
        procs.append(subprocess.Popen([sys.executable, "-c", script, json.dumps(values)], cwd=REPO,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(e[-1500:] for e in errors if e)
    runs = client.search_runs([client.get_experiment_by_name("vitpose").experiment_id])
    assert len(runs) == len(procs)
    assert all(len(run.inputs.dataset_inputs) == 1 for run in runs)
