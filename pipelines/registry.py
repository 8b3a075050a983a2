"""MLflow Model Registry helpers: log a checkpoint as a model, register it, move aliases, resolve sources.

The project's own checkpoint directory (`model.safetensors` + `config.json`, see
`vitpose_core.checkpoint`) is logged *as is* inside an MLflow pyfunc model, as the artifact
`artifacts/checkpoint/`. Serving and evaluation then rebuild the model from that directory with
`vitpose_core.checkpoint.load_model`: no `torch.export` (whose pt2 format pins the batch size, see
RAY_NOTES section 6) and no pickled `nn.Module`. The pyfunc wrapper still makes the model usable
from plain MLflow (`mlflow.pyfunc.load_model(uri).predict(crops)` -> heatmaps).

Model sources, as accepted by `resolve_model_source` / `resolve_model`:
- `models:/<name>@<alias>` (e.g. `models:/vitpose@champion`), `models:/<name>/<version>`,
  `models:/m-<logged model id>`;
- `runs:/<run_id>/<artifact_path>` (the `artifact_path` the model was logged under, default `model`);
- a local path: an own-format checkpoint directory, its `model.safetensors`, or an official `.pth`.

mlflow is imported inside the functions: importing it costs seconds and this module is imported by
the serve app builder, which must stay cheap (RAY_NOTES: no work at import time).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"  # must equal pipelines.pyfunc_model.CHECKPOINT_ARTIFACT
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class ResolvedModel:
    """A model source resolved to a local checkpoint, with the name and version to report to clients."""

    path: Path
    name: str
    version: str
    source: str


def _mlflow(tracking_uri: str | None = None) -> Any:
    """MLflow's fluent API (model logging, artifact download), pointed at `tracking_uri` when given."""
    import mlflow

    from pipelines.session import use_tracking_uri

    if tracking_uri:
        use_tracking_uri(tracking_uri)
    return mlflow


def _client(tracking_uri: str | None) -> Any:
    """A client for `tracking_uri`, or for the URI MLflow resolves now (MLFLOW_TRACKING_URI or its default)."""
    import mlflow

    from pipelines.session import mlflow_client

    return mlflow_client(tracking_uri or mlflow.get_tracking_uri())


def log_checkpoint_model(checkpoint_dir: str | Path, name: str = "model", run_id: str | None = None,
                         registered_model_name: str | None = None, tracking_uri: str | None = None,
                         metadata: dict[str, Any] | None = None) -> str:
    """Log an own-format checkpoint directory as an MLflow pyfunc model; returns its model URI.

    Logs into the active run, or into run `run_id` (resumed and ended again) when given. With
    `registered_model_name` the model is also registered (a new version). The returned URI
    (`models:/m-<id>`) can be passed to `register` or `resolve_model_source`.
    """
    checkpoint_dir = Path(checkpoint_dir).resolve()
    if not (checkpoint_dir / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a checkpoint directory (no {WEIGHTS_NAME})")
    mlflow = _mlflow(tracking_uri)
    from pipelines.pyfunc_model import ViTPosePyfunc

    # stage under the fixed folder name so the artifact path never depends on the caller's dir name
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / CHECKPOINT_ARTIFACT
        shutil.copytree(checkpoint_dir, staged)
        kwargs: dict[str, Any] = dict(
            name=name, python_model=ViTPosePyfunc(), artifacts={CHECKPOINT_ARTIFACT: str(staged)},
            # explicit requirements: inferring them imports and probes the environment (slow)
            pip_requirements=["torch", "safetensors", "numpy", "pydantic", "timm"],
            registered_model_name=registered_model_name, metadata=metadata,
        )
        if run_id is not None and (mlflow.active_run() is None or mlflow.active_run().info.run_id != run_id):
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(**kwargs)
        else:
            info = mlflow.pyfunc.log_model(**kwargs)
    return info.model_uri


def register(model_uri: str, name: str, tracking_uri: str | None = None) -> str:
    """Register `model_uri` as a new version of registered model `name`; returns the version."""
    return str(_mlflow(tracking_uri).register_model(model_uri, name).version)


def set_alias(name: str, alias: str, version: str | int, tracking_uri: str | None = None) -> None:
    """Point `name@alias` (e.g. `vitpose@champion`) at `version`; moves the alias if it exists."""
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def get_alias(name: str, alias: str, tracking_uri: str | None = None) -> str | None:
    """The version `name@alias` points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def find_checkpoint(root: Path) -> Path:
    """The checkpoint inside a downloaded model or artifact folder: the folder itself, `artifacts/checkpoint`,
    or the only directory holding `model.safetensors` (or the only `.pth`) below it."""
    root = Path(root)
    if root.is_file() or (root / WEIGHTS_NAME).is_file():
        return root
    preferred = root / "artifacts" / CHECKPOINT_ARTIFACT
    if (preferred / WEIGHTS_NAME).is_file():
        return preferred
    candidates = sorted({p.parent for p in root.rglob(WEIGHTS_NAME)}) or sorted(root.rglob("*.pth"))
    if len(candidates) != 1:
        raise FileNotFoundError(f"expected one checkpoint under {root}, found {len(candidates)}: "
                                f"{[str(c) for c in candidates[:5]]}")
    return candidates[0]


def _describe_registry_uri(uri: str, tracking_uri: str | None) -> tuple[str, str]:
    """(registered model name, version) of a `models:/name@alias` or `models:/name/version` URI."""
    body = uri[len("models:/"):]
    if body.startswith("m-"):  # a logged model id, not a registry entry
        return body, "logged"
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, str(_client(tracking_uri).get_model_version_by_alias(name, alias).version)
    name, _, version = body.partition("/")
    return name, version or "latest"


def resolve_model(source: str | Path, tracking_uri: str | None = None, dst_dir: str | Path | None = None
                  ) -> ResolvedModel:
    """Resolve a model source (see module docstring) to a local checkpoint, downloading from MLflow if needed.

    Args:
        source: `models:/...`, `runs:/...` or a local path.
        tracking_uri: MLflow tracking URI; None uses MLflow's configured default (env MLFLOW_TRACKING_URI).
        dst_dir: where downloads go; None makes a fresh temporary directory.
    """
    source = str(source)
    if not source.startswith(("models:/", "runs:/")):
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"model checkpoint not found: {path}")
        checkpoint = find_checkpoint(path)
        return ResolvedModel(path=checkpoint, name=checkpoint.stem if checkpoint.is_file() else checkpoint.name,
                             version="local", source=str(path))
    mlflow = _mlflow(tracking_uri)
    if source.startswith("models:/"):
        name, version = _describe_registry_uri(source, tracking_uri)
        if "@" in source:  # pin the alias to the version it points at now, so name and weights agree
            source_to_fetch = f"models:/{name}/{version}"
        else:
            source_to_fetch = source
    else:
        run_id = source[len("runs:/"):].split("/", 1)[0]
        name, version, source_to_fetch = f"run-{run_id[:8]}", run_id, source
    destination = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="vitpose-model-"))
    destination.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source_to_fetch, dst_path=str(destination))
    checkpoint = find_checkpoint(Path(local))
    logger.info("resolved %s (%s v%s) to %s", source, name, version, checkpoint)
    return ResolvedModel(path=checkpoint, name=name, version=version, source=source)


def resolve_model_source(source: str | Path, tracking_uri: str | None = None,
                         dst_dir: str | Path | None = None) -> Path:
    """Like `resolve_model`, returning only the local checkpoint path."""
    return resolve_model(source, tracking_uri, dst_dir).path
