"""The stage contract: what every stage of `vitpose run` is, takes and leaves behind.

A stage is one package under `pipelines/` (shard, detect, pretrain, finetune, tune, distill, register, serve)
that owns four things: its config class (`config.py`), its run function (`run.py`: typed config in,
record out), its CLI subcommand (`command.py`) and its pipeline spec (`spec.py`, a `StageSpec`). The
orchestrator (`pipelines.pipeline`) only lists the specs; this module is a leaf that every stage and
the orchestrator import, and it imports nothing of theirs.

How a spec turns the pipeline file into the stage's typed config, in two steps:

1. `section(sections)`: the stage's effective section, a plain dict, from the pipeline file's sections.
   Sections derive instead of defaulting: tune's trial base and distill's student start from the
   finetune section and override only what they name. This dict is what the stage's config hash
   (skip/resume) covers.
2. `build(section, upstream)`: the stage's config object with what the pipeline owns filled in: output
   directories under the workdir, upstream URIs read from the upstream records, the MLflow parent run.
   With `upstream=None` (validation, `vitpose plan`) the URIs are placeholders such as `<shard.shards>`.

A finished stage writes `<workdir>/<stage>/stage.json` last (the record: config hash, the fingerprints
of the upstream records it read, outputs, metrics); the record is the completion marker.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.config import config_hash

RECORD_NAME = "stage.json"
RECORD_VERSION = 2

Sections = dict[str, dict[str, Any]]  # stage name -> that stage's section of the pipeline file
Records = dict[str, dict[str, Any]]  # upstream stage name -> its record


@dataclass(frozen=True)
class Upstream:
    """What a stage may read of the pipeline while it builds its config: upstream records and run context."""

    records: Records
    stage_dir: str  # <workdir>/<stage>, absolute path or s3:// URI
    tracking_uri: str
    experiment: str
    parent_run_id: str | None  # this stage's MLflow run, under which its own runs nest

    def path(self, *parts: str) -> str:
        return storage.join(self.stage_dir, *parts)

    def output(self, stage: str, key: str) -> Any:
        return (self.records.get(stage) or {}).get("outputs", {}).get(key)


@dataclass
class StageOutput:
    """What a stage's run returns: URIs other stages may read, and metrics to log and show."""

    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    summary: str = ""  # one short human line for the progress output, e.g. "AP 0.412"


@dataclass(frozen=True)
class StageSpec:
    """A stage as the orchestrator sees it.

    Attributes:
        name: the stage's name, its directory under the workdir and its section in the pipeline file.
        inputs: upstream stages whose records it needs.
        optional_inputs: upstream records it uses when present (pretrain for finetune).
        section: pipeline sections -> this stage's effective section (derivation, no I/O).
        build: (effective section, upstream or None) -> the stage's strict config object.
        run: (config, upstream, force) -> StageOutput.
        resources: config -> what the stage asks of the cluster, for `vitpose plan`.
        cacheable: False for serve, which starts an endpoint on every run.
        optional: runs only when the pipeline file has its section (detect); without one the stage is left
            out of the run and the plan, and stages that list it in `optional_inputs` do not read its record.
    """

    name: str
    inputs: tuple[str, ...]
    section: Callable[[Sections], dict[str, Any]]
    build: Callable[[dict[str, Any], Upstream | None], Any]
    run: Callable[[Any, Upstream, bool], StageOutput]
    resources: Callable[[Any], dict[str, Any]] = lambda config: {}
    optional_inputs: tuple[str, ...] = ()
    cacheable: bool = True
    optional: bool = False


@dataclass
class StageResult:
    name: str
    state: str  # done | skipped | failed | not-selected
    seconds: float = 0.0
    summary: str = ""
    record: dict[str, Any] | None = None


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


def numbers(raw: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict (booleans and None left out), as floats."""
    return {k: float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def placeholder(stage: str, key: str) -> str:
    """What stands for an upstream output before the pipeline has run (validation, `vitpose plan`)."""
    return f"<{stage}.{key}>"
