"""`vitpose run`: every stage, in order, as one MLflow parent run with a child run per stage.

    shard -> pretrain -> finetune -> tune -> distill -> register -> serve

Each stage writes its artifacts under `<workdir>/<stage>/` and, last, a small record
`<workdir>/<stage>/stage.json` (config hash, the fingerprints of the upstream records it read,
outputs, metrics, code version). The record is the completion marker: a rerun skips a stage whose
record matches the stage's current config and inputs, and a change upstream (new config, new data)
changes the fingerprints downstream, so exactly the stale stages run again. A stage that was
interrupted has no record; it runs again and resumes from its own checkpoints (the training stages
reuse a fixed Ray Train run name under their stage directory, so Train v2 restores the latest
checkpoint on its own).

Stages are plain functions `StageContext -> StageOutput` listed in `pipelines.stages`; nothing moves
between them through the driver's memory, only through the URIs in their records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines import storage
from pipelines.config import StrictConfig, dump_config
from pipelines.ray_session import ensure_ray, own_placement_groups, release_placement_groups
from pipelines.tracking import supersede_pipeline_attempts

logger = logging.getLogger(__name__)

RECORD_NAME = "stage.json"
RECORD_VERSION = 1


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
    # starts listens on 127.0.0.1 and lives as long as the command, so the local config says
    # `disabled` explicitly. Ignored when joining a cluster (RAY_ADDRESS): the cluster decides.
    auth_mode: Literal["token", "disabled"] | None = None


class PipelineConfig(StrictConfig):
    """The whole pipeline: shared settings plus one section per stage (validated by the stage itself)."""

    name: str = "local"
    workdir: str = "vitpose_runs"
    stages: tuple[str, ...] | None = None  # None: every stage in order
    mlflow: MlflowSection = MlflowSection()
    ray: RayInitSection = RayInitSection()
    # stage sections: free-form here, strictly validated by each stage's own config class
    # (see pipelines.stages.validate_sections), so an unknown key anywhere is still an error
    shard: dict[str, Any] = {}
    pretrain: dict[str, Any] = {}
    finetune: dict[str, Any] = {}
    tune: dict[str, Any] = {}
    distill: dict[str, Any] = {}
    # `register` would shadow a method pydantic models inherit (ABCMeta.register): store it under an alias
    register_: dict[str, Any] = Field({}, alias="register")
    serve: dict[str, Any] = {}

    @property
    def workdir_uri(self) -> str:
        return storage.normalize(self.workdir)

    def section(self, stage: str) -> dict[str, Any]:
        return dict(getattr(self, "register_" if stage == "register" else stage))


@dataclass
class StageOutput:
    """What a stage function returns: URIs other stages may read, and metrics to log and show."""

    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    summary: str = ""  # one short human line for the progress output, e.g. "AP 0.412"


@dataclass
class StageContext:
    """Everything a stage function may use; stages read upstream results only from `inputs` records."""

    name: str
    config: PipelineConfig
    section: Any  # the stage's validated config object
    stage_dir: str  # <workdir>/<stage>, absolute path or s3:// URI
    inputs: dict[str, dict[str, Any]]  # upstream stage name -> its record
    tracking_uri: str
    experiment_id: str
    run_id: str  # this stage's MLflow child run
    force: bool = False

    def path(self, *parts: str) -> str:
        return storage.join(self.stage_dir, *parts)


@dataclass(frozen=True)
class StageSpec:
    """A stage: its name, the stages whose records it reads, how it validates and runs."""

    name: str
    inputs: tuple[str, ...]  # required upstream records
    validate: Callable[[dict[str, Any]], Any]  # section dict -> the stage's strict config object
    run: Callable[[StageContext], StageOutput]
    cacheable: bool = True  # serve is not: an endpoint is started on every run
    needs: str | None = None  # module the stage needs; its absence is reported, not crashed on
    optional_inputs: tuple[str, ...] = ()  # upstream records used when present (e.g. pretrain for finetune)


@dataclass
class StageResult:
    name: str
    state: str  # done | skipped | failed | not-selected
    seconds: float = 0.0
    summary: str = ""
    record: dict[str, Any] | None = None


def config_hash(data: Any) -> str:
    """A stable short hash of JSON-able data (sorted keys), used for config and input identity."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """The git commit of the checkout (plus `-dirty`), or the installed package version outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"vitpose-ray {version('vitpose-ray')}"
        except PackageNotFoundError:
            return "unknown"


