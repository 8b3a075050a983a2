"""The pose model and person detector of `vitpose infer`, checked and pinned on the driver before Ray starts.

A checkpoint path is checked here (exists, a format `load_model` reads) and named by the SHA-256 of its
files; a registry alias is resolved to the version it points at now, and the actors load that version
(`models:/<name>/<version>`), so an alias moving mid-run cannot mix two models in one results file.
The actors themselves load through `pipelines.registry.resolve_model`, as serving does.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines import storage
from pipelines.infer.config import ModelRef
from pipelines.infer.inputs import content_identity
from vitpose_core.errors import InvalidInputError

DEFAULT_WORKDIR = "vitpose_runs"  # `vitpose run`'s default: its SQLite registry is the default one here


def tracking_uri_for(explicit: str | None) -> str:
    """`--tracking-uri`, else MLFLOW_TRACKING_URI, else the SQLite store of `vitpose run`'s default workdir."""
    from pipelines.session import resolve_tracking_uri

    if explicit or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_tracking_uri(explicit, DEFAULT_WORKDIR)[0]
    default = Path(DEFAULT_WORKDIR, "mlflow.db").resolve()
    if not default.is_file():
        raise InvalidInputError(f"a registered model needs a tracking server: give --tracking-uri or set "
                                f"MLFLOW_TRACKING_URI (no {default} here either)")
    return f"sqlite:///{default}"


def registry_ref(name: str, alias: str, tracking_uri: str | None, what: str) -> ModelRef:
    """`models:/<name>@<alias>`, pinned to the version the alias points at now."""
    from pipelines.registry import get_alias

    uri = tracking_uri_for(tracking_uri)
    version = get_alias(name, alias, uri)
    if version is None:
        raise InvalidInputError(f"{what}: models:/{name}@{alias} does not exist in the registry at {uri}")
    pinned = f"models:/{name}/{version}"
    return ModelRef(uri=pinned, identity=pinned, label=f"{name} v{version} (@{alias})", tracking_uri=uri)


def checkpoint_ref(path: str) -> ModelRef:
    """A pose checkpoint (own-format folder, official .pth, local or s3://), named by its content."""
    uri = storage.normalize(path)
    if not storage.is_s3(uri):
        if not Path(uri).exists():
            raise FileNotFoundError(f"--checkpoint {uri}: not found")
        from vitpose_core.checkpoint import checkpoint_format

        checkpoint_format(uri)  # a CheckpointError naming the path for what load_model cannot read
    return ModelRef(uri=uri, identity=f"sha256:{content_identity(uri)}", label=uri)


def detector_ref(path: str) -> ModelRef:
    """A person detector folder written by `vitpose_core.detection.save_detector` (local or s3://)."""
    from vitpose_core.detection import DETECTOR_CONFIG_NAME

    uri = storage.normalize(path)
    if not storage.exists(storage.join(uri, DETECTOR_CONFIG_NAME)):
        raise FileNotFoundError(f"--detector {uri}: no {DETECTOR_CONFIG_NAME} there (a folder written by "
                                "vitpose_core.detection.save_detector)")
    return ModelRef(uri=uri, identity=f"sha256:{content_identity(uri)}", label=uri)
