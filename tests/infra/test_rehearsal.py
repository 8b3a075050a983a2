"""Cluster rehearsal: every shipped cluster config, submitted as a platform team submits it, on a multi-node Ray
cluster whose only shared storage is S3 (tests/support/rehearsal_fixtures.py: PostgreSQL, moto S3, `mlflow server`,
Ray head + 2 worker nodes carrying the stand-in `gpu_node` resource).

    ray job submit --working-dir . -- vitpose run --config <cluster config> --overlay infra/rehearsal/overlay.yaml \
        --set workdir=s3://<bucket>/<name> --set serve.port=<free port>

- each config: every stage ok in the job's log and (cacheable stages) as a record on S3; every URI a record
  names is s3:// (or models:/, http://), so no node could have read a local path another node wrote; every
  Ray Train worker of the session ran on a worker node, the job driver on the head; the champion, served on
  the cluster, answers a request from here;
- node loss: finetune with 2 Train workers spread over both worker nodes, one node's raylet SIGKILLed after
  the first S3 checkpoint: the job finishes on the remaining node, resumed from that checkpoint
  (`resumed_from_steps` in the finetune record), in one MLflow run;
- driver loss: the job stopped mid-tune; the same command submitted again skips the finished stage and
  restores the sweep (same sweep run, the trials' Train runs continue).

Wall times go to stdout (`-s`) and docs/cluster.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import boto3
import pytest
import requests
from mlflow.tracking import MlflowClient

from infra.rehearsal.cluster import BIN
from infra.rehearsal.overlay import CLUSTER_CONFIGS, REPO, config_name, run_command
from pipelines.config import load_yaml

pytest_plugins = ["rehearsal_fixtures"]
# In CI: each shipped config through the overlay, the served champion, the cross-node feed and node loss (~20-30
# min with the cluster's start). Slow (`pytest -m slow tests/infra/test_rehearsal.py`): driver loss, below.

STAGES = ("shard", "pretrain", "finetune", "tune", "distill", "register", "serve")
CACHEABLE = STAGES[:-1]  # serve writes no record: it runs every time
ALLOWED_URI = ("s3://", "models:/", "http://127.0.0.1")
TIMINGS: dict[str, float] = {}


def _s3(rehearsal):
    return boto3.client("s3", endpoint_url=rehearsal.s3_endpoint, region_name="us-east-1",
                        aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal")


def _record(rehearsal, name: str, stage: str) -> dict | None:
    try:
        body = _s3(rehearsal).get_object(Bucket=rehearsal.bucket, Key=f"{name}/{stage}/stage.json")["Body"].read()
    except _s3(rehearsal).exceptions.NoSuchKey:
        return None
    return json.loads(body)


def _keys(rehearsal, prefix: str) -> list[str]:
    pages = _s3(rehearsal).get_paginator("list_objects_v2").paginate(Bucket=rehearsal.bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list | tuple):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def _auth(rehearsal) -> dict[str, str]:
    token = rehearsal.env.get("RAY_AUTH_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _job_details(rehearsal, submission_id: str) -> dict:
    response = requests.get(f"{rehearsal.dashboard_url}/api/jobs/{submission_id}", headers=_auth(rehearsal), timeout=60)
    response.raise_for_status()
    return response.json()


def _ray_cli(rehearsal, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=rehearsal.client_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _train_worker_nodes(rehearsal, state: str | None = None) -> list[str]:
    """Node ids of the session's Ray Train workers (dead ones too, unless `state`), from the state API."""
    response = requests.get(f"{rehearsal.dashboard_url}/api/v0/actors", headers=_auth(rehearsal), timeout=120,
                            params={"limit": 10000, "detail": "true", "filter_keys": "class_name",
                                    "filter_predicates": "=", "filter_values": "RayTrainWorker"})
    response.raise_for_status()
    actors = response.json()["data"]["result"]["result"]
    return [actor["node_id"] for actor in actors if state is None or actor["state"] == state]


def _job_state(rehearsal, kind: str, job_id: str) -> list[dict]:
    """The state API's `kind` ("tasks", "actors") of one Ray job, in detail."""
    response = requests.get(f"{rehearsal.dashboard_url}/api/v0/{kind}", headers=_auth(rehearsal), timeout=120,
                            params={"limit": 10000, "detail": "true", "filter_keys": "job_id",
                                    "filter_predicates": "=", "filter_values": job_id})
    response.raise_for_status()
    return response.json()["data"]["result"]["result"]