def record_fingerprint(record: dict[str, Any]) -> str:
    """Identity of a finished stage for its downstream stages: config, inputs and outputs."""
    return config_hash({key: record.get(key) for key in ("config_hash", "inputs", "outputs")})


def read_record(stage_dir: str) -> dict[str, Any] | None:
    uri = storage.join(stage_dir, RECORD_NAME)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))


def write_record(stage_dir: str, record: dict[str, Any]) -> None:
    storage.write_text(storage.join(stage_dir, RECORD_NAME), json.dumps(record, indent=1, default=str))


def resolve_tracking_uri(config: PipelineConfig) -> tuple[str, str | None]:
    """(absolute tracking URI, artifact location for a new experiment) as the config section describes."""
    section = config.mlflow
    uri = section.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    artifact_location = section.artifact_location
    if not uri:
        if storage.is_s3(config.workdir_uri):
            raise ValueError("workdir is on S3 but no MLflow tracking server is set: give mlflow.tracking_uri "
                             "or MLFLOW_TRACKING_URI (a SQLite file cannot be shared between nodes)")
        Path(config.workdir_uri).mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{Path(config.workdir_uri, 'mlflow.db')}"
        artifact_location = artifact_location or Path(config.workdir_uri, "mlartifacts").as_uri()
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # relative sqlite path: pin it to the driver's cwd now, before any Ray worker chdirs
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri, artifact_location


def select_stages(all_names: list[str], stages: list[str] | None = None, start: str | None = None) -> list[str]:
    """The stages to run, in pipeline order, from `--stages a,b` or `--from name` (not both)."""
    if stages and start:
        raise ValueError("give either --stages or --from, not both")
    for name in [*(stages or []), *([start] if start else [])]:
        if name not in all_names:
            raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(all_names)}")
    if start:
        return all_names[all_names.index(start):]
    if stages:
        return [name for name in all_names if name in stages]
    return list(all_names)


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _fingerprint_inputs(inputs: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: record_fingerprint(record) for name, record in sorted(inputs.items())}


def run_pipeline(config: PipelineConfig, stages: list[str] | None = None, start: str | None = None,
                 force: bool = False, specs: list[StageSpec] | None = None,
                 reporter: Any = None) -> list[StageResult]:
    """Run the selected stages in order; returns one result per pipeline stage (selected or not).

    Args:
        config: the pipeline config (see `load_pipeline_config`).
        stages: names to run (default: `config.stages`, else all); `start`: run from this stage on.
        force: rerun the selected stages even when their records match.
        specs: the stage list (default `pipelines.stages.STAGES`).
        reporter: progress output (default `pipelines.progress.Reporter` on stdout).
    """
    from mlflow.tracking import MlflowClient

    from pipelines.progress import Reporter

    if specs is None:
        from pipelines.stages import STAGES as specs  # noqa: N811 - the default stage list
    reporter = reporter or Reporter()
    names = [spec.name for spec in specs]
    selected = select_stages(names, stages or (list(config.stages) if config.stages else None), start)
    sections = validate_sections(config, specs, selected)
    workdir = config.workdir_uri
    tracking_uri, artifact_location = resolve_tracking_uri(config)
    # Ray processes started from here inherit it; restored at the end, or the next run_pipeline in this
    # process would read it as the user's choice and log into this run's store
    previous_tracking_env = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    where = ensure_ray(config)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _experiment_id(client, config.mlflow.experiment, artifact_location)
    parent = client.create_run(experiment_id, run_name=f"pipeline-{config.name}",
                               tags={"vitpose.pipeline": config.name, "vitpose.workdir": workdir,
                                     "vitpose.code_version": code_version()})
    parent_id = parent.info.run_id
    client.log_param(parent_id, "stages", ",".join(selected))
    client.log_param(parent_id, "workdir", workdir)
    client.log_dict(parent_id, dump_config(config), "pipeline_config.json")
    # a killed attempt (SIGKILL: no `finally`) left its pipeline run and the runs beneath it RUNNING
    supersede_pipeline_attempts(client, experiment_id, config.name, workdir, parent_id)
    reporter.start(config, selected, workdir=workdir, tracking_uri=tracking_uri, ray=where)

    results: list[StageResult] = []
    status = "FAILED"
    try:
        for index, spec in enumerate(specs):
            if spec.name not in selected:
                results.append(StageResult(spec.name, "not-selected", record=read_record(storage.join(workdir, spec.name))))
                continue
            results.append(_run_stage(spec, sections[spec.name], config, force, client, experiment_id, parent_id,
                                      tracking_uri, reporter, index, len(specs)))
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
        if previous_tracking_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_tracking_env
        reporter.finish(results, parent_run_id=parent_id, ok=status == "FINISHED")
    return results


