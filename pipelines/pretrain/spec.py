"""The pretrain stage in `vitpose run`: MAE on the shard stage's crops; its encoder feeds finetune."""

from __future__ import annotations

from typing import Any

from pipelines.config import build_config
from pipelines.contract import Sections, StageOutput, StageSpec, Upstream
from pipelines.pretrain.config import PretrainConfig
from pipelines.training.spec import training_resources, with_pipeline_owned


def section(sections: Sections) -> dict[str, Any]:
    return sections.get("pretrain", {})


def build(section: dict[str, Any], upstream: Upstream | None) -> PretrainConfig:
    return build_config(PretrainConfig, with_pipeline_owned("pretrain", section, upstream), source="pretrain section")


def run(config: PretrainConfig, upstream: Upstream, force: bool) -> StageOutput:
    from pipelines.pretrain.run import run_pretrain

    return run_pretrain(config)


SPEC = StageSpec("pretrain", inputs=("shard",), section=section, build=build, run=run,
                 resources=lambda config: training_resources(config))
