"""The pipeline's stages as `StageSpec`s: how each validates its config section and runs.

Each adapter is glue: it injects what the pipeline owns (output directories under the workdir,
upstream URIs from the input records, the MLflow parent run) into the stage's own strict config, calls
the stage module's public function, and returns the URIs and metrics for the stage record. The
stage modules know nothing about the pipeline.

Training stages (pretrain, finetune, tune, distill) are called as `run_<stage>(config)` where
`config` is the module's `<Stage>Config`; their output directory is fixed (`<workdir>/<stage>/out`),
so a rerun after a kill reuses the same Ray Train storage path and run name and resumes.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from typing import Any

from pydantic import Field

from pipelines import storage
from pipelines.config import StrictConfig, build_config
from pipelines.pipeline import StageContext, StageOutput, StageSpec
from pipelines.register_stage import run_register_stage, validate_register

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ shard


class SyntheticSection(StrictConfig):
    """Generate a synthetic COCO-format dataset first (the embedded default needs no downloads)."""

    train_images: int = Field(200, ge=1)
    val_images: int = Field(50, ge=1)
    width: int = Field(320, ge=32)
    height: int = Field(240, ge=32)
    max_people: int = Field(4, ge=1)
    seed: int = 0


def _shard_config(section: dict[str, Any], out: str = "<stage>/out", sources: list[dict] | None = None) -> Any:
    from pipelines.shard import ShardConfig

    data = {key: value for key, value in section.items() if key != "synthetic"}
    if sources is not None:
        data["sources"] = sources
    elif "sources" not in data and section.get("synthetic") is not None:
        data["sources"] = [{"annotations": "<synthetic>", "images": "<synthetic>", "dataset": "coco", "split": "train"}]
    return build_config(ShardConfig, {**data, "out": out}, source="shard section")


def validate_shard(section: dict[str, Any]) -> dict[str, Any]:
    synthetic = section.get("synthetic")
    if synthetic is not None:
        build_config(SyntheticSection, synthetic, source="shard.synthetic")
    elif not section.get("sources"):
        from pipelines.config import ConfigError

        raise ConfigError("shard needs `sources` (COCO / AIC annotation + image URIs) or `synthetic: {...}`")
    _shard_config(section)  # strict check of every other key against ShardConfig
    return section


def _synthetic_sources(context: StageContext, synthetic: SyntheticSection) -> list[dict[str, Any]]:
    """Write (or reuse) the synthetic train/val sets under <stage>/raw; returns shard sources for them."""
    from pipelines.commands.synth import write_synthetic_dataset
    from vitpose_core.synthetic import SyntheticConfig

    sources = []
    for split, count, seed in (("train", synthetic.train_images, synthetic.seed),
                               ("val", synthetic.val_images, synthetic.seed + 1_000_003)):
        out = context.path("raw", split)
        params = {"num_images": count, "width": synthetic.width, "height": synthetic.height,
                  "max_people": synthetic.max_people, "seed": seed}
        marker = storage.join(out, "synthetic.json")
        annotations = storage.join(out, "annotations", f"person_keypoints_{split}.json")
        if not (storage.exists(marker) and json.loads(storage.read_text(marker)) == params):
            logger.info("generating %d synthetic %s images in %s", count, split, out)
            write_synthetic_dataset(out, SyntheticConfig(**params), split)
            storage.write_text(marker, json.dumps(params))  # last: marks the set complete
        sources.append({"annotations": annotations, "images": storage.join(out, "images"),
                        "dataset": "coco", "split": split})
    return sources


def run_shard_stage(context: StageContext) -> StageOutput:
    from pipelines.shard import run_shard

    section = context.section
    sources = None
    if section.get("synthetic") is not None:
        sources = _synthetic_sources(context, build_config(SyntheticSection, section["synthetic"]))
    config = _shard_config(section, out=context.path("out"), sources=sources)
    manifest = run_shard(config, force=context.force)
    totals = manifest["totals"]
    splits = ", ".join(f"{key} {value['rows_out']}" for key, value in manifest["counts"].items())
    return StageOutput(outputs={"shards": storage.normalize(config.out), "raw": context.path("raw") if sources else None},
                       metrics={"rows_out": totals["rows_out"], "records_in": totals["records_in"],
                                "skipped": totals["skipped"]},
                       summary=f"{totals['rows_out']} crops ({splits}), {totals['skipped']} skipped")


# ------------------------------------------------------------------------------------- training stages

# Inside `vitpose run` the register stage alone decides the champion (pipelines/register_stage.py), so
# tune and distill must not register models themselves; a section that asks them to is an error.
SELF_REGISTERING = ("tune", "distill")


def _checkpoint_attention(uri: str) -> str | None:
    """The attention type a checkpoint was trained with (from its config.json), None if unreadable."""
    try:
        return json.loads(storage.read_text(storage.join(uri, "config.json")))["model"]["attention"]
    except (FileNotFoundError, KeyError, ValueError):
        return None


def pick_teacher(upstream: dict[str, dict[str, Any]], knowledge_token: bool) -> str | None:
    """The distill teacher: the best-AP checkpoint of tune and finetune. The knowledge token only fits
    full-attention teachers (window attention rejects the extra token), so others are passed over then."""
    scored = []
    for name in ("tune", "finetune"):
        outputs, metrics = upstream.get(name, {}).get("outputs", {}), upstream.get(name, {}).get("metrics", {})
        checkpoint = outputs.get("checkpoint")
        if not checkpoint or (knowledge_token and _checkpoint_attention(checkpoint) not in ("full", None)):
            continue
        scored.append((metrics.get("ap", float("-inf")), checkpoint))
    return max(scored)[1] if scored else None


def _training_stage(name: str, needs_inputs: tuple[str, ...], optional_inputs: tuple[str, ...] = ()) -> StageSpec:
    """A Ray Train stage from `pipelines.<name>`: `<Name>Config` + `run_<name>(config)`.

    The pipeline fills `data.shards` (or the flat `shards`), `checkpoint.storage_path` / `out` under
    `<workdir>/<stage>/` (fixed paths, so the stage's config-hash run name resumes an interrupted run),
    the MLflow parent run, `model.pretrained` / `pretrain_checkpoint` from the pretrain export for
    finetune and tune, and distill's `teacher` from the tune/finetune records.
    """
    module_name = f"pipelines.{name}"

    def config_class() -> type:
        return getattr(importlib.import_module(module_name), f"{name.capitalize()}Config")

    def inject(section: dict[str, Any], context: StageContext | None) -> dict[str, Any]:
        from pipelines.config import ConfigError

        fields = config_class().model_fields
        data = {key: dict(value) if isinstance(value, dict) else value for key, value in section.items()}
        upstream = {n: r for n, r in context.inputs.items()} if context else {}
        outputs = {n: r.get("outputs", {}) for n, r in upstream.items()}
        shards = outputs.get("shard", {}).get("shards", "<shard>/out")
        pretrained = outputs.get("pretrain", {}).get("checkpoint")
        if name in SELF_REGISTERING:
            if "registry" in data:
                raise ConfigError(f"{name}.registry: inside `vitpose run` the register stage alone registers models "
                                  "and moves the champion alias; configure `register:` instead")
            data["registry"] = {"enabled": False}
        if "out" in fields:  # flat stage configs (tune, distill) take their output dir at the top level
            data.setdefault("out", context.path("out") if context else "<stage>/out")
        if "shards" in fields:
            data.setdefault("shards", shards)
        if "pretrain_checkpoint" in fields:
            # tune sweeps on top of the finetune stage's best model when there is one (load_checkpoint resizes
            # its position embeddings to each trial's input size), else from the MAE encoder
            start = outputs.get("finetune", {}).get("checkpoint") or pretrained
            if start:
                data.setdefault("pretrain_checkpoint", start)
        if "teacher" in fields:
            knowledge_token = data.get("distill", {}).get("knowledge_token", True)
            teacher = pick_teacher(upstream, knowledge_token) if context else "<tune or finetune>/checkpoint"
            if teacher is None and "teacher" not in data:
                raise ConfigError("distill needs a teacher: run tune or finetune first, or set distill.teacher")
            data.setdefault("teacher", teacher)
        if "data" in fields:
            data["data"] = {**data.get("data", {}), "shards": data.get("data", {}).get("shards", shards)}
        if "checkpoint" in fields:
            data["checkpoint"] = {"storage_path": context.path("train") if context else "<stage>/train",
                                  **data.get("checkpoint", {})}
        # the distill student has its own (smaller) architecture: an MAE encoder of the teacher size won't fit
        if "model" in fields and pretrained and name != "distill":
            data["model"] = {"pretrained": pretrained, **data.get("model", {})}
        if "tracking" in fields and context is not None:
            data["tracking"] = {**data.get("tracking", {}), "tracking_uri": context.tracking_uri,
                                "experiment": context.config.mlflow.experiment, "parent_run_id": context.run_id}
        return data

    def validate(section: dict[str, Any]) -> dict[str, Any]:
        build_config(config_class(), inject(section, None), source=f"{name} section")
        return section

    def run(context: StageContext) -> StageOutput:
        module = importlib.import_module(module_name)
        config = build_config(config_class(), inject(context.section, context), source=f"{name} section")
        run_function = getattr(module, f"run_{name}")
        if "force" in inspect.signature(run_function).parameters:
            result = run_function(config, force=context.force)
        else:
            result = run_function(config)
        outputs, metrics = _training_outputs(name, module, config, result)
        if "ap" in metrics:
            summary = f"AP {metrics['ap']:.3f}"
        else:
            summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("steps", "train_loss_epoch"))
        if outputs.get("resumed_from_steps"):  # Train v2 restored the latest checkpoint of an interrupted run
            summary += f" (resumed at step {outputs['resumed_from_steps'][-1]})"
        return StageOutput(outputs=outputs, metrics=metrics, summary=summary)

    return StageSpec(name, needs_inputs, validate, run, needs=module_name, optional_inputs=optional_inputs)


def _numbers(raw: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _training_outputs(name: str, module: Any, config: Any, result: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """(outputs, metrics) of a training stage from what its run function returned.

    tune and distill return their own record (a dict with `checkpoint` and `metrics`); pretrain and
    finetune return a Ray Train `Result` whose run directory holds `<stage>_export` (for finetune the
    best-val-AP model, whose AP is the loop's `best`, not the last epoch's).
    """
    from pipelines.train import run_uri

    if isinstance(result, dict):
        metrics = _numbers(result.get("metrics") or {})
        outputs = {"checkpoint": result.get("checkpoint"), "out": getattr(config, "out", None)}
        for key in ("trial_id", "params", "teacher_source", "token_checkpoint"):
            if key in result:
                outputs[key] = result[key]
        return outputs, metrics
    if getattr(result, "error", None):
        raise RuntimeError(f"{name} failed: {result.error}")
    stage = getattr(module, name.upper())
    run = run_uri(stage, config)
    export = storage.join(run, f"{name}_export")
    metrics = _numbers(result.metrics or {})
    summary = result.return_value or {}
    if summary.get("best") is not None:
        metrics["ap"] = float(summary["best"])
    metrics["steps"] = float(summary.get("step", metrics.get("step", 0)))
    has_export = bool(storage.list_files(export, recursive=True))  # also right on s3://, where dirs are implicit
    outputs = {"checkpoint": export if has_export else None, "run": run,
               "resumed_from_steps": summary.get("resumed_from", [])}
    return outputs, metrics


# ---------------------------------------------------------------------------------------------- register


# ------------------------------------------------------------------------------------------------ serve


def validate_serve(section: dict[str, Any]) -> dict[str, Any]:
    from pipelines.serve_stage import ServeStageSection

    build_config(ServeStageSection, section, source="serve section")
    return section


def run_serve(context: StageContext) -> StageOutput:
    from pipelines.serve_stage import ServeStageSection, run_serve_stage

    return run_serve_stage(context, build_config(ServeStageSection, context.section, source="serve section"))


STAGES: list[StageSpec] = [
    StageSpec("shard", (), validate_shard, run_shard_stage, needs="pipelines.shard"),
    _training_stage("pretrain", ("shard",)),
    _training_stage("finetune", ("shard",), ("pretrain",)),
    _training_stage("tune", ("shard",), ("pretrain", "finetune")),
    _training_stage("distill", ("shard",), ("tune", "finetune")),
    StageSpec("register", ("shard",), validate_register, run_register_stage, needs="pipelines.registry",
              optional_inputs=("finetune", "tune", "distill")),
    StageSpec("serve", ("register",), validate_serve, run_serve, cacheable=False, needs="pipelines.serve.app"),
]
