"""Ray Train stages end to end on a private local cluster: DDP over gloo, MLflow, kill -9 resume, rerun resume.

Tiny data (synthetic people sharded by the shard stage), the tiny preset at 64x48, a few dozen
steps: these tests check the plumbing (checkpoints, restarts, tracking), not accuracy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import make_synthetic_shards

from pipelines.cli import main
from pipelines.config import build_config
from pipelines.finetune.config import FinetuneConfig
from pipelines.finetune.run import FINETUNE, run_finetune
from pipelines.pretrain.config import PretrainConfig
from pipelines.pretrain.run import run_pretrain
from pipelines.training.loop import train_fn_per_worker
from pipelines.training.recipe import train_rows
from pipelines.training.trainer import fit
from vitpose_core.checkpoint import load_model


@pytest.fixture(scope="module")
def tiny_shards(ray_local, tmp_path_factory) -> str:
    return make_synthetic_shards(tmp_path_factory.mktemp("train_data"), 24, 4, (72, 96))


def finetune_config(shards: str, storage: Path, **overrides) -> FinetuneConfig:
    data = {
        "model": {"variant": "vitpose-tiny", "input_size": [48, 64]},
        "data": {"shards": shards, "batch_size": 8, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3},
        "schedule": {"epochs": 2, "warmup_steps": 2, "kind": "cosine"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.25},
        "checkpoint": {"storage_path": str(storage), "every_n_steps": 3, "max_failures": 2},
        "eval": {"batch_size": 16, "num_visualized": 4},
    }
    return build_config(FinetuneConfig, data, [f"{k}={v}" for k, v in overrides.items()])


def test_two_worker_finetune_tracks_to_mlflow_and_rerun_resumes(tiny_shards, tmp_path):
    config = finetune_config(tiny_shards, tmp_path)
    output = run_finetune(config, name="ft-ddp")
    steps_per_epoch = train_rows(tiny_shards) // 8  # full global batches of 8 crops
    assert steps_per_epoch >= 5
    assert output.metrics["steps"] == 2 * steps_per_epoch and output.outputs["resumed_from_steps"] == []
    assert 0.0 <= output.metrics["ap"] <= 1.0 and output.metrics["ap"] >= output.metrics["val_AP"]
    assert output.outputs["run"] == str(tmp_path / "ft-ddp")

    # the exported best model loads in the project's format
    assert output.outputs["checkpoint"] == str(tmp_path / "ft-ddp" / "finetune_export")
    model = load_model(output.outputs["checkpoint"])
    assert model.config.img_size == (64, 48)
    summary = {"step": int(output.metrics["steps"]), "mlflow_run_id": output.outputs["mlflow_run_id"]}

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'ft-ddp' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["vitpose"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == summary["mlflow_run_id"]
    assert {"train_loss", "lr", "images_per_s", "val_AP"} <= set(run.data.metrics)
    # MLflow's own system metrics of rank 0's node, sampled while it trained
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.inputs.dataset_inputs, "the shard manifest is logged as a dataset input"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"finetune_export", "predictions", "data"} <= artifacts
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert len(history) >= 1

    # `vitpose eval` over the same val shards reports the AP the run logged: one inference path (crop ->
    # forward with flip test -> decode -> COCO eval) for validation, register's scoring and eval
    eval_out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", output.outputs["checkpoint"], "--shards", tiny_shards,
                 "--batch-size", "16", "--output", str(eval_out)]) == 0
    logged = max(h.value for h in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_AP"))
    assert json.loads(eval_out.read_text())["metrics"]["AP"] == logged == output.metrics["ap"]

    # same config + same storage: Train v2 hands back the last checkpoint, nothing is retrained
    again = run_finetune(config, name="ft-ddp")
    assert again.metrics["steps"] == summary["step"] and again.outputs["resumed_from_steps"] == [summary["step"]]
    assert again.outputs["mlflow_run_id"] == summary["mlflow_run_id"]


def test_fsdp_two_workers_validates_exports_and_resumes_on_cpu(tiny_shards, tmp_path):
    """The sharded path (FSDP2; ViTPose-H/G on GPUs) over gloo: rank-0 validation of the gathered model, the
    export, and a resume that loads the saved full state into the sharded model and optimiser."""
    import torch

    from pipelines.training.loop import read_train_state

    overrides = {"scaling.strategy": "fsdp", "schedule.epochs": 1, "eval.num_visualized": 0}
    first = fit(FINETUNE, finetune_config(tiny_shards, tmp_path, **overrides), name="ft-fsdp")
    summary = first.return_value
    assert summary["epoch"] == 1 and summary["resumed_from"] == [] and "val_AP" in first.metrics

    # the checkpoint holds the full (unsharded) state under the plain model's parameter names
    state = read_train_state(first.checkpoint)
    exported = load_model(tmp_path / "ft-fsdp" / "finetune_export")
    assert set(state["model"]) == set(exported.state_dict())
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, state["model"][name], msg=name)
    # the sharded path ran: its gathered optimiser state is keyed by parameter name (DDP saves torch's
    # index-keyed state), and holds AdamW moments of full, unsharded shape
    optim_state = state["optimizer"]["state"]
    assert all(isinstance(name, str) for name in optim_state)
    pos_embed = optim_state["backbone.pos_embed"]["exp_avg"]
    assert pos_embed.shape == exported.backbone.pos_embed.shape and pos_embed.abs().sum() > 0
    # the AP rank 0 validated on its unsharded copy is what `vitpose eval` gets from the export
    eval_out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "ft-fsdp" / "finetune_export"), "--shards", tiny_shards,
                 "--batch-size", "16", "--output", str(eval_out)]) == 0
    assert json.loads(eval_out.read_text())["metrics"]["AP"] == first.metrics["val_AP"]

    # a longer schedule on the same run: resumes at the saved step and trains the second epoch
    second = fit(FINETUNE, finetune_config(tiny_shards, tmp_path, **{**overrides, "schedule.epochs": 2}),
                 name="ft-fsdp").return_value
    assert second["resumed_from"] == [summary["step"]] and second["epoch"] == 2
    assert second["step"] > summary["step"]


def _pid_recording_train_fn(pid_dir: str):
    def train_fn(loop_config):
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        Path(pid_dir, f"rank{rank}-{os.getpid()}").touch()
        return train_fn_per_worker(loop_config)

    return train_fn


def test_worker_killed_with_sigkill_is_replaced_and_training_resumes(tiny_shards, tmp_path):
    """kill -9 of a Train worker mid-run: the group restarts from the last checkpoint and finishes."""
    config = finetune_config(tiny_shards, tmp_path, **{"schedule.epochs": 4, "tracking.enabled": "false",
                                                        "eval.num_visualized": 0})
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = fit(FINETUNE, config, name="ft-kill", train_fn=_pid_recording_train_fn(str(pid_dir)))
        except Exception as error:  # surfaced by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=train)
    thread.start()
    run_dir = tmp_path / "ft-kill"
    deadline = time.time() + 240
    # kill only once Train has *registered* a checkpoint: it records it in the manager snapshot, which
    # is what a restarted worker group reads (a checkpoint directory alone appears earlier)
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()):
        time.sleep(0.5)
    victims = [p for p in pid_dir.iterdir() if p.name.startswith("rank1-")]
    assert victims, "no checkpoint or no rank-1 worker before the deadline"
    os.kill(int(victims[0].name.split("-")[1]), signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive(), "training did not finish after the kill"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["result"].return_value
    assert summary["epoch"] == 4
    assert len(summary["resumed_from"]) == 1 and 0 < summary["resumed_from"][0] < summary["step"]
    assert len(list(pid_dir.iterdir())) == 4  # two workers, then two replacements


@pytest.mark.slow  # ~40 s alone, 220 s on the shared loaded box; the MAE loop itself is covered in test_mae.py
def test_pretrain_runs_one_worker_and_exports_an_encoder_finetune_can_load(tiny_shards, tmp_path):
    config = build_config(PretrainConfig, {
        "model": {"variant": "vitpose-tiny", "input_size": [48, 64]},
        "data": {"shards": tiny_shards, "batch_size": 8, "shuffle_buffer": 64},
        "schedule": {"epochs": 1, "warmup_steps": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "checkpoint": {"storage_path": str(tmp_path), "name": "mae"},
        "tracking": {"enabled": False},
    })
    output = run_pretrain(config)
    assert output.metrics["steps"] == train_rows(tiny_shards) // 8
    assert output.outputs["checkpoint"] == str(tmp_path / "mae" / "pretrain_export")
    encoder = tmp_path / "mae" / "pretrain_export"
    assert (encoder / "encoder.safetensors").exists()
    from pipelines.finetune.run import build_finetune_model
    model = build_finetune_model(finetune_config(tiny_shards, tmp_path, **{"model.pretrained": str(encoder),
                                                                            "model.input_size": "[96, 128]"}))
    assert model.backbone.pos_embed.shape[1] == 8 * 6 + 1  # resized from the 4x3 pretraining grid


def test_finetune_fed_by_ray_data_transform_tasks(tiny_shards, tmp_path):
    """data.preprocess.where: ray_data: the Train workers consume rows Ray Data tasks decoded, augmented and
    encoded (uint8 images, normalised in the worker); a whole epoch trains, validates and exports."""
    config = finetune_config(tiny_shards, tmp_path, **{"schedule.epochs": 1, "tracking.enabled": False,
                                                      "data.preprocess.where": "ray_data",
                                                      "data.preprocess.num_cpus": 0.5,
                                                      "data.preprocess.max_tasks": 2})
    output = run_finetune(config, name="ft-ray-data")
    assert output.metrics["steps"] == train_rows(tiny_shards) // 8
    assert 0.0 <= output.metrics["val_AP"] <= 1.0
    assert load_model(output.outputs["checkpoint"]).config.img_size == (64, 48)
    with pytest.raises(ValueError, match=r"data\.preprocess\.where"):  # a typo'd place names the key
        finetune_config(tiny_shards, tmp_path, **{"data.preprocess.where": "gpu"})


def test_workers_the_cluster_cannot_place_fail_after_the_wait_naming_the_resource(tiny_shards, tmp_path, monkeypatch):
    """A run pinned to a node type the cluster lacks (as after losing the only node of that type) says that it
    waits while it waits (the pipeline's progress lines), and fails once scaling.wait_for_workers_s is spent,
    with one line that names the short resource and the alive nodes; without the limit Ray Train retries the
    placement forever without a word."""
    import io

    from pipelines.cli import user_error_message
    from pipelines.progress import StageProgress
    from pipelines.training.trainer import WorkersNotPlacedError

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "2")  # per attempt; reaches Train's controller
    config = finetune_config(tiny_shards, tmp_path, **{"tracking.enabled": False,
                                                      "scaling.node_resources": "{gpu_node: 0.5}",
                                                      "scaling.wait_for_workers_s": 5})
    started = time.monotonic()
    console = io.StringIO()
    # the stage's progress thread (MLflow is off here: its step count has nothing to read, the wait note still runs)
    with pytest.raises(WorkersNotPlacedError) as raised, \
            StageProgress(None, "0", "finetune", "none", stream=console, poll_s=0.5, wait_note_after_s=1):
        run_finetune(config, name="ft-unplaceable")
    waited = time.monotonic() - started
    assert re.search(r"finetune: waiting \d+ s for Ray to place 2 x \{CPU: 0.25, gpu_node: 0.5\}: "
                     r"no alive node has them", console.getvalue()), console.getvalue()
    assert 5 <= waited < 120, waited  # 3 attempts of 2 s, plus Train's start-up
    message = user_error_message(raised.value)
    assert message.startswith("finetune: Ray could not place 2 Train workers of {CPU: 0.25, gpu_node: 0.5} "
                              "within 6 s (scaling.wait_for_workers_s=5)"), message
    assert "Short: gpu_node 1 needed, 0 free" in message and "Alive nodes (1): " in message
    assert "\n" not in message
