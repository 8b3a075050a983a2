"""The rehearsal overlay and the fixes the rehearsal found, without a cluster (seconds).

- `vitpose plan --overlay` shows every shipped pipeline config shrunk: tiny models on CPU workers pinned to the
  stand-in node type, a few steps, synthetic data, CPU serve replicas; every stage and every derivation kept
  (tune's trials and distill's student still come from the finetune section, FSDP stays FSDP);
- `resolve_model` copies an s3:// checkpoint (distill's teacher on a cluster) instead of reading
  `<cwd>/s3:/...`, and a missing one is an error naming the URI;
- the job driver adds RAY_DATA_DISABLE_PROGRESS_BARS to its job's runtime env unless the submitter set it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from infra.rehearsal.overlay import CLUSTER_CONFIGS, OVERLAY, REPO, run_command
from pipelines.pipeline import STAGE_NAMES, load_pipeline_config
from pipelines.plan import build_plan

SHIPPED = (*CLUSTER_CONFIGS, "pipelines/configs/local.yaml")
TRAINING = ("pretrain", "finetune", "distill")


def _plan(config: str) -> dict:
    loaded = load_pipeline_config(REPO / config, ["workdir=s3://rehearsal-bucket/x", "serve.port=18123"], [OVERLAY])
    return build_plan(loaded, check_cluster=False)


@pytest.mark.parametrize("config", SHIPPED)
def test_overlay_shrinks_sizes_and_keeps_every_stage_and_derivation(config):
    original = load_pipeline_config(REPO / config)
    plan = _plan(config)
    stages = plan["stages"]
    assert list(stages) == [name for name in STAGE_NAMES if name != "detect"]  # optional; none of these has one
    assert stages["shard"]["sources"] == [] and stages["shard"]["synthetic"]["train_images"] <= 32
    for name in TRAINING:
        stage = stages[name]
        assert stage["model"]["variant"] == "vitpose-tiny", name
        assert stage["scaling"]["use_gpu"] is False and stage["scaling"]["node_resources"] == {"gpu_node": 0.5}
        assert stage["schedule"]["max_steps"] <= 4
        assert plan["resources"][name]["per_worker"].get("GPU") is None
    # what the overlay does not name stays the config's: FSDP stays FSDP; precision follows the CPU stand-in
    finetune = original.finetune.get("scaling", {})
    assert stages["finetune"]["scaling"]["strategy"] == finetune.get("strategy", "ddp")
    assert stages["finetune"]["scaling"]["precision"] == "auto"
    assert stages["finetune"]["model"]["input_size"] == [64, 96]
    # where the transform runs stays the config's (Ray Data tasks for ViTPose-B); only its size shrinks
    preprocess = stages["finetune"]["data"]["preprocess"]
    assert preprocess["where"] == original.finetune.get("data", {}).get("preprocess", {}).get("where", "train_worker")
    assert preprocess["num_cpus"] == 0.25
    assert stages["tune"]["finetune"]["data"]["preprocess"] == preprocess
    # tune's trials still derive from the (shrunk) finetune section, with the sweep's own schedule
    trial = stages["tune"]["finetune"]
    assert trial["model"]["variant"] == "vitpose-tiny" and trial["scaling"]["node_resources"] == {"gpu_node": 0.5}
    assert trial["scaling"].get("strategy", "ddp") == finetune.get("strategy", "ddp")
    assert stages["tune"]["name"] == original.tune["name"]
    axes = stages["tune"]["search_space"]
    assert set(original.tune["search_space"]) <= set(axes)  # every axis of the config kept
    # the overlay pins resolution to one value: a config without a resolution axis gains a one-value one
    assert axes["model.input_size"]["grid"] == [[64, 96]]
    assert plan["resources"]["tune"]["per_trial"]["per_worker"]["gpu_node"] == 0.5
    # distill's student derives from finetune too (its data, and its optimiser unless distill names one)
    own_lr = original.distill.get("optim", {}).get("lr")  # a config may give the student its own lr
    assert stages["distill"]["optim"]["lr"] == (own_lr if own_lr is not None else stages["finetune"]["optim"]["lr"])
    assert stages["distill"]["data"]["batch_size"] == stages["finetune"]["data"]["batch_size"]
    assert plan["resources"]["serve"]["per_model_replica"] == {"CPU": 0.5, "GPU": 0.0}
    assert stages["serve"]["port"] == 18123


def test_vitpose_plan_overlay_json_cli():
    config = CLUSTER_CONFIGS[1]  # ViTPose-H with FSDP
    command = run_command(config, "rehearsal-bucket", 18123)
    assert command[:2] == ["vitpose", "run"] and "--overlay" in command
    plan_args = [arg for arg in command[2:] if arg != "--no-keep-serving"]
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", *plan_args, "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout)
    assert plan["stages"]["finetune"]["model"]["variant"] == "vitpose-tiny"
    assert plan["stages"]["finetune"]["scaling"]["strategy"] == "fsdp"
    assert plan["stages"]["tune"]["out"] == "<workdir>/tune/out"
    assert plan["resources"]["finetune"]["per_worker"] == {"CPU": 1.0, "gpu_node": 0.5}


def test_set_wins_over_overlay_and_overlays_apply_in_order(tmp_path):
    second = tmp_path / "second.yaml"
    second.write_text("finetune:\n  data: {batch_size: 4}\n")
    loaded = load_pipeline_config(REPO / CLUSTER_CONFIGS[0], ["finetune.schedule.max_steps=2"], [OVERLAY, second])
    assert loaded.finetune["data"]["batch_size"] == 4  # the later overlay
    assert loaded.finetune["schedule"]["max_steps"] == 2  # --set over every overlay
    assert loaded.finetune["optim"]["lr"] == 5.0e-4  # the config's own value, untouched


def test_overlay_with_an_unknown_key_names_it(tmp_path):
    from pipelines.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  scaling: {num_wrokers: 2}\n")
    with pytest.raises(ConfigError, match="num_wrokers"):
        load_pipeline_config(REPO / CLUSTER_CONFIGS[0], None, [bad])


def test_resolve_model_copies_an_s3_checkpoint(s3_server, tmp_path):
    from serve_helpers import tiny_checkpoint

    from pipelines import registry, storage

    local = tiny_checkpoint(tmp_path / "finetune_export")
    uri = "s3://vitpose-test/rehearsal/tune/out/trials/train-0/finetune_export"
    storage.copy_dir(local, uri)
    resolved = registry.resolve_model(uri, dst_dir=tmp_path / "fetched")
    assert resolved.path.is_dir() and str(resolved.path).startswith(str(tmp_path / "fetched"))
    assert (resolved.path / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert resolved.source == uri

    missing = "s3://vitpose-test/rehearsal/nothing/here"
    with pytest.raises(FileNotFoundError, match=missing):
        registry.resolve_model(missing, dst_dir=tmp_path / "none")


def test_job_driver_turns_ray_data_bars_off_in_its_workers(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from pipelines.session import quiet_workers_env

    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert quiet_workers_env() == {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    # the submitter's own value wins (and Ray would refuse to merge the key from both sides)
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(
        {"runtime_env": {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "0"}}}))
    assert quiet_workers_env() == {}
    assert os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)  # untouched
