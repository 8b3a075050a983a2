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


def _training_stage(name: str, needs_inputs: tuple[str, ...], optional_inputs: tuple[str, ...] = ()) -> StageSpec:
    """A Ray Train stage from `pipelines.<name>`: `<Name>Config` + `run_<name>(config) -> ray Result`.

    The pipeline fills `data.shards`, `checkpoint.storage_path` (<workdir>/<stage>/train, so the
    stage's config-hash run name resumes an interrupted run), the MLflow parent run and, for
    finetune, `model.pretrained` from the pretrain stage's exported encoder.
    """
    module_name = f"pipelines.{name}"

    def config_class() -> type:
        return getattr(importlib.import_module(module_name), f"{name.capitalize()}Config")

    def inject(section: dict[str, Any], context: StageContext | None) -> dict[str, Any]:
        fields = config_class().model_fields
        data = {key: dict(value) if isinstance(value, dict) else value for key, value in section.items()}
        upstream = {n: r.get("outputs", {}) for n, r in context.inputs.items()} if context else {}
        shards = upstream.get("shard", {}).get("shards", "<shard>/out")
        # flat stage configs (tune, distill) take the URIs at the top level
        if "out" in fields:
            data.setdefault("out", context.path("out") if context else "<stage>/out")
        if "shards" in fields:
            data.setdefault("shards", shards)
        if "pretrain_checkpoint" in fields and upstream.get("pretrain", {}).get("checkpoint"):
            data.setdefault("pretrain_checkpoint", upstream["pretrain"]["checkpoint"])
        teacher = upstream.get("tune", upstream.get("finetune", {})).get("checkpoint")
        if "teacher" in fields and teacher:
            data.setdefault("teacher", teacher)
        if "data" in fields:
            data.setdefault("data", {})
            data["data"].setdefault("shards", shards)
        if "checkpoint" in fields:
            data.setdefault("checkpoint", {})
            data["checkpoint"].setdefault("storage_path", context.path("train") if context else "<stage>/train")
        if "model" in fields and upstream.get("pretrain", {}).get("checkpoint"):
            data.setdefault("model", {})
            data["model"].setdefault("pretrained", upstream["pretrain"]["checkpoint"])
        if "tracking" in fields and context is not None:
            data["tracking"] = {**data.get("tracking", {}), "tracking_uri": context.tracking_uri,
                                "experiment": context.config.mlflow.experiment, "parent_run_id": context.run_id}
        return data

    def validate(section: dict[str, Any]) -> dict[str, Any]:
        build_config(config_class(), inject(section, None), source=f"{name} section")
        return section

    def run(context: StageContext) -> StageOutput:
        from pipelines.train import run_uri

        module = importlib.import_module(module_name)
        config = build_config(config_class(), inject(context.section, context), source=f"{name} section")
        run_function = getattr(module, f"run_{name}")
        if "force" in inspect.signature(run_function).parameters:
            result = run_function(config, force=context.force)
        else:
            result = run_function(config)
        if isinstance(result, dict):  # stages that write their own record (tune): checkpoint + metrics
            raw_metrics, outputs = result.get("metrics") or {}, {"checkpoint": result.get("checkpoint"),
                                                                 "out": getattr(config, "out", None)}
        else:  # a Ray Train Result: the best model is exported under the run directory
            if getattr(result, "error", None):
                raise RuntimeError(f"{name} failed: {result.error}")
            stage = getattr(module, name.upper())
            export = storage.join(run_uri(stage, config), f"{name}_export")
            raw_metrics = result.metrics or {}
            outputs = {"checkpoint": export if storage.exists(export) else None, "run": run_uri(stage, config)}
        metrics = {k: float(v) for k, v in raw_metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if "val_AP" in metrics:
            metrics.setdefault("ap", metrics["val_AP"])
        summary = f"AP {metrics['ap']:.3f}" if "ap" in metrics else \
            ", ".join(f"{k} {v:.4g}" for k, v in list(metrics.items())[:2] if "loss" in k)
        return StageOutput(outputs=outputs, metrics=metrics, summary=summary)

    return StageSpec(name, needs_inputs, validate, run, needs=module_name, optional_inputs=optional_inputs)


# ---------------------------------------------------------------------------------------------- register


class RegisterSection(StrictConfig):
    """Pick the best model of the candidate stages by `metric` and point `<model_name>@<alias>` at it."""

    model_name: str = "vitpose"
    alias: str = "champion"
    metric: str = "ap"
    candidates: tuple[str, ...] = ("finetune", "tune", "distill")


def run_register_stage(context: StageContext) -> StageOutput:
    from pipelines import registry

    section: RegisterSection = context.section
    scored = [(record.get("metrics", {}).get(section.metric), name, record) for name, record in context.inputs.items()
              if name in section.candidates and record.get("outputs", {}).get("checkpoint")]
    scored = [item for item in scored if item[0] is not None]
    if not scored:
        raise RuntimeError(f"no candidate among {section.candidates} reported metric {section.metric!r} "
                           "and a checkpoint; nothing to register")
    score, winner, record = max(scored, key=lambda item: item[0])
    model_uri = registry.log_checkpoint_model(record["outputs"]["checkpoint"], run_id=context.run_id,
                                              tracking_uri=context.tracking_uri,
                                              metadata={"stage": winner, section.metric: score})
    version = registry.register(model_uri, section.model_name, tracking_uri=context.tracking_uri)
    registry.set_alias(section.model_name, section.alias, version, tracking_uri=context.tracking_uri)
    return StageOutput(outputs={"model_uri": f"models:/{section.model_name}@{section.alias}", "version": version,
                                "winner": winner, "checkpoint": record["outputs"]["checkpoint"]},
                       metrics={section.metric: float(score)},
                       summary=f"{section.model_name} v{version} @{section.alias} from {winner}, "
                               f"{section.metric.upper()} {score:.3f}")


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
    _training_stage("tune", ("shard",), ("pretrain",)),
    _training_stage("distill", ("shard",), ("tune", "finetune")),
    StageSpec("register", (), lambda section: build_config(RegisterSection, section, source="register section"),
              run_register_stage, needs="pipelines.registry", optional_inputs=("finetune", "tune", "distill")),
    StageSpec("serve", ("register",), validate_serve, run_serve, cacheable=False, needs="pipelines.serve.app"),
]
