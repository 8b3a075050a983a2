"""The serve stage in `vitpose run`: serve the registered champion with Ray Serve and prove it answers.

Its section is a `ServeConfig` (the same keys as `vitpose serve --config`); the model source is set to
the registry alias the register stage moved (`models:/<name>@<alias>`) in the pipeline's MLflow store.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import build_config, deep_merge
from pipelines.contract import Sections, StageOutput, StageSpec, Upstream, placeholder
from pipelines.serve.config import ServeConfig


def section(sections: Sections) -> dict[str, Any]:
    return sections.get("serve", {})


def build(section: dict[str, Any], upstream: Upstream | None) -> ServeConfig:
    if upstream is None:
        source = {"registered_model": placeholder("register", "model_name"), "alias": placeholder("register", "alias")}
    else:
        source = {"registered_model": upstream.output("register", "model_name"),
                  "alias": upstream.output("register", "alias"), "tracking_uri": upstream.tracking_uri}
    return build_config(ServeConfig, deep_merge(section, {"model": source}), source="serve section")


def run(config: ServeConfig, upstream: Upstream, force: bool) -> StageOutput:
    from pipelines.serve.run import run_serve

    return run_serve(config)


def resources(config: ServeConfig) -> dict[str, Any]:
    return {"model_replicas": [config.autoscaling.min_replicas, config.autoscaling.max_replicas],
            "per_model_replica": {"CPU": config.resources.model_num_cpus, "GPU": config.resources.model_num_gpus},
            "ingress_replicas": config.resources.ingress_replicas,
            "per_ingress_replica": {"CPU": config.resources.ingress_num_cpus}}


SPEC = StageSpec("serve", inputs=("register",), section=section, build=build, run=run, resources=resources,
                 cacheable=False)