def _run_stage(spec: StageSpec, section: Any, config: PipelineConfig, force: bool, client: Any,
               experiment_id: str, parent_id: str, tracking_uri: str, reporter: Any, index: int,
               total: int) -> StageResult:
    """Skip the stage when its record matches, otherwise run it in a child run and write its record."""
    workdir = config.workdir_uri
    stage_dir = storage.join(workdir, spec.name)
    inputs: dict[str, dict[str, Any]] = {}
    for name in spec.inputs:
        record = read_record(storage.join(workdir, name))
        if record is None:
            raise RuntimeError(f"stage {spec.name!r} needs the output of {name!r}, but {storage.join(workdir, name)} "
                               f"has no {RECORD_NAME}: run {name!r} first (e.g. `vitpose run --from {name}`)")
        inputs[name] = record
    for name in spec.optional_inputs:
        record = read_record(storage.join(workdir, name))
        if record is not None:
            inputs[name] = record
    section_json = section if isinstance(section, dict) else dump_config(section)
    stage_hash = config_hash(section_json)
    input_fingerprints = _fingerprint_inputs(inputs)
    previous = read_record(stage_dir)
    reporter.stage_started(spec.name, index, total)
    if (spec.cacheable and not force and previous is not None and previous.get("config_hash") == stage_hash
            and previous.get("inputs") == input_fingerprints):
        skipped = client.create_run(experiment_id, run_name=spec.name, tags={
            "mlflow.parentRunId": parent_id, "vitpose.stage": spec.name, "vitpose.state": "skipped",
            "vitpose.original_run_id": previous.get("mlflow_run_id", "")})
        client.set_terminated(skipped.info.run_id, "FINISHED")  # create_run starts it RUNNING
        result = StageResult(spec.name, "skipped", 0.0, previous.get("summary", ""), previous)
        reporter.stage_finished(result, index, total)
        return result

    run = client.create_run(experiment_id, run_name=spec.name, tags={
        "mlflow.parentRunId": parent_id, "vitpose.stage": spec.name, "vitpose.state": "running"})
    run_id = run.info.run_id
    client.log_dict(run_id, section_json, f"{spec.name}_config.json")
    context = StageContext(spec.name, config, section, stage_dir, inputs, tracking_uri, experiment_id, run_id, force)
    started = time.time()
    placement_groups_before = own_placement_groups()
    try:
        from pipelines.progress import StageProgress

        with StageProgress(client, experiment_id, spec.name, run_id, stream=getattr(reporter, "stream", None)):
            output = spec.run(context)
    except BaseException as error:  # KeyboardInterrupt too: the child run must not stay RUNNING
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
        "record_version": RECORD_VERSION, "stage": spec.name, "config_hash": stage_hash, "config": section_json,
        "inputs": input_fingerprints, "input_uris": {name: rec.get("outputs", {}) for name, rec in inputs.items()},
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


def validate_sections(config: PipelineConfig, specs: list[StageSpec], selected: list[str]) -> dict[str, Any]:
    """Validate every stage section strictly; a selected stage whose module is missing is an error."""
    from pipelines.config import ConfigError

    sections, problems = {}, []
    for spec in specs:
        if spec.needs and not _module_available(spec.needs):
            if spec.name in selected:
                problems.append(f"stage {spec.name!r} needs {spec.needs}, which is not installed in this checkout")
            continue
        try:
            sections[spec.name] = spec.validate(config.section(spec.name))
        except ConfigError as error:
            problems.append(f"[{spec.name}] {error}")
    if problems:
        raise ConfigError("pipeline config problems:\n" + "\n".join(problems))
    return sections


def _module_available(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def load_pipeline_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """A PipelineConfig from YAML (default: the embedded `pipelines/configs/local.yaml`) plus `--set` overrides,
    with every stage section validated strictly by its stage."""
    from pipelines.config import load_config
    from pipelines.stages import STAGES

    config = load_config(PipelineConfig, path or DEFAULT_CONFIG, overrides)
    validate_sections(config, STAGES, [])
    return config


DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "local.yaml"
