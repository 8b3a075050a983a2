"""`vitpose run`: every stage, in order, as one MLflow parent run with a child run per stage.

    shard -> [detect] -> pretrain -> finetune -> tune -> distill -> register -> serve

The orchestrator only lists the stages (`STAGES`, one `StageSpec` from each stage package) and runs
them through the stage contract (`pipelines.contract`): each stage's effective section (derived from
the sections above it), its typed config (with upstream URIs from the records), its run. Each stage
writes its artifacts under `<workdir>/<stage>/` and, last, its record `<workdir>/<stage>/stage.json`.
A rerun skips a stage whose record matches the stage's current config hash and the fingerprints of its
upstream records, so exactly the stale stages run again; an interrupted stage has no record, runs
again and resumes from its own checkpoints (the training stages keep their Ray Train runs under a
fixed path in their stage directory). Nothing moves between stages through the driver's memory.
An optional stage (detect) runs only when the pipeline file has its section (`pipeline_specs`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines import storage
from pipelines.config import ConfigError, StrictConfig, config_hash, dump_config
from pipelines.contract import (
    RECORD_NAME,
    RECORD_VERSION,
    Sections,
    StageResult,
    StageSpec,
    Upstream,
    code_version,
    read_record,
    record_fingerprint,
    write_record,
)
from pipelines.detect.spec import SPEC as DETECT
from pipelines.distill.spec import SPEC as DISTILL
from pipelines.finetune.spec import SPEC as FINETUNE
from pipelines.pretrain.spec import SPEC as PRETRAIN
from pipelines.register.spec import SPEC as REGISTER
from pipelines.serve.spec import SPEC as SERVE
from pipelines.shard.spec import SPEC as SHARD
from pipelines.tune.spec import SPEC as TUNE

logger = logging.getLogger(__name__)

STAGES: list[StageSpec] = [SHARD, DETECT, PRETRAIN, FINETUNE, TUNE, DISTILL, REGISTER, SERVE]
STAGE_NAMES = tuple(spec.name for spec in STAGES)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "local.yaml"


class MlflowSection(StrictConfig):
    """Where runs and the model registry live.

    `tracking_uri: null` takes `MLFLOW_TRACKING_URI` from the environment (cluster configs), and
    without it a SQLite store inside the workdir (`<workdir>/mlflow.db`, artifacts in
    `<workdir>/mlartifacts`). Paths are made absolute: Ray workers chdir into their run directories.
    """

    tracking_uri: str | None = None
    experiment: str = "vitpose"
    artifact_location: str | None = None  # None: <workdir>/mlartifacts for a local store, server default otherwise


class RayInitSection(StrictConfig):
    """How the driver joins Ray. With RAY_ADDRESS set (a `ray job submit` job) it joins that cluster."""

    num_cpus: int | None = Field(None, ge=1, description="local cluster only; None: all cores")
    include_dashboard: bool = False
    log_to_driver: bool = Field(False, description="local cluster only: echo every worker's log lines here; off, "
                                "the console shows stage lines and progress bars, worker logs stay in Ray's "
                                "session dir (/tmp/ray/session_latest/logs) and errors still reach the driver")
    # Ray 2.60 turns token auth on for local clusters by default; the private cluster `vitpose run`
    # starts listens on 127.0.0.1 and lives as long as the command. Ignored when joining a cluster.
    auth_mode: Literal["token", "disabled"] | None = None


class PipelineConfig(StrictConfig):
    """The whole pipeline: shared settings plus one section per stage (each validated by its stage)."""

    name: str = "local"
    workdir: str = "vitpose_runs"
    stages: tuple[str, ...] | None = None  # None: every stage in order
    mlflow: MlflowSection = MlflowSection()
    ray: RayInitSection = RayInitSection()
    # stage sections: free-form here, strictly validated by each stage's own config class, so an unknown
    # key anywhere is still an error
    shard: dict[str, Any] = {}
    pretrain: dict[str, Any] = {}
    finetune: dict[str, Any] = {}
    tune: dict[str, Any] = {}
    distill: dict[str, Any] = {}
    detect: dict[str, Any] | None = None  # optional stage: None (no `detect:` section) leaves it out
    # `register` would shadow a method pydantic models inherit (ABCMeta.register): store it under an alias
    register_: dict[str, Any] = Field({}, alias="register")
    serve: dict[str, Any] = {}

    @property
    def workdir_uri(self) -> str:
        return storage.normalize(self.workdir)

    def sections(self) -> Sections:
        """Every stage's section; an optional stage without one is absent (its spec and others can tell)."""
        sections = {name: getattr(self, "register_" if name == "register" else name) for name in STAGE_NAMES}
        return {name: dict(section) for name, section in sections.items() if section is not None}


