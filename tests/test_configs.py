"""Every shipped YAML loads strictly into its stage config; unknown keys are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config, load_yaml
from pipelines.finetune import FinetuneConfig
from pipelines.pretrain import PretrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
STAGE_FILES = {"finetune_tiny.yaml": FinetuneConfig, "finetune_vitpose_b_8gpu.yaml": FinetuneConfig,
               "pretrain_tiny.yaml": PretrainConfig}
SECTIONS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


@pytest.mark.parametrize("name", sorted(STAGE_FILES))
def test_stage_yaml_loads(name):
    config = load_config(STAGE_FILES[name], CONFIG_DIR / name)
    assert config.data.shards, "stage YAMLs name their shards"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_pretrain_and_finetune_sections_of_every_yaml_load(path):
    data = load_yaml(path)
    for section, cls in SECTIONS.items():
        if section in data:
            load_config(cls, path, section=section)


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
    with pytest.raises(ConfigError, match="fsdp"):
        load_config(FinetuneConfig, CONFIG_DIR / "finetune_tiny.yaml", ["scaling.strategy=fsdp"])
    with pytest.raises(ConfigError, match="model.input_size"):
        load_config(FinetuneConfig, CONFIG_DIR / "finetune_tiny.yaml", ["data.stream.input_size=[48, 64]"])
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config(FinetuneConfig, CONFIG_DIR / "finetune_tiny.yaml", ["model.variant=vitpose-xl"])
