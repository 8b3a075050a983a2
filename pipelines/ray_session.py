"""The Ray side of `vitpose run`: joining or starting the cluster, and cleaning up after each stage."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def ensure_ray(config: Any) -> str:
    """Join the cluster of a `ray job submit` job (RAY_ADDRESS), or start a private local one."""
    import ray

    if ray.is_initialized():
        return "existing"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return os.environ["RAY_ADDRESS"]
    # Ray Data's per-operator bars redraw with carriage returns; the pipeline draws its own per-stage bars
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=config.ray.include_dashboard,
             log_to_driver=config.ray.log_to_driver)
    return f"local ({ray.get_runtime_context().gcs_address}, {int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def own_placement_groups() -> set[str]:
    """Ids of this job's placement groups that still hold resources (job id = the id's last 4 bytes)."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    return {pg_id for pg_id, info in ray.util.placement_group_table().items()
            if pg_id.endswith(job) and info["state"] != "REMOVED"}


def release_placement_groups(before: set[str]) -> None:
    """Remove the placement groups a finished stage left behind.

    Tune trials that ASHA stops (and finished trials) leave their Train run's placement group reserved
    in Ray 2.60: Train's PlacementGroupCleaner asks the state API, which needs a dashboard and a unique
    cluster address, and without them it dies. On 2 cores the two leaked 0.45-CPU groups starved the
    next stage's Ray Data reads forever. Stages run one after another and hand over only records, so
    nothing a stage created may outlive it; only this job's groups are touched.
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id in sorted(own_placement_groups() - before):
        logger.info("removing placement group %s left behind by the stage", pg_id)
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