def pipeline_specs(config: PipelineConfig, specs: list[StageSpec] | None = None) -> list[StageSpec]:
    """The stages this pipeline file runs: every stage, less the optional ones it has no section for."""
    present = config.sections()
    return [spec for spec in specs or STAGES if not spec.optional or spec.name in present]


def select_stages(all_names: list[str], stages: list[str] | None = None, start: str | None = None) -> list[str]:
    """The stages to run, in pipeline order, from `--stages a,b` or `--from name` (not both)."""
    if stages is not None and start:
        raise ValueError("give either --stages or --from, not both")
    if stages is not None and not stages:
        raise ConfigError(f"the stage selection is empty; name stages from: {', '.join(all_names)}")
    for name in [*(stages or []), *([start] if start else [])]:
        if name not in all_names:
            raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(all_names)}")
    if start:
        return all_names[all_names.index(start):]
    if stages is not None:
        return [name for name in all_names if name in stages]
    return list(all_names)


def effective_sections(config: PipelineConfig, specs: list[StageSpec] | None = None) -> dict[str, dict[str, Any]]:
    """Every stage's effective section: what its own section says, derived from the sections above it."""
    sections = config.sections()
    return {spec.name: spec.section(sections) for spec in specs or pipeline_specs(config)}


def validate_sections(config: PipelineConfig, specs: list[StageSpec] | None = None) -> dict[str, Any]:
    """Every stage's config object as the stage builds it before anything has run (placeholders for the
    upstream URIs); every problem is collected and reported at once, each under its stage's name."""
    configs, problems = {}, []
    for spec in specs or pipeline_specs(config):
        try:
            configs[spec.name] = spec.build(spec.section(config.sections()), None)
        except ConfigError as error:
            problems.append(f"[{spec.name}] {error}")
    if problems:
        raise ConfigError("pipeline config problems:\n" + "\n".join(problems))
    return configs


def load_pipeline_config(path: str | Path | None = None, overrides: list[str] | None = None,
                         overlays: list[str | Path] | None = None) -> PipelineConfig:
    """A PipelineConfig from YAML (default: the embedded `pipelines/configs/local.yaml`), each `--overlay` YAML
    deep-merged over it in order (mappings merge key by key, lists and values replace), then `--set`
    overrides, with every stage's config validated strictly by that stage."""
    from pipelines.config import build_config, deep_merge, load_yaml

    source = str(path or DEFAULT_CONFIG)
    data = load_yaml(path or DEFAULT_CONFIG)
    for overlay in overlays or []:
        data = deep_merge(data, load_yaml(overlay))
        source += f" + overlay {overlay}"
    config = build_config(PipelineConfig, data, overrides, source=source)
    validate_sections(config)
    return config


