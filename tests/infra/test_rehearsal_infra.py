"""The rehearsal cluster works for real: a `ray job submit --working-dir` job places work on both worker
nodes through the stand-in node-type resource, writes to the moto bucket from those nodes, and logs an
MLflow run and artifact through the tracking server; the test reads everything back through the
servers (the run from PostgreSQL, the artifact from S3). Teardown leaves no process behind, also when
`up` is interrupted with Ctrl-C while starting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import psycopg
import pytest
from mlflow.tracking import MlflowClient
from paths import REPO_ROOT

from infra.rehearsal.cluster import RehearsalState, marked_processes

pytest_plugins = ["rehearsal_fixtures"]

REPO = REPO_ROOT
RESULT_MARK = "PROBE_RESULT "

# The job a platform engineer would submit: it imports a helper module from its working dir, calls
# ray.init() (which must not cost it its cwd), places one actor per `gpu_node` (each worker node has one),
# writes to S3 from each, and logs an MLflow run whose artifact comes from a worker node.
PROBE_JOB = '''
import json, os, sys
import boto3, mlflow, ray
from mlflow.tracking import MlflowClient
import probe_helpers

ray.init()
cwd = os.getcwd()  # raises FileNotFoundError if ray.init() removed the job's working dir

@ray.remote(num_cpus=0, resources={"gpu_node": 1})
class OnWorkerNode:
    def where(self):
        return ray.get_runtime_context().get_node_id()

    def write_s3(self, bucket, key):
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=probe_helpers.payload(key))  # endpoint from env
        return key

    def log_artifact(self, run_id, node_id):
        MlflowClient().log_text(run_id, probe_helpers.payload(node_id).decode(), f"probe/from_{node_id[:8]}.txt")

bucket = sys.argv[1]
actors = [OnWorkerNode.remote() for _ in range(2)]
nodes = ray.get([a.where.remote() for a in actors])
keys = ray.get([a.write_s3.remote(bucket, f"probe/{node}.txt") for a, node in zip(actors, nodes)])
mlflow.set_experiment("rehearsal-probe")
with mlflow.start_run(run_name="probe") as run:
    mlflow.log_params({"node_a": nodes[0][:8], "node_b": nodes[1][:8]})
    mlflow.log_metric("nodes", len(set(nodes)))
    ray.get(actors[1].log_artifact.remote(run.info.run_id, nodes[1]))
print("PROBE_RESULT " + json.dumps({"driver_node": ray.get_runtime_context().get_node_id(), "nodes": nodes,
      "keys": keys, "run_id": run.info.run_id, "cwd_is_dir": os.path.isdir(cwd),
      "tracking_uri": mlflow.get_tracking_uri()}))
'''

PROBE_HELPERS = '''
def payload(name: str) -> bytes:
    return f"written for {name}".encode()
'''


def _probe_result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith(RESULT_MARK)]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len(RESULT_MARK):])


@pytest.fixture(scope="module")
def probe(rehearsal, tmp_path_factory):
    project = tmp_path_factory.mktemp("probe_project")
    (project / "probe_job.py").write_text(textwrap.dedent(PROBE_JOB))
    (project / "probe_helpers.py").write_text(textwrap.dedent(PROBE_HELPERS))
    started = time.perf_counter()
    done = rehearsal.submit_job(["python", "probe_job.py", rehearsal.bucket], working_dir=project, timeout_s=300)
    output = done.stdout + done.stderr
    print(f"probe job: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0 and "succeeded" in output, output[-3000:]
    return _probe_result(output)


def test_job_places_work_on_both_worker_nodes_by_the_stand_in_resource(rehearsal, probe):
    workers = {rehearsal.node_id(name) for name in rehearsal.node_names() if name != "head"}
    assert len(workers) == 2 and None not in workers
    assert len(set(probe["nodes"])) == 2, probe  # two actors holding gpu_node=1 each: two nodes
    assert set(probe["nodes"]) == workers, (probe["nodes"], workers)
    assert probe["driver_node"] == rehearsal.node_id("head") not in probe["nodes"]
    assert probe["cwd_is_dir"]  # the job's working dir survived its driver's ray.init()
    # every node's raylet is a distinct live process a node-loss test can SIGKILL
    pids = [node.raylet_pid for node in rehearsal.nodes()]
    assert len(set(pids)) == 3 and all(pid and Path(f"/proc/{pid}").exists() for pid in pids)


def test_worker_nodes_wrote_to_the_bucket(rehearsal, probe):
    s3 = boto3.client("s3", endpoint_url=rehearsal.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal")
    for node, key in zip(probe["nodes"], probe["keys"], strict=True):
        body = s3.get_object(Bucket=rehearsal.bucket, Key=key)["Body"].read()
        assert body == f"written for probe/{node}.txt".encode()


def test_mlflow_run_is_in_postgresql_and_its_artifact_in_s3(rehearsal, probe, tmp_path):
    assert probe["tracking_uri"] == rehearsal.mlflow_uri  # the job found the server through its node's env
    client = MlflowClient(rehearsal.mlflow_uri)
    run = client.get_run(probe["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["nodes"] == 2.0
    assert {run.data.params["node_a"], run.data.params["node_b"]} == {n[:8] for n in probe["nodes"]}
    artifact = f"probe/from_{probe['nodes'][1][:8]}.txt"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "probe")] == [artifact]
    downloaded = Path(client.download_artifacts(run.info.run_id, artifact, dst_path=str(tmp_path)))
    assert downloaded.read_text() == f"written for {probe['nodes'][1]}"

    # the backend store really is PostgreSQL: the run row is there, with its status
    with psycopg.connect(rehearsal.postgres_uri) as connection:
        row = connection.execute("SELECT status, artifact_uri FROM runs WHERE run_uuid = %s",
                                 (run.info.run_id,)).fetchone()
    assert row is not None and row[0] == "FINISHED"
    # and the artifact store really is the bucket: the server proxies mlflow-artifacts:/ to s3://<bucket>/mlartifacts
    assert row[1].startswith("mlflow-artifacts:/"), row[1]
    s3 = boto3.client("s3", endpoint_url=rehearsal.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=rehearsal.bucket, Prefix="mlartifacts/")["Contents"]]
    assert [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/{artifact}")], keys


def test_ctrl_c_while_starting_leaves_no_process(tmp_path):
    root = Path("/tmp") / f"vpr-int{os.getpid()}"  # short: Ray's socket paths live below it
    # SIGINT back to its default in the child: a shell starting pytest in the background (`cmd &` without job
    # control) leaves SIGINT ignored, every child inherits that, and Python then never raises KeyboardInterrupt
    up = subprocess.Popen([sys.executable, "-m", "infra.rehearsal.cluster", "up", "--root", str(root)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    try:
        deadline = time.time() + 120
        state_file = root / "rehearsal.json"
        # interrupt once the Ray head is starting, i.e. with PostgreSQL, S3 and Ray processes running
        while time.time() < deadline:
            if state_file.is_file():
                state = RehearsalState.model_validate_json(state_file.read_text())
                if "ray.head" in state.services and marked_processes(str(root), "head"):
                    break
            assert up.poll() is None, up.communicate()[0][-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the rehearsal never got to starting its Ray head")
        assert marked_processes(str(root))
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=120)
        assert up.returncode != 0, output[-2000:]
        assert "KeyboardInterrupt" in output, output[-2000:]
        assert marked_processes(str(root)) == []
    finally:
        if up.poll() is None:
            up.kill()
        # also removes the root (its data and logs)
        subprocess.run([sys.executable, "-m", "infra.rehearsal.cluster", "down", "--root", str(root)], cwd=REPO,
                       capture_output=True)


def test_node_loss_helpers_kill_a_raylet_and_bring_the_node_back(rehearsal, probe):
    # runs after the probe job (it uses `probe`), and leaves the session's cluster whole again
    old_id = rehearsal.node_id("worker2")
    killed = rehearsal.kill_raylet("worker2")
    deadline = time.time() + 180
    while time.time() < deadline and old_id in {n["node_id"] for n in rehearsal.alive_nodes()}:
        time.sleep(1)
    alive = {n["node_id"] for n in rehearsal.alive_nodes()}
    assert old_id not in alive and len(alive) == 2, "the GCS never marked the killed node dead"
    assert rehearsal.raylet_pid("worker2") is None and killed not in marked_processes(rehearsal.state.root)

    rehearsal.restart_node("worker2")
    new_id = rehearsal.node_id("worker2")
    alive = {n["node_id"] for n in rehearsal.alive_nodes()}
    assert new_id and new_id != old_id and new_id in alive and len(alive) == 3
