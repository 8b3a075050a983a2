"""The serve stage in `vitpose run`: serve the registered champion with Ray Serve and prove it answers.

Its section is a `ServeConfig` (the same keys as `vitpose serve --config`); the model source is set to
the registry alias the register stage moved (`models:/<name>@<alias>`) in the pipeline's MLflow store.
With a detect stage in the pipeline, box-free requests go to the registered detector
(`TorchvisionPersonDetector` on `models:/<name>-detector@<alias>`, from the detect record), unless the
section names its own `detector.import_path`.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import build_config, deep_merge
from pipelines.contract import Sections, StageOutput, StageSpec, Upstream, placeholder
from pipelines.serve.config import ServeConfig

DETECTOR_CLASS = "pipelines.serve.detector:TorchvisionPersonDetector"


def section(sections: Sections) -> dict[str, Any]:
    serve = sections.get("serve", {})
    if "detect" not in sections or serve.get("detector", {}).get("import_path"):
        return serve
    detector = {"import_path": DETECTOR_CLASS, "init_kwargs": {"path": placeholder("detect", "model_uri")}}
    return deep_merge({"detector": detector}, serve)


def build(section: dict[str, Any], upstream: Upstream | None) -> ServeConfig:
    if upstream is None:
        source = {"registered_model": placeholder("register", "model_name"), "alias": placeholder("register", "alias")}
    else:
        source = {"registered_model": upstream.output("register", "model_name"),
                  "alias": upstream.output("register", "alias"), "tracking_uri": upstream.tracking_uri}
        kwargs = section.get("detector", {}).get("init_kwargs", {})
        if kwargs.get("path") == placeholder("detect", "model_uri"):
            detector_uri = upstream.output("detect", "model_uri")
            if detector_uri is None:  # `--stages serve` before detect ever ran: box-free requests get the whole image
                section = {**section, "detector": {}}
            else:
                section = deep_merge(section, {"detector": {"init_kwargs": {
                    "path": detector_uri, "tracking_uri": upstream.tracking_uri}}})
    return build_config(ServeConfig, deep_merge(section, {"model": source}), source="serve section")


def run(config: ServeConfig, upstream: Upstream, force: bool) -> StageOutput:
    from pipelines.serve.run import run_serve

    return run_serve(config)


def resources(config: ServeConfig) -> dict[str, Any]:
    return {"model_replicas": [config.autoscaling.min_replicas, config.autoscaling.max_replicas],
            "per_model_replica": {"CPU": config.resources.model_num_cpus, "GPU": config.resources.model_num_gpus},
            "ingress_replicas": config.resources.ingress_replicas,
            "per_ingress_replica": {"CPU": config.resources.ingress_num_cpus}}


SPEC = StageSpec("serve", inputs=("register",), optional_inputs=("detect",), section=section, build=build, run=run,
                 resources=resources, cacheable=False)
