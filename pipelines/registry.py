"""MLflow Model Registry helpers: log a checkpoint as a model, register it, move aliases, resolve sources.

The project's own checkpoint directory (`model.safetensors` + `config.json`, see
`vitpose_core.checkpoint`) is logged *as is* inside an MLflow pyfunc model, as the artifact
`artifacts/checkpoint/`. Serving and evaluation then rebuild the model from that directory with
`vitpose_core.checkpoint.load_model`: no `torch.export` (whose pt2 format pins the batch size, see
RAY_NOTES section 6) and no pickled `nn.Module`. The pyfunc model (`pipelines/pyfunc_model.py`,
logged as code with `vitpose_core/` as a code path, a signature and pinned requirements) makes it
usable from plain MLflow anywhere: `mlflow.pyfunc.load_model(uri).predict(images_df)` -> keypoints.

Model sources, as accepted by `resolve_model_source` / `resolve_model`:
- `models:/<name>@<alias>` (e.g. `models:/vitpose@champion`), `models:/<name>/<version>`,
  `models:/m-<logged model id>`;
- `runs:/<run_id>/<artifact_path>` (the `artifact_path` the model was logged under, default `model`);
- a local path: an own-format checkpoint directory, its `model.safetensors`, or an official `.pth`;
- an s3:// URI of either (copied to a local directory first).

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
PYFUNC_CODE = Path(__file__).resolve().parent / "pyfunc_model.py"
VITPOSE_CORE = Path(__file__).resolve().parents[1] / "vitpose_core"
# what the pyfunc model imports (vitpose_core's dependencies, pinned to the versions it was logged
# with); vitpose_core itself travels as a code path, so the checkout need not be installed
PYFUNC_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "pandas", "safetensors", "timm", "opencv-python-headless",
                        "pillow", "pydantic", "pyyaml", "pycocotools")


def pyfunc_requirements() -> list[str]:
    """`name==version` of each distribution the pyfunc model needs, as installed here."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for distribution in PYFUNC_DISTRIBUTIONS:
        try:
            pinned = version(distribution).split("+")[0]  # a local build tag (torch 2.x+cpu) is not on PyPI
        except PackageNotFoundError:
            requirements.append(distribution)
            continue
        requirements.append(f"{distribution}=={pinned}")
    return requirements


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

    The model is `pipelines/pyfunc_model.py` logged as code (no pickle), `vitpose_core/` as a code
    path, the checkpoint as artifact `checkpoint`, the signature of `pyfunc_model.model_signature`
    and `pyfunc_requirements()`: `mlflow.pyfunc.load_model` works without this checkout.
    """
    checkpoint_dir = Path(checkpoint_dir).resolve()
    if not (checkpoint_dir / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a checkpoint directory (no {WEIGHTS_NAME})")
    mlflow = _mlflow(tracking_uri)
    from pipelines.pyfunc_model import model_signature

    # stage under the fixed folder name so the artifact path never depends on the caller's dir name
    with tempfile.TemporaryDirectory() as staging:
        staged = Path(staging) / CHECKPOINT_ARTIFACT
        shutil.copytree(checkpoint_dir, staged)
        kwargs: dict[str, Any] = dict(
            name=name, python_model=str(PYFUNC_CODE), artifacts={CHECKPOINT_ARTIFACT: str(staged)},
            code_paths=[str(VITPOSE_CORE)], signature=model_signature(), input_example=_pyfunc_input_example(),
            # explicit requirements: inferring them imports and probes the environment (slow)
            pip_requirements=pyfunc_requirements(),
            registered_model_name=registered_model_name, metadata=metadata,
        )
        if run_id is not None and (mlflow.active_run() is None or mlflow.active_run().info.run_id != run_id):
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(**kwargs)
        else:
            info = mlflow.pyfunc.log_model(**kwargs)
    return info.model_uri


def _pyfunc_input_example() -> Any:
    """One 32x24 gray PNG with one box: stored with the model so users see the input layout (MLflow
    also runs it through the model once at logging time, which checks the logged model works)."""
    import io

    import pandas as pd
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [buffer.getvalue()], "boxes": ["[[4, 2, 24, 20]]"]})


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
    if source.startswith("s3://"):
        # a checkpoint another node wrote to the shared bucket (tune/finetune exports on a cluster): copy it
        # here; as a local path it would be `<cwd>/s3:/bucket/...`, which exists nowhere
        from pipelines import storage

        destination = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="vitpose-model-"))
        local = destination / Path(source.rstrip("/")).name
        if storage.exists(storage.join(source, WEIGHTS_NAME)):
            storage.copy_dir(source, local)
        elif storage.exists(source):  # a single weights file (an official .pth)
            local = destination / Path(source).name
            local.write_bytes(storage.read_bytes(source))
        else:
            raise FileNotFoundError(f"model checkpoint not found: {source} (no {WEIGHTS_NAME} under it)")
        checkpoint = find_checkpoint(local)
        return ResolvedModel(path=checkpoint, name=checkpoint.stem if checkpoint.is_file() else checkpoint.name,
                             version="s3", source=source)
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


# ----------------------------------------------------------------------- models that are plain directories


def register_directory(directory: str | Path, name: str, run_id: str, artifact_path: str,
                       tracking_uri: str | None = None, tags: dict[str, Any] | None = None) -> str:
    """Log `directory` as artifacts of run `run_id` under `artifact_path` and register them as a new version of
    `name`; returns the version.

    For models that are not ViTPose checkpoints (the person detector: `detector.safetensors` +
    `detector.json`): they are registered from the run's artifact location, with no pyfunc flavour, and
    come back with `resolve_directory`.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    client.log_artifacts(run_id, str(directory), artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    version = client.create_model_version(name, source, run_id=run_id,
                                          tags={key: str(value) for key, value in (tags or {}).items()})
    return str(version.version)


def resolve_directory(source: str | Path, marker: str, tracking_uri: str | None = None,
                      dst_dir: str | Path | None = None) -> Path:
    """The local directory holding `marker` (e.g. `detector.json`) of a model source: `models:/<name>@<alias>`,
    `models:/<name>/<version>`, `runs:/<id>/<path>`, an s3:// prefix (copied) or a local directory."""
    source = str(source)
    destination = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="vitpose-model-"))
    if source.startswith(("models:/", "runs:/")):
        if source.startswith("models:/") and "@" in source:
            name, version = _describe_registry_uri(source, tracking_uri)  # pin the alias: name and files agree
            source = f"models:/{name}/{version}"
        destination.mkdir(parents=True, exist_ok=True)
        root = Path(_mlflow(tracking_uri).artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination)))
    elif source.startswith("s3://"):
        from pipelines import storage

        root = destination / Path(source.rstrip("/")).name
        storage.copy_dir(source, root)
    else:
        root = Path(source).expanduser().resolve()
    if (root / marker).is_file():
        return root
    found = sorted(path.parent for path in root.rglob(marker)) if root.is_dir() else []
    if len(found) != 1:
        raise FileNotFoundError(f"expected one {marker} under {source}, found {len(found)}")
    return found[0]
