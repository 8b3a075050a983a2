"""The distill stage in `vitpose run`: the best full-attention model of tune and finetune teaches a student.

The student's config derives from the pipeline's finetune section (data, optim, schedule, scaling,
precision, eval, ...) with the distill section laid over it; `model.input_size` is the teacher's unless
the distill section names one (a tune winner may run at another resolution than finetune), and the
student never starts from the finetune stage's MAE encoder (it has its own, smaller shape).
"""

from __future__ import annotations

import json
from typing import Any

from pipelines import storage
from pipelines.config import ConfigError, build_config, deep_merge
from pipelines.contract import Records, Sections, StageOutput, StageSpec, Upstream, placeholder
from pipelines.distill.config import DistillConfig
from pipelines.training.spec import training_resources, with_pipeline_owned

TEACHER_STAGES = ("tune", "finetune")


def section(sections: Sections) -> dict[str, Any]:
    base = {key: value for key, value in sections.get("finetune", {}).items() if key != "checkpoint"}
    model = {key: value for key, value in base.get("model", {}).items() if key not in ("pretrained", "input_size")}
    return deep_merge({**base, "model": model}, sections.get("distill", {}))


def _attention(checkpoint: str) -> str | None:
    """The attention type a checkpoint was trained with (from its config.json), None if unreadable."""
    try:
        return json.loads(storage.read_text(storage.join(checkpoint, "config.json")))["model"]["attention"]
    except (FileNotFoundError, KeyError, ValueError):
        return None


def pick_teacher(records: Records, knowledge_token: bool) -> str | None:
    """The best-AP checkpoint of tune and finetune. The knowledge token only fits full-attention teachers
    (window attention rejects the extra token), so others are passed over then."""
    scored = []
    for name in TEACHER_STAGES:
        record = records.get(name) or {}
        checkpoint = record.get("outputs", {}).get("checkpoint")
        if not checkpoint or (knowledge_token and _attention(checkpoint) not in ("full", None)):
            continue
        scored.append((record.get("metrics", {}).get("ap", float("-inf")), checkpoint))
    return max(scored)[1] if scored else None


def build(section: dict[str, Any], upstream: Upstream | None) -> DistillConfig:
    data = with_pipeline_owned("distill", section, upstream)
    knowledge_token = data.get("distill", {}).get("knowledge_token", True)
    if upstream is None:
        data.setdefault("out", "<workdir>/distill/out")
        data.setdefault("teacher", placeholder("tune|finetune", "checkpoint"))
    else:
        data.setdefault("out", upstream.path("out"))
        if "teacher" not in data:
            teacher = pick_teacher(upstream.records, knowledge_token)
            if teacher is None:
                raise ConfigError("distill needs a teacher: run tune or finetune first (with a full-attention model "
                                  "when distill.knowledge_token is on), or set distill.teacher")
            data["teacher"] = teacher
    return build_config(DistillConfig, data, source="distill section")


def run(config: DistillConfig, upstream: Upstream, force: bool) -> StageOutput:
    from pipelines.distill.run import run_distill

    return run_distill(config)


SPEC = StageSpec("distill", inputs=("shard",), optional_inputs=TEACHER_STAGES, section=section, build=build,
                 run=run, resources=lambda config: training_resources(config))