def run_pipeline(config: PipelineConfig, stages: list[str] | None = None, start: str | None = None,
                 force: bool = False, specs: list[StageSpec] | None = None,
                 reporter: Any = None) -> list[StageResult]:
    """Run the selected stages in order; returns one result per pipeline stage (selected or not).

    Args:
        config: the pipeline config (see `load_pipeline_config`).
        stages: names to run (default: `config.stages`, else all); `start`: run from this stage on.
        force: rerun the selected stages even when their records match.
        specs: the stage list (default `STAGES`).
        reporter: progress output (default `pipelines.progress.Reporter` on stdout).
    """
    from pipelines.progress import Reporter
    from pipelines.session import (
        connect_ray,
        experiment_id,
        mlflow_client,
        prints_to_log,
        resolve_tracking_uri,
        route_library_logs,
    )
    from pipelines.tracking import supersede_pipeline_attempts

    specs = specs or pipeline_specs(config)
    reporter = reporter or Reporter()
    names = [spec.name for spec in specs]
    requested = [*(stages if stages is not None else config.stages or []), *([start] if start else [])]
    absent = [name for name in requested if name in STAGE_NAMES and name not in names]
    if absent:
        raise ConfigError(f"stage(s) {absent} have no section in this pipeline file: add one (e.g. `detect:`, "
                          "see pipelines/configs/local_detect.yaml) to run them")
    selected = select_stages(names, stages if stages is not None else
                             (list(config.stages) if config.stages is not None else None), start)
    validate_sections(config, specs)
    workdir = config.workdir_uri
    tracking_uri, default_artifacts = resolve_tracking_uri(config.mlflow.tracking_uri, workdir)
    # the tracking store first: a server that cannot be reached fails the run before a Ray cluster starts
    client = mlflow_client(tracking_uri)
    experiment = experiment_id(client, config.mlflow.experiment, config.mlflow.artifact_location or default_artifacts)
    # Ray processes started from here inherit it; restored at the end, or the next run_pipeline in this
    # process would read it as the user's choice and log into this run's store
    previous_tracking_env = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    where = connect_ray(num_cpus=config.ray.num_cpus, include_dashboard=config.ray.include_dashboard,
                        log_to_driver=config.ray.log_to_driver, auth_mode=config.ray.auth_mode)
    parent = client.create_run(experiment, run_name=f"pipeline-{config.name}",
                               tags={"vitpose.pipeline": config.name, "vitpose.workdir": workdir,
                                     "vitpose.code_version": code_version()})
    parent_id = parent.info.run_id
    client.log_param(parent_id, "stages", ",".join(selected))
    client.log_param(parent_id, "workdir", workdir)
    client.log_dict(parent_id, dump_config(config), "pipeline_config.json")
    # a killed attempt (SIGKILL: no `finally`) left its pipeline run and the runs beneath it RUNNING
    supersede_pipeline_attempts(client, experiment, config.name, workdir, parent_id)
    reporter.start(config, selected, workdir=workdir, tracking_uri=tracking_uri, ray=where)

    sections = effective_sections(config, specs)
    run_context = _RunContext(config, client, experiment, parent_id, tracking_uri, reporter, force, names)
    results: list[StageResult] = []
    status = "FAILED"
    try:
        for index, spec in enumerate(specs):
            if spec.name not in selected:
                results.append(StageResult(spec.name, "not-selected", record=read_record(storage.join(workdir, spec.name))))
                continue
            route_library_logs()  # a library imported by the previous stage may have added a console handler
            with prints_to_log():
                results.append(_run_stage(spec, sections[spec.name], run_context, index, len(specs)))
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
        if previous_tracking_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_tracking_env
        reporter.finish(results, parent_run_id=parent_id, ok=status == "FINISHED")
    return results


class _RunContext:
    """What every stage of one `run_pipeline` call shares."""

    def __init__(self, config: PipelineConfig, client: Any, experiment_id: str, parent_id: str, tracking_uri: str,
                 reporter: Any, force: bool, stage_names: list[str]) -> None:
        self.config, self.client, self.experiment_id, self.parent_id = config, client, experiment_id, parent_id
        self.tracking_uri, self.reporter, self.force = tracking_uri, reporter, force
        self.stage_names = stage_names  # the stages of this pipeline file (optional ones without a section left out)


