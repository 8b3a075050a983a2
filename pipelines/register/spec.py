"""The register stage in `vitpose run`: candidates from the stages' records, scored on the shard stage's val
split with the finetune section's eval settings; the winner is registered and maybe promoted. With a detect
stage in the pipeline it also reports the champion's pose AP with the detector's val boxes beside the AP with
ground-truth boxes (`detections`, from the detect record)."""

from __future__ import annotations

from typing import Any

from pipelines.config import ConfigError, build_config, deep_merge
from pipelines.contract import Sections, StageOutput, StageSpec, Upstream, placeholder
from pipelines.register.config import RegisterConfig

CANDIDATE_STAGES = ("finetune", "tune", "distill")


def section(sections: Sections) -> dict[str, Any]:
    scoring = {key: value for key, value in sections.get("finetune", {}).items()
               if key in ("data", "eval", "scaling", "seed")}
    derived: dict[str, Any] = {"scoring": scoring}
    if "detect" in sections:  # the pipeline has a detect stage: score the champion on its boxes too
        derived["detections"] = placeholder("detect", "val_detections")
    return deep_merge(derived, sections.get("register", {}))


def build(section: dict[str, Any], upstream: Upstream | None) -> RegisterConfig:
    data = deep_merge(section, {"scoring": {"tracking": {"enabled": False}}})
    unknown = [name for name in data.get("candidates", ()) if name not in CANDIDATE_STAGES]
    if unknown:
        raise ConfigError(f"register.candidates: {unknown} are not stages that leave a model; "
                          f"choose from {list(CANDIDATE_STAGES)}")
    candidates = data.get("candidates", CANDIDATE_STAGES)
    if upstream is None:
        data.setdefault("checkpoints", {name: placeholder(name, "checkpoint") for name in candidates})
        data["scoring"].setdefault("data", {}).setdefault("shards", placeholder("shard", "shards"))
    else:
        found = {name: upstream.output(name, "checkpoint") for name in candidates}
        data.setdefault("checkpoints", {name: uri for name, uri in found.items() if uri})
        data["scoring"].setdefault("data", {}).setdefault("shards", upstream.output("shard", "shards"))
        data.setdefault("tracking_uri", upstream.tracking_uri)
        data.setdefault("out", upstream.path("out"))
        runs = {name: upstream.output(name, "mlflow_run_id") for name in candidates}
        data.setdefault("curves", {name: run_id for name, run_id in runs.items() if run_id})
        if data.get("detections") == placeholder("detect", "val_detections"):
            data["detections"] = upstream.output("detect", "val_detections")  # None without a detect record
    return build_config(RegisterConfig, data, source="register section")


def run(config: RegisterConfig, upstream: Upstream, force: bool) -> StageOutput:
    from pipelines.register.run import run_register

    return run_register(config, run_id=upstream.parent_run_id)


SPEC = StageSpec("register", inputs=("shard",), optional_inputs=(*CANDIDATE_STAGES, "detect"), section=section,
                 build=build, run=run)
