"""The shard stage in `vitpose run`: its output goes to `<workdir>/shard/out`; every later stage reads the
shards from this stage's record."""

from __future__ import annotations

from typing import Any

from pipelines.config import build_config
from pipelines.contract import Sections, StageOutput, StageSpec, Upstream
from pipelines.shard.config import ShardConfig


def section(sections: Sections) -> dict[str, Any]:
    return sections.get("shard", {})


def build(section: dict[str, Any], upstream: Upstream | None) -> ShardConfig:
    out = "<workdir>/shard/out" if upstream is None else upstream.path("out")
    return build_config(ShardConfig, {"out": out, **section}, source="shard section")


def run(config: ShardConfig, upstream: Upstream, force: bool) -> StageOutput:
    from pipelines.shard.run import run_shard, shard_output

    return shard_output(run_shard(config, force=force), config.out)


def resources(config: ShardConfig) -> dict[str, Any]:
    return {"per_task": {"CPU": config.cpus_per_task, "memory_mb": config.task_memory_mb},
            "max_tasks": config.max_tasks or "Ray Data decides"}


SPEC = StageSpec("shard", inputs=(), section=section, build=build, run=run, resources=resources)