def _upstream_records(spec: StageSpec, workdir: str, stage_names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for name in spec.inputs:
        record = read_record(storage.join(workdir, name))
        if record is None:
            raise RuntimeError(f"stage {spec.name!r} needs the output of {name!r}, but {storage.join(workdir, name)} "
                               f"has no {RECORD_NAME}: run {name!r} first (e.g. `vitpose run --from {name}`)")
        records[name] = record
    for name in spec.optional_inputs:
        if stage_names is not None and name not in stage_names:
            continue  # an optional stage this pipeline file leaves out: a record from an earlier run is stale
        record = read_record(storage.join(workdir, name))
        if record is not None:
            records[name] = record
    return records


def _run_stage(spec: StageSpec, section: dict[str, Any], run: _RunContext, index: int, total: int) -> StageResult:
    """Skip the stage when its record matches, otherwise run it in a child run and write its record."""
    from pipelines.progress import StageProgress
    from pipelines.session import interrupt_taken, own_placement_groups, release_placement_groups

    client, reporter = run.client, run.reporter
    stage_dir = storage.join(run.config.workdir_uri, spec.name)
    records = _upstream_records(spec, run.config.workdir_uri, run.stage_names)
    stage_hash = config_hash(section)
    input_fingerprints = {name: record_fingerprint(record) for name, record in sorted(records.items())}
    previous = read_record(stage_dir)
    reporter.stage_started(spec.name, index, total)
    if (spec.cacheable and not run.force and previous is not None and previous.get("config_hash") == stage_hash
            and previous.get("inputs") == input_fingerprints):
        skipped = client.create_run(run.experiment_id, run_name=spec.name, tags={
            "mlflow.parentRunId": run.parent_id, "vitpose.stage": spec.name, "vitpose.state": "skipped",
            "vitpose.original_run_id": previous.get("mlflow_run_id", "")})
        client.set_terminated(skipped.info.run_id, "FINISHED")  # create_run starts it RUNNING
        result = StageResult(spec.name, "skipped", 0.0, previous.get("summary", ""), previous)
        reporter.stage_finished(result, index, total)
        return result

    stage_run = client.create_run(run.experiment_id, run_name=spec.name, tags={
        "mlflow.parentRunId": run.parent_id, "vitpose.stage": spec.name, "vitpose.state": "running"})
    run_id = stage_run.info.run_id
    upstream = Upstream(records=records, stage_dir=stage_dir, tracking_uri=run.tracking_uri,
                        experiment=run.config.mlflow.experiment, parent_run_id=run_id)
    started = time.time()
    placement_groups_before = own_placement_groups()
    try:
        stage_config = spec.build(section, upstream)
        client.log_dict(run_id, dump_config(stage_config), f"{spec.name}_config.json")
        with StageProgress(client, run.experiment_id, spec.name, run_id, stream=getattr(reporter, "stream", None)):
            output = spec.run(stage_config, upstream, run.force)
    except BaseException as error:  # KeyboardInterrupt too: the child run must not stay RUNNING
        if isinstance(error, KeyboardInterrupt):
            interrupt_taken()
        client.set_tag(run_id, "vitpose.state", "failed")
        client.set_terminated(run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        reporter.stage_failed(spec.name, time.time() - started, error, index, total)
        raise
    finally:
        release_placement_groups(placement_groups_before)
    seconds = time.time() - started
    for key, value in output.metrics.items():
        client.log_metric(run_id, key, float(value))
    record = {
        "record_version": RECORD_VERSION, "stage": spec.name, "config_hash": stage_hash, "config": section,
        "inputs": input_fingerprints, "input_uris": {name: rec.get("outputs", {}) for name, rec in records.items()},
        "outputs": output.outputs, "metrics": output.metrics, "summary": output.summary,
        "code_version": code_version(), "mlflow_run_id": run_id, "started": started, "seconds": round(seconds, 2),
    }
    if spec.cacheable:
        write_record(stage_dir, record)  # last: the record marks the stage complete
    client.log_dict(run_id, record, RECORD_NAME)
    client.set_tag(run_id, "vitpose.state", "done")
    client.set_terminated(run_id, "FINISHED")
    result = StageResult(spec.name, "done", seconds, output.summary, record)
    reporter.stage_finished(result, index, total)
    return result
