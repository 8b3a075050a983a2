"""`vitpose plan`: every shipped pipeline config's effective stage configs, derived and checked with no compute.

The cluster configs name only a search space under `tune:` and a student under `distill:`; the plan shows
that their trials and teachers are the finetune stage's model (not the laptop default the empty sections
used to get), and a deliberately inconsistent config fails naming the stage and the key.
"""

from __future__ import annotations

import json

import pytest
from paths import REPO_ROOT

from pipelines.cli import main

CONFIGS = REPO_ROOT / "pipelines" / "configs"
PIPELINE_FILES = ("local.yaml", "local_detect.yaml", "cocoaic_vitpose_b_8gpu.yaml", "vitpose_h_fsdp.yaml")


def plan(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(["plan", *argv, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


@pytest.mark.parametrize("name", PIPELINE_FILES)
def test_every_shipped_pipeline_config_plans(name, capsys):
    code, result, err = plan(capsys, "--config", str(CONFIGS / name))
    assert code == 0, err
    detect = ["detect"] if name == "local_detect.yaml" else []  # the optional stage: only with its section
    assert list(result["stages"]) == ["shard", *detect, "pretrain", "finetune", "tune", "distill", "register", "serve"]
    finetune = result["stages"]["finetune"]
    assert finetune["data"]["shards"] == "<shard.shards>"  # filled from the shard stage's record at run time
    # the tune trials' base derives from the finetune section: what tune does not name is finetune's
    trial_base = result["stages"]["tune"]["finetune"]
    assert trial_base["model"]["variant"] == finetune["model"]["variant"]
    assert trial_base["data"]["batch_size"] == finetune["data"]["batch_size"]
    assert trial_base["scaling"]["precision"] == finetune["scaling"]["precision"]
    # so does the distill student, except what it names (its variant in the cluster configs)
    assert result["stages"]["distill"]["scaling"]["num_workers"] == finetune["scaling"]["num_workers"]
    assert set(result["resources"]) == set(result["stages"])


@pytest.mark.parametrize("name, variant, student", [("cocoaic_vitpose_b_8gpu.yaml", "vitpose-b", "vitpose-s"),
                                                    ("vitpose_h_fsdp.yaml", "vitpose-h", "vitpose-b")])
def test_cluster_configs_tune_and_teach_the_finetune_variant_on_gpus(name, variant, student, capsys):
    code, result, err = plan(capsys, "--config", str(CONFIGS / name))
    assert code == 0, err
    assert result["models"] == {"pretrain": variant, "finetune": variant, "tune_trials": [variant],
                                "distill_teacher": [variant], "distill_student": student}
    trial = result["resources"]["tune"]["per_trial"]
    assert trial["workers"] == 8 and trial["per_worker"]["GPU"] == 1.0  # not the CPU tiny sweep
    # ViTPose-B's GPUs are fed by Ray Data transform tasks, and so are the trials and the student derived from it;
    # ViTPose-H keeps the transform in its Train workers (data.preprocess.where: train_worker, the default)
    fed = {"CPU": 1.0} if variant == "vitpose-b" else None
    for ask in (result["resources"]["finetune"], trial, result["resources"]["distill"]):
        assert ask.get("per_transform_task") == fed
    assert result["stages"]["tune"]["finetune"]["model"]["input_size"] == [192, 256]
    # the search space still varies what the sweep is for
    assert {"model.input_size", "attention"} <= set(result["stages"]["tune"]["search_space"])


@pytest.mark.parametrize("override, message", [
    ("tune.finetune.model.variant=vitpose-s",
     r"\[tune\] tune.finetune.model.variant gives trials the variant 'vitpose-s' but the finetune stage trains "
     r"'vitpose-b'"),
    ("finetune.scaling.gpus_per_worker=16",
     r"\[finetune\] finetune.scaling.gpus_per_worker = 16 GPU per worker, but no node type of .*ray_cluster.yaml "
     r"offers more than 8 GPU"),
    ("finetune.data.preprocess.num_cpus=200",
     r"\[finetune\] finetune.data.preprocess.num_cpus = 200 CPU per task, but no node type of .*ray_cluster.yaml "
     r"offers more than 96 CPU"),
    ("finetune.data.preprocess.resources={cpu_node: 1}",
     r"\[finetune\] finetune.data.preprocess.resources.cpu_node = 1 cpu_node per task, but no node type"),
    ("finetune.model.input_size=[190,256]",
     r"\[finetune\] invalid FinetuneConfig .*\n\s+model.input_size: .*must be multiples of the patch size 16"),
    ("finetune.model.attention=shifted_window",
     r"\[distill\] distill.distill.knowledge_token needs a full-attention teacher"),
    ("distill.optim.lrr=1",
     r"\[distill\] invalid DistillConfig .*\n\s+unknown key 'optim.lrr'"),
])
def test_an_inconsistent_config_fails_naming_the_stage_and_the_key(override, message, capsys):
    extra = ["--set", "tune.search_space.attention.grid=[{model.attention: shifted_window}]"] \
        if "attention" in override else []
    code, _, err = plan(capsys, "--config", str(CONFIGS / "cocoaic_vitpose_b_8gpu.yaml"), "--set", override, *extra)
    assert code == 2
    assert __import__("re").search(message, err), err


def test_the_embedded_default_fits_a_cpu_machine_without_the_cluster_check(capsys):
    code, result, err = plan(capsys)
    assert code == 0, err
    assert all("GPU" not in result["resources"][name].get("per_worker", {})
               for name in ("pretrain", "finetune", "distill"))
