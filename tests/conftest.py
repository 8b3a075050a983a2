"""Shared fixtures. Servers (Ray, MLflow, S3, Serve) run on 127.0.0.1 only and are stopped after."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()

# Ray 2.60 enables token auth for local clusters; tests run a private local cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# modules whose tests start Ray (a session cluster, a test cluster of their own, Serve or the rehearsal
# cluster) without the `ray_local` fixture; `-m "not ray"` runs the unit tests alone, in seconds
RAY_MODULES = {"test_ray_job", "test_serve", "test_serve_fuzz", "test_serve_detector", "test_serve_promotion",
               "test_rehearsal_infra", "test_rehearsal", "test_registry"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) or item.module.__name__ in RAY_MODULES:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting Ray costs ~7 s on 2 cores)."""
    import ray

    if not ray.is_initialized():
        # address=local: a new private cluster, never one a `ray start` left in /tmp/ray/ray_current_cluster
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's standalone server) on 127.0.0.1 with bucket `vitpose-test`.

    The AWS_* variables point boto3, pyarrow and Ray Data at it through configuration only; code under
    test builds its clients from the environment as it would against AWS. Yields the endpoint URL.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="vitpose-test")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def isolated_mlflow_tracking_uri():
    """Tests must not see each other's MLflow store.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI to the environment, which code that
    falls back to the environment (the pipeline, the registry helpers) would then pick up in later tests.
    """
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(saved)  # None resets MLflow's global default too
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def make_synthetic_shards(root: Path, train_images: int, val_images: int, crop_size: tuple[int, int]) -> str:
    """Synthetic train/val COCO data (seeds 0/1) sharded by the real shard stage; needs a running Ray."""
    from pipelines.shard.config import ShardConfig, ShardSource
    from pipelines.shard.crops import CropConfig
    from pipelines.shard.run import run_shard, write_synthetic_dataset
    from vitpose_core.synthetic import SyntheticConfig

    sources = []
    for split, num_images, seed in (("train", train_images, 0), ("val", val_images, 1)):
        annotations = write_synthetic_dataset(str(root / split), SyntheticConfig(num_images=num_images, seed=seed),
                                              split)
        sources.append(ShardSource(annotations=annotations, images=str(root / split / "images"), dataset="coco",
                                   split=split))
    crop = CropConfig(width=crop_size[0], height=crop_size[1])
    run_shard(ShardConfig(sources=tuple(sources), out=str(root / "shards"), crop=crop))
    return str(root / "shards")