def _wait_job(rehearsal, submission_id: str, timeout_s: float) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = _job_details(rehearsal, submission_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(5)
    raise AssertionError(f"job {submission_id} did not end in {timeout_s:.0f} s")


def _job_logs(rehearsal, submission_id: str) -> str:
    done = _ray_cli(rehearsal, "job", "logs", "--address", rehearsal.dashboard_url, submission_id)
    return done.stdout + done.stderr


def _submit_no_wait(rehearsal, entrypoint: list[str], submission_id: str) -> None:
    done = rehearsal.submit_job(entrypoint, working_dir=REPO, submission_id=submission_id, extra_args=["--no-wait"],
                                timeout_s=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


@pytest.fixture(scope="module")
def rehearsed(rehearsal):
    """`rehearsed(config)`: the config through the overlay, submitted with `ray job submit` once per module;
    returns (submission id, completed `ray job submit`)."""
    port = int(rehearsal.env["VITPOSE_REHEARSAL_SERVE_PORT"])
    results: dict[str, tuple[str, subprocess.CompletedProcess]] = {}

    def submit(config: str) -> tuple[str, subprocess.CompletedProcess]:
        if config not in results:
            name = config_name(config)
            submission_id = f"rehearsal-{name}-{uuid.uuid4().hex[:6]}"
            started = time.perf_counter()
            done = rehearsal.submit_job(run_command(config, rehearsal.bucket, port), working_dir=REPO,
                                        submission_id=submission_id, timeout_s=3600)
            TIMINGS[name] = round(time.perf_counter() - started, 1)
            print(f"rehearsal of {config}: {TIMINGS[name]:.0f} s (exit {done.returncode})")
            results[config] = (submission_id, done)
        return results[config]

    return submit


@pytest.mark.parametrize("config", CLUSTER_CONFIGS)
def test_cluster_config_runs_every_stage_through_s3(rehearsal, rehearsed, config):
    name = config_name(config)
    submission_id, done = rehearsed(config)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in output, output[-4000:]
    for index, stage in enumerate(STAGES, 1):
        assert re.search(rf"\[{index}/7\] {stage}\s+done in", output), (stage, output[-4000:])
    # quiet job log: stage lines, not Ray Data's per-operator bars redrawn line by line
    assert "Running Dataset" not in output and "ListFiles:" not in output

    for stage in CACHEABLE:
        record = _record(rehearsal, name, stage)
        assert record is not None and record["stage"] == stage, f"no record of {stage} at s3://{rehearsal.bucket}/{name}"
        uris = [s for s in _strings([record["outputs"], record["input_uris"]]) if "/" in s]
        assert uris or stage == "tune", (stage, record["outputs"])
        local = [uri for uri in uris if not uri.startswith(ALLOWED_URI)]
        assert not local, f"{stage} names paths no other node can read: {local}"
    for stage in ("pretrain", "finetune", "tune", "distill"):
        assert _record(rehearsal, name, stage)["outputs"]["checkpoint"].startswith(f"s3://{rehearsal.bucket}/{name}/")

    # placement: the driver on the head, every Train worker (every stage, every trial) on a gpu_node worker node
    details = _job_details(rehearsal, submission_id)
    assert details["driver_node_id"] == rehearsal.node_id("head"), details
    workers = {rehearsal.node_id(node) for node in rehearsal.node_names() if node != "head"}
    train_nodes = _train_worker_nodes(rehearsal)
    assert train_nodes and set(train_nodes) <= workers, (train_nodes, workers)
    assert rehearsal.node_id("head") not in train_nodes

    # the champion went through the tracking server on PostgreSQL, and its replicas on the cluster answer
    register = _record(rehearsal, name, "register")["outputs"]
    version = MlflowClient(rehearsal.mlflow_uri).get_model_version_by_alias(register["model_name"], register["alias"])
    assert version.version == register["version"]
    assert re.search(r"\[7/7\] serve\s+done in .* answered", output)


def test_served_champion_answers_from_outside_the_job(rehearsal, rehearsed):
    import cv2

    assert rehearsed(CLUSTER_CONFIGS[-1])[1].returncode == 0  # the last config's serve stage left its app up

    from vitpose_core.synthetic import SyntheticConfig, render_image

    url = f"http://127.0.0.1:{rehearsal.env['VITPOSE_REHEARSAL_SERVE_PORT']}"
    image, _ = render_image(3, SyntheticConfig(seed=7))
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    response = requests.post(f"{url}/v1/pose", data=jpeg.tobytes(), headers={"content-type": "image/jpeg"}, timeout=120)
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["persons"] and len(body["persons"][0]["keypoints"]) == 17, body
    assert body["model"] and body["version"]  # the registered champion, loaded through MLflow


def test_a_train_worker_on_one_node_is_fed_by_transform_tasks_on_another(rehearsal):
    """ViTPose-B's config feeds its GPUs by Ray Data transform tasks (data.preprocess.where: ray_data). Pinned
    here to the head (Ray's own `node:__internal_head__` resource), they feed a Train worker on a gpu_node worker
    node: decode, augment and targets run on one node, the steps on another, the rows streamed between them."""
    name = f"feed-{uuid.uuid4().hex[:6]}"
    command = run_command(CLUSTER_CONFIGS[0], rehearsal.bucket, int(rehearsal.env["VITPOSE_REHEARSAL_SERVE_PORT"]),
                          name=name, stages="shard,finetune",
                          overrides=['finetune.data.preprocess.resources={"node:__internal_head__": 0.01}'])
    started = time.perf_counter()
    done = rehearsal.submit_job(command, working_dir=REPO, submission_id=f"rehearsal-{name}", timeout_s=1500)
    TIMINGS["cross_node_feed"] = round(time.perf_counter() - started, 1)
    print(f"cross-node feed rehearsal: {TIMINGS['cross_node_feed']:.0f} s")
    output = done.stdout + done.stderr
    assert done.returncode == 0 and re.search(r"finetune\s+done in", output), output[-4000:]
    assert _record(rehearsal, name, "finetune")["metrics"]["steps"] == 4  # the overlay's max_steps: all trained

    job_id = _job_details(rehearsal, f"rehearsal-{name}")["job_id"]
    head = rehearsal.node_id("head")
    transform_nodes = {task["node_id"] for task in _job_state(rehearsal, "tasks", job_id)
                       if "MapBatches(prepare)" in task["name"] and task["state"] == "FINISHED"}
    train_nodes = {actor["node_id"] for actor in _job_state(rehearsal, "actors", job_id)
                   if actor["class_name"] == "RayTrainWorker"}
    assert transform_nodes == {head}, transform_nodes
    assert train_nodes and head not in train_nodes, train_nodes


def test_node_loss_resumes_from_the_s3_checkpoint_in_one_mlflow_run(rehearsal):
    name = f"nodeloss-{uuid.uuid4().hex[:6]}"
    # Half a CPU per Train worker: after the loss both workers must fit on the one worker node left (2 CPUs,
    # gpu_node 1.0), which may also hold the Serve replica (0.5 CPU) an earlier test left up; at 1 CPU each
    # they did not, and the job waited for capacity until the test's timeout (full suite, 2026-12-01).
    overrides = ["finetune.scaling.num_workers=2", "finetune.scaling.placement_strategy=SPREAD",
                 "finetune.scaling.cpus_per_worker=0.5",
                 "finetune.schedule.epochs=4", "finetune.schedule.max_steps=8", "finetune.checkpoint.every_n_steps=2"]
    command = run_command(CLUSTER_CONFIGS[0], rehearsal.bucket, int(rehearsal.env["VITPOSE_REHEARSAL_SERVE_PORT"]),
                          name=name, overrides=overrides, stages="shard,finetune")
    submission_id = f"rehearsal-{name}"
    started = time.perf_counter()
    _submit_no_wait(rehearsal, command, submission_id)
    try:
        deadline = time.time() + 1500
        # the first checkpoint of the finetune Train run that Train has registered, with both workers up.
        # Registered, not only uploaded: rank 0 uploads before every rank has reported, and a node lost in
        # between leaves Train no checkpoint to resume (the restart begins at step 0 in a new MLflow run; that
        # happened once in a full suite, 2026-12-01). Train writes checkpoint_manager_snapshot.json when it
        # registers one.
        while time.time() < deadline:
            keys = _keys(rehearsal, f"{name}/finetune/train/")
            registered = any(k.endswith("/checkpoint_manager_snapshot.json") for k in keys)
            if registered and len(_train_worker_nodes(rehearsal, "ALIVE")) == 2:
                break
            assert _job_details(rehearsal, submission_id)["status"] in ("PENDING", "RUNNING"), \
                _job_logs(rehearsal, submission_id)[-4000:]
            time.sleep(2)
        else:
            pytest.fail("no finetune checkpoint on S3 with 2 live Train workers")
        alive = _train_worker_nodes(rehearsal, "ALIVE")
        by_id = {rehearsal.node_id(node): node for node in rehearsal.node_names()}
        hosts = sorted({by_id[node_id] for node_id in alive})
        print(f"node loss: 2 Train workers on {hosts} (placement_strategy SPREAD)")
        assert "head" not in hosts
        lost = hosts[-1]  # a node running a Train worker
        killed_at = time.perf_counter() - started
        rehearsal.kill_raylet(lost)
        status = _wait_job(rehearsal, submission_id, 1800)
        logs = _job_logs(rehearsal, submission_id)
        TIMINGS["node_loss"] = round(time.perf_counter() - started, 1)
        print(f"node-loss rehearsal: {TIMINGS['node_loss']:.0f} s (raylet killed at {killed_at:.0f} s)")
        assert status == "SUCCEEDED", logs[-4000:]
    finally:
        for node in ("worker1", "worker2"):  # leave the session's cluster whole
            if rehearsal.raylet_pid(node) is None:
                rehearsal.restart_node(node)

    record = _record(rehearsal, name, "finetune")
    resumed = record["outputs"]["resumed_from_steps"]
    assert resumed and all(step >= 2 for step in resumed), record["outputs"]  # from a checkpoint, not step 0
    assert max(resumed) < 8  # resumed mid-run, then trained to the end
    client = MlflowClient(rehearsal.mlflow_uri)
    run_name = Path(record["outputs"]["run"]).name
    experiment = client.get_experiment_by_name(load_yaml(REPO / CLUSTER_CONFIGS[0])["mlflow"]["experiment"])
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    assert [run.info.run_id for run in runs] == [record["outputs"]["mlflow_run_id"]]  # one run, not two
    assert runs[0].info.status == "FINISHED"


@pytest.mark.slow  # 2026-11-30: failed once (a new sweep run after the resubmission), then passed; diagnosis pending
def test_driver_loss_resubmitted_job_skips_done_stages_and_restores_tune(rehearsal):
    name = f"driverloss-{uuid.uuid4().hex[:6]}"
    command = run_command(CLUSTER_CONFIGS[0], rehearsal.bucket, int(rehearsal.env["VITPOSE_REHEARSAL_SERVE_PORT"]),
                          name=name, overrides=["tune.finetune.schedule.epochs=2", "tune.asha.max_t=2"],
                          stages="shard,tune")
    started = time.perf_counter()
    _submit_no_wait(rehearsal, command, f"rehearsal-{name}-1")
    deadline = time.time() + 1500
    while time.time() < deadline:  # mid-tune: the sweep run exists and a trial has written to its Train run
        keys = _keys(rehearsal, f"{name}/tune/out/")
        if any(k.endswith("sweep.json") for k in keys) and any("/trials/" in k for k in keys):
            break
        assert _job_details(rehearsal, f"rehearsal-{name}-1")["status"] in ("PENDING", "RUNNING"), \
            _job_logs(rehearsal, f"rehearsal-{name}-1")[-4000:]
        time.sleep(2)
    else:
        pytest.fail("tune never started")
    trials_before = {re.sub(r"_\d+$", "", k.split("/trials/train-")[1].split("/")[0])
                     for k in _keys(rehearsal, f"{name}/tune/out/trials/train-")}
    sweep = json.loads(_s3(rehearsal).get_object(Bucket=rehearsal.bucket, Key=f"{name}/tune/out/sweep.json")["Body"].read())
    stop = _ray_cli(rehearsal, "job", "stop", "--address", rehearsal.dashboard_url, f"rehearsal-{name}-1")
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert _wait_job(rehearsal, f"rehearsal-{name}-1", 300) == "STOPPED"
    assert _record(rehearsal, name, "tune") is None  # interrupted: no record
    stopped_at = time.perf_counter() - started

    done = rehearsal.submit_job(command, working_dir=REPO, submission_id=f"rehearsal-{name}-2", timeout_s=1800)
    TIMINGS["driver_loss"] = round(time.perf_counter() - started, 1)
    print(f"driver-loss rehearsal: {TIMINGS['driver_loss']:.0f} s (stopped at {stopped_at:.0f} s)")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert re.search(r"shard\s+skipped", output), output[-3000:]
    assert re.search(r"tune\s+done in", output), output[-3000:]
    record = _record(rehearsal, name, "tune")
    after = json.loads(_s3(rehearsal).get_object(Bucket=rehearsal.bucket, Key=f"{name}/tune/out/sweep.json")["Body"].read())
    assert record["outputs"]["sweep_run_id"] == sweep["sweep_run_id"], (  # the same sweep run
        sweep, after, record["outputs"], sorted({k.split("/")[3] for k in _keys(rehearsal, f"{name}/tune/out/")}),
        _job_logs(rehearsal, f"rehearsal-{name}-2")[-3000:])
    # Tuner.restore kept the killed attempt's trials (a fresh Tuner would name new ones)
    assert re.sub(r"_\d+$", "", record["outputs"]["trial_id"]) in trials_before, (record["outputs"], trials_before)
