"""The tune stage in `vitpose run`: a sweep whose trials start from the finetune stage's best model.

The trials' base config derives from the pipeline's finetune section (variant, input size, data,
scaling, precision, ...) with the tune section's own `finetune:` keys laid over it, so a cluster config
whose tune section names only its search space sweeps the cluster's model, not a laptop default.
"""

from __future__ import annotations

from typing import Any

from pipelines.config import build_config, deep_merge
from pipelines.contract import Sections, StageOutput, StageSpec, Upstream, placeholder
from pipelines.training.spec import training_resources
from pipelines.tune.config import TuneConfig, trial_finetune_config


def section(sections: Sections) -> dict[str, Any]:
    tune = dict(sections.get("tune", {}))
    base = {key: value for key, value in sections.get("finetune", {}).items() if key != "checkpoint"}
    tune["finetune"] = deep_merge(base, tune.get("finetune", {}))
    return tune


def build(section: dict[str, Any], upstream: Upstream | None) -> TuneConfig:
    data = dict(section)
    if upstream is None:
        data.setdefault("out", "<workdir>/tune/out")
        data.setdefault("shards", placeholder("shard", "shards"))
        data.setdefault("pretrain_checkpoint", placeholder("finetune", "checkpoint"))
    else:
        data.setdefault("out", upstream.path("out"))
        data.setdefault("shards", upstream.output("shard", "shards"))
        # trials sweep on top of the finetune stage's best model when there is one (load_checkpoint resizes
        # its position embeddings to each trial's input size), else from the MAE encoder
        start = upstream.output("finetune", "checkpoint") or upstream.output("pretrain", "checkpoint")
        if start:
            data.setdefault("pretrain_checkpoint", start)
        data["tracking"] = {**data.get("tracking", {}), "tracking_uri": upstream.tracking_uri,
                            "experiment": upstream.experiment, "parent_run_id": upstream.parent_run_id}
    return build_config(TuneConfig, data, source="tune section")


def run(config: TuneConfig, upstream: Upstream, force: bool) -> StageOutput:
    from pipelines.tune.run import run_tune

    return run_tune(config, force=force)


def resources(config: TuneConfig) -> dict[str, Any]:
    trial = trial_finetune_config(config, {}, "plan")
    return {"concurrent_trials": config.max_concurrent_trials, "trial_driver_cpus": config.trial_driver_cpus,
            "per_trial": training_resources(trial)}


SPEC = StageSpec("tune", inputs=("shard",), optional_inputs=("pretrain", "finetune"), section=section, build=build,
                 run=run, resources=resources)
