"""`vitpose plan`: every stage's effective config and the resources it will ask for, with no compute.

The effective config is what the stage itself builds from the pipeline file: its section derived from
the sections above it, `--set` applied, strictly validated, with placeholders such as `<shard.shards>`
where an upstream record will supply a URI. Before anything runs, the plan also fails, naming the stage
and the key, on inconsistencies between stages that it can see:

* a tune trial whose model variant differs from the finetune stage's: trials start from finetune's
  checkpoint, which cannot load into another variant (position embeddings are resized, widths are not);
* a distillation with the knowledge token on but no full-attention teacher among tune and finetune;
* a training worker, Serve replica or shard task asking for more of a resource (GPUs, CPUs, custom node
  resources) than any node type of the cluster config (`ray_cluster.yaml`) offers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError, dump_config
from pipelines.pipeline import STAGES, PipelineConfig, validate_sections
from pipelines.tune.config import trial_finetune_config

DEFAULT_CLUSTER = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def node_types(cluster_file: str | Path) -> dict[str, dict[str, float]]:
    """Node type name -> the resources it advertises, from a Ray cluster launcher YAML."""
    data = yaml.safe_load(Path(cluster_file).read_text()) or {}
    types = data.get("available_node_types") or {}
    if not types:
        raise ConfigError(f"{cluster_file} has no available_node_types")
    return {name: {key: float(value) for key, value in (spec.get("resources") or {}).items()}
            for name, spec in types.items()}


def build_plan(config: PipelineConfig, cluster_file: str | Path | None = DEFAULT_CLUSTER,
               check_cluster: bool = True) -> dict[str, Any]:
    """{"stages": {stage: effective config}, "resources": {stage: ...}}; raises ConfigError on an inconsistency."""
    configs = validate_sections(config)
    problems = _consistency_problems(configs)
    resources = {spec.name: spec.resources(configs[spec.name]) for spec in STAGES if spec.name in configs}
    if check_cluster and cluster_file is not None and _needs_gpus(configs):
        problems += _resource_problems(resources, node_types(cluster_file), cluster_file)
    if problems:
        raise ConfigError("pipeline plan problems:\n" + "\n".join(problems))
    stages = {name: _shown(stage_config) for name, stage_config in configs.items()}
    # tune's base as every trial gets it (the derived section validated as a FinetuneConfig), not the raw dict
    stages["tune"]["finetune"] = _shown(trial_finetune_config(configs["tune"], {}, "plan"))
    return {"stages": stages, "resources": resources, "models": _models(configs)}


def _shown(stage_config: Any) -> dict[str, Any]:
    """A config as the run uses it: a training stage streams crops at `model.input_size`, whatever the
    stream section's own default says."""
    shown = dump_config(stage_config)
    if "model" in shown and "stream" in shown.get("data", {}):
        shown["data"]["stream"]["input_size"] = shown["model"]["input_size"]
    return shown


def _models(configs: dict[str, Any]) -> dict[str, Any]:
    """Which model each training stage trains, and which the distill teacher can be (tune's or finetune's)."""
    tune = configs["tune"]
    trial_variants = sorted({trial_finetune_config(tune, {name: value}, "plan").model.variant
                             for name, axis in tune.search_space.items() for value in axis.examples()}
                            | {trial_finetune_config(tune, {}, "plan").model.variant})
    finetune_variant = configs["finetune"].model.variant
    return {"pretrain": configs["pretrain"].model.variant, "finetune": finetune_variant, "tune_trials": trial_variants,
            "distill_teacher": sorted(set(trial_variants) | {finetune_variant}),
            "distill_student": configs["distill"].model.variant}


