"""The finetune stage in `vitpose run`: ViTPose on the shard stage's crops, from the pretrain encoder when
there is one. Its section is also where tune's trials and distill's student start from."""

from __future__ import annotations

from typing import Any

from pipelines.config import build_config
from pipelines.contract import Sections, StageOutput, StageSpec, Upstream, placeholder
from pipelines.finetune.config import FinetuneConfig
from pipelines.training.spec import training_resources, with_pipeline_owned


def section(sections: Sections) -> dict[str, Any]:
    return sections.get("finetune", {})


def build(section: dict[str, Any], upstream: Upstream | None) -> FinetuneConfig:
    data = with_pipeline_owned("finetune", section, upstream)
    encoder = placeholder("pretrain", "checkpoint") if upstream is None else upstream.output("pretrain", "checkpoint")
    if encoder and not data.get("model", {}).get("pretrained"):
        data.setdefault("model", {})["pretrained"] = encoder
    return build_config(FinetuneConfig, data, source="finetune section")


def run(config: FinetuneConfig, upstream: Upstream, force: bool) -> StageOutput:
    from pipelines.finetune.run import run_finetune

    return run_finetune(config)


SPEC = StageSpec("finetune", inputs=("shard",), optional_inputs=("pretrain",), section=section, build=build,
                 run=run, resources=lambda config: training_resources(config))
