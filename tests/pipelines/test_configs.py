"""Every shipped YAML loads strictly into its stage config; unknown keys are errors that name the key.

Values that would only fail once a run started fail at load time instead, naming the field: a
``model.input_size`` that is not whole patches, a warm-up longer than ``schedule.max_steps`` (or the
distill token stage's ``token_max_steps``), and a tune axis value that makes such a trial config. A
warm-up longer than a total that depends on the data's row count fails when the run is built, before
Ray Train starts a worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from paths import REPO_ROOT

from pipelines.config import ConfigError, build_config, load_config, load_yaml
from pipelines.distill.config import DistillConfig
from pipelines.finetune.config import FinetuneConfig
from pipelines.pretrain.config import PretrainConfig
from pipelines.tune.config import TuneConfig

CONFIG_DIR = REPO_ROOT / "pipelines" / "configs"
# every shipped YAML is one stage's section (the same shape as under `<stage>:` of a pipeline file) or a
# pipeline file; the test below fails for a file in neither table, so no shipped config goes unchecked
STAGE_FILES = {"finetune_tiny.yaml": "finetune", "finetune_vitpose_b_8gpu.yaml": "finetune",
               "pretrain_tiny.yaml": "pretrain", "tune_tiny.yaml": "tune", "tune_sweep.yaml": "tune",
               "distill_tiny.yaml": "distill", "serve.yaml": "serve"}
PIPELINE_FILES = ("local.yaml", "local_detect.yaml", "cocoaic_vitpose_b_8gpu.yaml", "vitpose_h_fsdp.yaml")
# what a pipeline or the command line fills in: a placeholder stands in here
REQUIRED = {"tune": {"out": "/tmp/o", "shards": "/tmp/s"}, "distill": {"out": "/tmp/o"}}


def stage_config_class(stage: str) -> type:
    from pipelines.serve.config import ServeConfig

    return {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "tune": TuneConfig, "distill": DistillConfig,
            "serve": ServeConfig}[stage]


def test_every_shipped_yaml_is_a_stage_file_or_a_pipeline_file():
    shipped = {path.name for path in CONFIG_DIR.glob("*.yaml")}
    assert shipped == set(STAGE_FILES) | set(PIPELINE_FILES)


@pytest.mark.parametrize("name", sorted(STAGE_FILES))
def test_stage_file_loads_strictly_into_its_stage_config(name):
    stage = STAGE_FILES[name]
    data = load_yaml(CONFIG_DIR / name)
    assert list(data) != [stage], f"{name} is a stage file: its keys are the {stage} section's, not nested under it"
    config = build_config(stage_config_class(stage), {**data, **REQUIRED.get(stage, {})}, source=name)
    for key in data:  # every key the file sets arrives in the config
        assert hasattr(config, key), key
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        build_config(stage_config_class(stage), {**data, **REQUIRED.get(stage, {}), "bogus": 1}, source=name)


@pytest.mark.parametrize("name", PIPELINE_FILES)
def test_pipeline_file_sections_load_as_their_stages_build_them(name):
    from pipelines.pipeline import load_pipeline_config, pipeline_specs, validate_sections

    config = load_pipeline_config(CONFIG_DIR / name)
    configs = validate_sections(config)
    assert set(configs) == {spec.name for spec in pipeline_specs(config)}  # optional stages only with a section
    assert configs["finetune"].data.shards == "<shard.shards>"  # filled in from the shard stage's record


def test_the_8gpu_example_is_the_official_vitpose_b_recipe():
    config = load_config(FinetuneConfig, CONFIG_DIR / "finetune_vitpose_b_8gpu.yaml")
    assert (config.scaling.num_workers, config.scaling.use_gpu, config.data.batch_size) == (8, True, 512)
    assert config.optim.layer_decay_for(config) == 0.75 and config.model.overrides()["drop_path_rate"] == 0.3
    assert config.schedule.milestones == (170, 200)


def test_unknown_keys_are_errors_naming_them():
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr'"):
        load_config(FinetuneConfig, CONFIG_DIR / "finetune_tiny.yaml", ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="unknown key 'mae.mask'"):
        load_config(PretrainConfig, CONFIG_DIR / "pretrain_tiny.yaml", ["mae.mask=0.5"])


def test_overrides_and_cross_field_checks():
    config = load_config(FinetuneConfig, CONFIG_DIR / "finetune_tiny.yaml", ["optim.lr=5e-4", "scaling.num_workers=2"])
    assert config.optim.lr == 5e-4 and config.scaling.num_workers == 2
    with pytest.raises(ConfigError, match="scaling.strategy"):
        load_config(FinetuneConfig, CONFIG_DIR / "finetune_tiny.yaml", ["scaling.strategy=zero3"])
    with pytest.raises(ConfigError, match="model.input_size"):
        load_config(FinetuneConfig, CONFIG_DIR / "finetune_tiny.yaml", ["data.stream.input_size=[48, 64]"])
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config(FinetuneConfig, CONFIG_DIR / "finetune_tiny.yaml", ["model.variant=vitpose-xl"])
    mixed = load_config(FinetuneConfig, CONFIG_DIR / "finetune_tiny.yaml",  # a mix works with either transform place
                        ["datasets=[{name: coco}, {name: aic}]", "data.preprocess.where=ray_data"])
    assert [d.name for d in mixed.datasets] == ["coco", "aic"] and mixed.data.preprocess.where == "ray_data"


# ---------------------------------------------------------------------------- model.input_size: whole patches


def test_input_size_must_be_whole_patches_of_the_models_patch_size():
    from pipelines.training.sections import PATCH_SIZE, ModelSection
    from vitpose_core.models import variant_config

    model = ModelSection(variant="vitpose-tiny", input_size=(96, 128))
    assert variant_config(model.variant, **model.overrides()).patch_size == PATCH_SIZE == 16  # what the ViT uses
    for cls, extra in ((FinetuneConfig, []), (PretrainConfig, [])):
        with pytest.raises(ConfigError, match=r"model\.input_size: .*model\.input_size \(100, 128\) must be multiples "
                                              r"of the patch size 16, e\.g\. \(96, 128\)"):
            build_config(cls, {}, ["model.input_size=[100, 128]", *extra])
    with pytest.raises(ConfigError, match=r"model\.input_size \(192, 250\) must be multiples .* e\.g\. \(192, 256\)"):
        build_config(DistillConfig, {"out": "o"}, ["model.input_size=[192, 250]"])
    with pytest.raises(ConfigError, match=r"model\.input_size \(16, 128\) is too small"):
        build_config(FinetuneConfig, {}, ["model.input_size=[16, 128]"])


@pytest.mark.parametrize("size", [(32, 32), (96, 128), (144, 192), (192, 256), (288, 384)])
def test_every_accepted_input_size_gives_the_heatmaps_the_data_stream_targets(size):
    """Why multiples: the padded patch conv's token grid x 4 equals the stream's input/4 heatmaps only then."""
    config = build_config(FinetuneConfig, {"model": {"input_size": list(size)}})
    from vitpose_core.models import variant_config

    model_heatmap_hw = variant_config(config.model.variant, **config.model.overrides()).heatmap_size
    stream_heatmap_wh = config.data.stream_config(config.model.input_size).heatmap_size
    assert model_heatmap_hw == stream_heatmap_wh[::-1]


def test_tune_axis_value_with_an_invalid_input_size_fails_at_load_time():
    space = {"model.input_size": {"grid": [[96, 128], [100, 130]]}}
    with pytest.raises(ConfigError, match=r"search_space model\.input_size=\[100, 130\].*\n.*model\.input_size "
                                          r"\(100, 130\) must be multiples of the patch size 16, e\.g\. \(96, 128\)"):
        build_config(TuneConfig, {"out": "o", "shards": "s", "search_space": space})


# ------------------------------------------------------------------------------- schedule.warmup_steps


def test_warmup_longer_than_max_steps_fails_at_load_time():
    with pytest.raises(ConfigError, match=r"schedule: .*schedule\.warmup_steps \(50\) is larger than "
                                          r"schedule\.max_steps \(40\)"):
        build_config(FinetuneConfig, {"schedule": {"max_steps": 40, "warmup_steps": 50}})
    with pytest.raises(ConfigError, match=r"schedule\.warmup_steps \(300\) is larger than schedule\.max_steps"):
        load_config(PretrainConfig, CONFIG_DIR / "pretrain_tiny.yaml", ["schedule.max_steps=200",
                                                                         "schedule.warmup_steps=300"])
    assert build_config(FinetuneConfig, {"schedule": {"max_steps": 40, "warmup_steps": 40}}).schedule.max_steps == 40
    # tune: a schedule axis value is checked like any other trial config
    with pytest.raises(ConfigError, match=r"schedule\.warmup_steps \(20\) is larger than schedule\.max_steps"):
        build_config(TuneConfig, {"out": "o", "shards": "s", "finetune": {"schedule": {"warmup_steps": 20}},
                                  "search_space": {"schedule.max_steps": {"choice": [10]}}})


def test_distill_warmup_longer_than_the_token_stage_fails_at_load_time():
    with pytest.raises(ConfigError, match=r"schedule\.warmup_steps \(20\) is larger than distill\.token_max_steps "
                                          r"\(10\)"):
        build_config(DistillConfig, {"out": "o", "schedule": {"warmup_steps": 20}, "distill": {"token_max_steps": 10}})
    # without the token stage the student's schedule alone counts
    build_config(DistillConfig, {"out": "o", "schedule": {"warmup_steps": 20},
                                 "distill": {"token_max_steps": 10, "knowledge_token": False}})


def _shards_with_rows(root: Path, rows: int) -> str:
    """A shard directory whose manifest counts `rows` training crops (all the step arithmetic reads)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"counts": {"coco/train": {"rows_out": rows},
                                                               "coco/val": {"rows_out": 3}}}))
    return str(root)


