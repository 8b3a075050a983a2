"""The detect stage in `vitpose run`: a person detector from the shard stage's images, registered beside the pose
model as `<register.model_name>-detector`.

It is optional: it runs only when the pipeline file has a `detect:` section (`pipelines/configs/local_detect.yaml`);
without one it is left out, and register and serve behave as before (serve answers a box-free request with one
whole-image box).

Ordering: detect runs right after shard and before the pose stages, not after register. Its only input is the
shard stage's images, so a change to pretrain, finetune, tune or distill never retrains it (placed after
register, every new pose champion would change its input fingerprints and retrain the detector). The register
stage, which already scores the champion, reads the detect record when there is one and reports the champion's
pose AP on the val split with the detector's boxes beside the AP with ground-truth boxes (one top-down
inference and evaluation path, the one `vitpose eval --checkpoint --images [--detections]` runs); serve loads
the registered detector.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import build_config, deep_merge
from pipelines.contract import Sections, StageOutput, StageSpec, Upstream, placeholder
from pipelines.detect.config import DetectConfig


def section(sections: Sections) -> dict[str, Any]:
    pose_model = sections.get("register", {}).get("model_name", "vitpose")
    return deep_merge({"model_name": f"{pose_model}-detector"}, sections.get("detect", {}))


def build(section: dict[str, Any], upstream: Upstream | None) -> DetectConfig:
    if upstream is None:
        owned = {"data": {"shards": placeholder("shard", "shards")}, "out": "<workdir>/detect/out"}
        return build_config(DetectConfig, deep_merge(owned, section), source="detect section")
    owned = {"data": {"shards": upstream.output("shard", "shards")}, "out": upstream.path("out")}
    data = deep_merge(deep_merge(owned, section), {"tracking_uri": upstream.tracking_uri,
                                                   "experiment": upstream.experiment})
    return build_config(DetectConfig, data, source="detect section")


def run(config: DetectConfig, upstream: Upstream, force: bool) -> StageOutput:
    from pipelines.detect.run import run_detect

    return run_detect(config, run_id=upstream.parent_run_id)


def resources(config: DetectConfig) -> dict[str, Any]:
    return {"tasks": 1, "per_task": {"CPU": config.resources.num_cpus, "GPU": config.resources.num_gpus}}


SPEC = StageSpec("detect", inputs=("shard",), section=section, build=build, run=run, resources=resources,
                 optional=True)
