"""The tune stage's config: the base finetune config of every trial, the search space and ASHA."""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import Field, model_validator

from pipelines import storage
from pipelines.config import StrictConfig, build_config, config_hash
from pipelines.tracking import TrackingConfig

TRIALS_DIR = "trials"  # Ray Train storage of the trials' Train runs: <out>/trials/train-<trial_id>


class SearchAxis(StrictConfig):
    """One axis of the search space; exactly one field is set."""

    grid: list[Any] | None = Field(None, description="every value, crossed with the other grid axes")
    choice: list[Any] | None = Field(None, description="one value drawn uniformly per sample")
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchAxis:
        kinds = [name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a search axis takes exactly one of grid/choice/uniform/loguniform, got {kinds or 'none'}")
        return self

    def to_tune(self) -> Any:
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)

    def examples(self) -> list[Any]:
        """Values that together exercise every key this axis can set (for validation)."""
        return list(self.grid or self.choice or []) or [(self.uniform or self.loguniform)[0]]


class AshaSection(StrictConfig):
    max_t: int | None = Field(None, ge=1, description="epochs a trial may run; None: the finetune schedule's epochs")
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class TuneConfig(StrictConfig):
    out: str = Field(..., description="output directory (local or s3://): Tune experiment, trials, winner.json")
    shards: str = Field(..., description="shard stage output, given to every trial as data.shards")
    name: str = Field("tune", description="experiment name; the config hash is appended, so reruns restore")
    finetune: dict[str, Any] = Field(default_factory=dict, description="the base FinetuneConfig of every trial "
                                     "(without data.shards); in a pipeline file it starts from the finetune section")
    search_space: dict[str, SearchAxis] = Field(default_factory=dict, description="{axis: values}; empty: "
                                                "num_samples trials of the base config")
    num_samples: int = Field(1, ge=1, description="samples of the random axes per grid point")
    metric: str = "val_AP"
    asha: AshaSection = AshaSection()
    max_concurrent_trials: int = Field(2, ge=1, description="set from the limiting resource (GPUs, CPUs)")
    trial_driver_cpus: float = Field(0.05, gt=0, description="the trial actor only builds and waits on a Train run")
    max_trial_failures: int = Field(1, ge=0)
    pretrain_checkpoint: str | None = Field(None, description="start of every trial (model.pretrained): an MAE "
                                            "encoder or a ViTPose checkpoint (in a pipeline: finetune's best model)")
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _trial_configs_are_valid(self) -> TuneConfig:
        # every value of every axis must make a valid FinetuneConfig: a typo fails here, not in trial 3
        for axis_name, axis in self.search_space.items():
            for value in axis.examples():
                trial_finetune_config(self, {axis_name: value}, f"search_space {axis_name}={json.dumps(value)}")
        return self

    @property
    def experiment_name(self) -> str:
        """``<name>-<config hash>``: the same sweep config restores the same Tune experiment."""
        return f"{self.name}-{config_hash(self)}"


def trial_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Trial params (``{axis: value}``) -> ``{finetune key: value}``; mapping values are coupled keys."""
    overrides: dict[str, Any] = {}
    for axis, value in params.items():
        overrides.update(value if isinstance(value, dict) else {axis: value})
    return overrides


def trial_finetune_config(config: TuneConfig, params: dict[str, Any], trial_id: str,
                          tracking: dict[str, Any] | None = None):
    """The finetune config of one trial: the base, the sweep's storage/tracking, then the trial's values."""
    from pipelines.finetune.config import FinetuneConfig

    data = copy.deepcopy(config.finetune)
    data.setdefault("data", {})["shards"] = config.shards
    if config.pretrain_checkpoint:
        data.setdefault("model", {})["pretrained"] = config.pretrain_checkpoint
    # one report per epoch: every report carries val_AP (Tune's strict metric check) and is one ASHA step
    data["checkpoint"] = {**data.get("checkpoint", {}), "storage_path": storage.join(config.out, TRIALS_DIR),
                          "every_n_steps": 10**9}
    if tracking is not None:
        data["tracking"] = {**data.get("tracking", {}), "enabled": tracking.get("enabled", False),
                            "tracking_uri": tracking.get("tracking_uri"), "experiment": config.tracking.experiment,
                            "parent_run_id": tracking.get("sweep_run_id"), "run_name": f"trial-{trial_id}"}
    overrides = [f"{key}={json.dumps(value)}" for key, value in trial_overrides(params).items()]
    return build_config(FinetuneConfig, data, overrides, source=f"tune trial {trial_id}")