def _consistency_problems(configs: dict[str, Any]) -> list[str]:
    problems = []
    finetune, tune, distill = configs["finetune"], configs["tune"], configs["distill"]
    variant = finetune.model.variant
    trial_values = [{}] + [{name: value} for name, axis in tune.search_space.items() for value in axis.examples()]
    trials = [(values, trial_finetune_config(tune, values, "plan")) for values in trial_values]
    reported = set()
    for values, trial in trials:
        if trial.model.variant != variant and trial.model.variant not in reported:
            reported.add(trial.model.variant)
            key = f"tune.search_space.{next(iter(values))}" if values else "tune.finetune.model.variant"
            problems.append(f"[tune] {key} gives trials the variant {trial.model.variant!r} but the finetune stage "
                            f"trains {variant!r}: trials start from finetune's checkpoint, which cannot load into "
                            "another variant")
    if distill.distill.knowledge_token:
        attentions = {finetune.model.attention} | {trial.model.attention for _, trial in trials}
        if "full" not in attentions:
            problems.append("[distill] distill.distill.knowledge_token needs a full-attention teacher, but tune and "
                            f"finetune train only {sorted(attentions)}; set distill.distill.knowledge_token=false "
                            "or give tune a full-attention trial")
    return problems


def _needs_gpus(configs: dict[str, Any]) -> bool:
    training = [configs[name].scaling.use_gpu for name in ("pretrain", "finetune", "distill")]
    detect = "detect" in configs and configs["detect"].resources.num_gpus > 0
    return any(training) or detect or configs["serve"].resources.model_num_gpus > 0


@dataclass(frozen=True)
class AskKeys:
    """How a resource ask is named in the config: the keys of CPU / GPU, where custom resources live, per what."""
    named: dict[str, str]
    custom: str
    unit: str


TRAINING_KEYS = AskKeys({"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}, "node_resources.", "worker")
SERVE_KEYS = AskKeys({"CPU": "model_num_cpus", "GPU": "model_num_gpus"}, "node_resources.", "replica")
DETECT_KEYS = AskKeys({"CPU": "num_cpus", "GPU": "num_gpus"}, "node_resources.", "task")
TRANSFORM_KEYS = AskKeys({"CPU": "num_cpus"}, "resources.", "task")  # data.preprocess of a training stage


def _resource_problems(resources: dict[str, Any], nodes: dict[str, dict[str, float]], cluster_file: Any) -> list[str]:
    """Each worker / replica / task must fit on one node of some node type; a problem names the config key."""
    tune_trial = resources["tune"]["per_trial"]
    asks = [("pretrain", "pretrain.scaling", resources["pretrain"]["per_worker"], TRAINING_KEYS),
            ("finetune", "finetune.scaling", resources["finetune"]["per_worker"], TRAINING_KEYS),
            ("tune", "tune.finetune.scaling", tune_trial["per_worker"], TRAINING_KEYS),
            ("distill", "distill.scaling", resources["distill"]["per_worker"], TRAINING_KEYS),
            ("serve", "serve.resources", resources["serve"]["per_model_replica"], SERVE_KEYS)]
    for stage, prefix, training in (("pretrain", "pretrain", resources["pretrain"]),
                                    ("finetune", "finetune", resources["finetune"]),
                                    ("tune", "tune.finetune", tune_trial), ("distill", "distill", resources["distill"])):
        if "per_transform_task" in training:  # data.preprocess.where: ray_data
            asks.append((stage, f"{prefix}.data.preprocess", training["per_transform_task"], TRANSFORM_KEYS))
    if "detect" in resources:  # optional stage: only when the pipeline file has its section
        asks.append(("detect", "detect.resources", resources["detect"]["per_task"], DETECT_KEYS))
    problems = []
    for stage, prefix, ask, keys in asks:
        if any(all(offer.get(k, 0.0) >= v for k, v in ask.items() if v) for offer in nodes.values()):
            continue
        for resource, value in ask.items():
            most = max(offer.get(resource, 0.0) for offer in nodes.values())
            if value > most:
                key = f"{prefix}.{keys.named.get(resource, keys.custom + resource)}"
                problems.append(f"[{stage}] {key} = {value:g} {resource} per {keys.unit}, but no node type of "
                                f"{cluster_file} offers more than {most:g} {resource}")
        if not any(problem.startswith(f"[{stage}] {prefix}.") for problem in problems):  # each fits, not together
            problems.append(f"[{stage}] {prefix} asks {ask} per {keys.unit}; no single node type of {cluster_file} "
                            "offers all of it")
    return problems