def test_warmup_longer_than_the_data_dependent_total_fails_before_ray_train_starts(tmp_path):
    from pipelines.finetune.run import FINETUNE
    from pipelines.training.trainer import build_trainer

    shards = _shards_with_rows(tmp_path / "shards", 40)  # batch 16: 2 steps per epoch
    storage_path = tmp_path / "runs"
    config = build_config(FinetuneConfig, {"data": {"shards": shards, "batch_size": 16},
                                           "schedule": {"epochs": 2, "warmup_steps": 5},
                                           "checkpoint": {"storage_path": str(storage_path)},
                                           "tracking": {"enabled": False}})
    with pytest.raises(ValueError, match=r"finetune: schedule\.warmup_steps \(5\) is larger than the run's 4 "
                                         r"optimiser steps \(schedule\.epochs=2 x 2 steps per epoch \(40 training "
                                         r"rows // data\.batch_size=16\)\); set schedule\.warmup_steps <= 4"):
        build_trainer(FINETUNE, config)
    assert not storage_path.exists()  # no Train run was set up
    # a capped total: loading rejects warmup > max_steps, but derived configs (model_copy, as distill's token
    # stage makes) are not re-validated
    capped = config.model_copy(update={"schedule": config.schedule.model_copy(update={"epochs": 10, "max_steps": 3,
                                                                                     "warmup_steps": 4})})
    with pytest.raises(ValueError, match=r"larger than the run's 3 optimiser steps \(schedule\.max_steps=3\)"):
        build_trainer(FINETUNE, capped)


