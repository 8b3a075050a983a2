"""What the pipeline fills into every training stage's config, and what such a stage asks of the cluster."""

from __future__ import annotations

from typing import Any

from pipelines.config import deep_merge
from pipelines.contract import Upstream, placeholder
from pipelines.training.sections import ScalingSection
from pipelines.training.trainer import worker_resources


def with_pipeline_owned(stage: str, section: dict[str, Any], upstream: Upstream | None) -> dict[str, Any]:
    """`section` plus the shard stage's output as `data.shards` and `<workdir>/<stage>/train` as the Ray Train
    storage (both unless the section names its own), and the MLflow run to nest under (always).

    The storage path is fixed per stage, so a rerun after a kill finds the same Train run and resumes."""
    if upstream is None:
        defaults = {"data": {"shards": placeholder("shard", "shards")},
                    "checkpoint": {"storage_path": f"<workdir>/{stage}/train"}}
        return deep_merge(defaults, section)
    defaults = {"data": {"shards": upstream.output("shard", "shards")},
                "checkpoint": {"storage_path": upstream.path("train")}}
    tracking = {"tracking": {"tracking_uri": upstream.tracking_uri, "experiment": upstream.experiment,
                             "parent_run_id": upstream.parent_run_id}}
    return deep_merge(deep_merge(defaults, section), tracking)


def training_resources(config: Any) -> dict[str, Any]:
    """Workers, what each reserves, and how the model is split over them; with ``data.preprocess.where:
    ray_data``, also what each transform task reserves."""
    scaling: ScalingSection = config.scaling
    resources = {"workers": scaling.num_workers, "per_worker": worker_resources(scaling),
                 "strategy": scaling.strategy, "precision": scaling.precision}
    preprocess = config.data.preprocess
    if preprocess.where == "ray_data":
        resources["per_transform_task"] = {"CPU": preprocess.num_cpus, **preprocess.resources}
    return resources