def test_tune_and_distill_check_every_train_run_before_the_first_trains(tmp_path):
    from pipelines.distill.run import check_schedules
    from pipelines.tune.run import check_trial_schedules

    shards = _shards_with_rows(tmp_path / "shards", 40)
    tune = build_config(TuneConfig, {"out": str(tmp_path / "tune"), "shards": shards,
                                     "finetune": {"data": {"batch_size": 16}, "schedule": {"epochs": 4,
                                                                                          "warmup_steps": 6}},
                                     "search_space": {"data.batch_size": {"grid": [8, 16, 32]}}})
    with pytest.raises(ValueError, match=r"tune trial \(data\.batch_size=32\): schedule\.warmup_steps \(6\) is "
                                         r"larger than the run's 4 optimiser steps"):
        check_trial_schedules(tune)
    distill = build_config(DistillConfig, {"out": str(tmp_path / "distill"), "data": {"shards": shards,
                                                                                       "batch_size": 16},
                                           "schedule": {"epochs": 10, "warmup_steps": 5},
                                           "distill": {"token_epochs": 2}})
    with pytest.raises(ValueError, match=r"distill_token: schedule\.warmup_steps \(5\) is larger than the run's 4 "
                                         r"optimiser steps .*distill\.token_epochs=2"):
        check_schedules(distill)
    check_schedules(distill.model_copy(update={"distill": distill.distill.model_copy(update={"token_epochs": 3})}))
