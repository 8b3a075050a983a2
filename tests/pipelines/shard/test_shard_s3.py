"""The same shard and read path against a real S3 API (moto's server on 127.0.0.1).

Nothing is mocked inside the code: the `s3_server` fixture only sets the standard AWS_* variables,
and boto3, pyarrow and Ray Data find the endpoint through them.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.data import StreamConfig, iter_pose_batches, read_shards
from pipelines.shard.config import ShardConfig
from pipelines.shard.run import run_shard

BUCKET = "vitpose-test"


def upload_samples(data: Path, prefix: str) -> None:
    s3 = boto3.client("s3")
    for folder in ("coco", "aic"):
        for path in sorted((data / folder).iterdir()):
            if path.suffix in (".jpg", ".json") and "keypoint_annotations" not in path.name:
                s3.upload_file(str(path), BUCKET, f"{prefix}/{folder}/{path.name}")


def sources(root: str) -> list[dict]:
    return [{"annotations": storage.join(root, "coco", "test_coco.json"), "images": storage.join(root, "coco"),
             "dataset": "coco", "split": "val"},
            {"annotations": storage.join(root, "aic", "test_aic.json"), "images": storage.join(root, "aic"),
             "dataset": "aic", "split": "val"}]


def rows_of(out: str) -> list[dict]:
    rows = []
    for uri in storage.list_files(storage.join(out, "shards"), suffix=".parquet"):
        fs, path = storage.filesystem_and_path(uri)
        rows += pq.read_table(path, filesystem=fs).to_pylist()
    return sorted(rows, key=lambda r: (r["dataset"], r["ann_id"]))


@pytest.fixture(scope="module")
def local_and_s3(ray_local, s3_server, shared_data, tmp_path_factory):
    upload_samples(shared_data, "raw")
    local_out = str(tmp_path_factory.mktemp("local") / "shards")
    s3_out = f"s3://{BUCKET}/shards"
    local = run_shard(ShardConfig.model_validate({"sources": sources(str(shared_data)), "out": local_out}))
    remote = run_shard(ShardConfig.model_validate({"sources": sources(f"s3://{BUCKET}/raw"), "out": s3_out}))
    return local, local_out, remote, s3_out


def test_s3_run_writes_the_same_rows_as_the_local_run(local_and_s3):
    local, local_out, remote, s3_out = local_and_s3
    assert remote["counts"] == local["counts"]
    assert remote["counts"]["coco/val"]["rows_out"] == 12 and remote["counts"]["aic/val"]["rows_out"] == 9
    assert [i["sha256"] for i in remote["inputs"]] == [i["sha256"] for i in local["inputs"]]
    local_rows, s3_rows = rows_of(local_out), rows_of(s3_out)
    assert len(s3_rows) == 21
    assert s3_rows == local_rows  # byte-identical crops, same keypoints, affines and ids
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="shards/")["Contents"]}
    assert "shards/manifest.json" in keys and any(k.startswith("shards/shards/part-") for k in keys)


def test_s3_rerun_is_a_no_op(local_and_s3):
    _, _, remote, s3_out = local_and_s3
    config = ShardConfig.model_validate({"sources": sources(f"s3://{BUCKET}/raw"), "out": s3_out})
    assert run_shard(config) == remote


def test_training_stream_reads_from_s3_with_and_without_ray(local_and_s3):
    _, _, _, s3_out = local_and_s3
    assert read_shards(s3_out, datasets=["aic"]).count() == 9
    config = StreamConfig(input_size=(96, 128), augment=False)
    standalone = list(iter_pose_batches(s3_out, config, batch_size=8, datasets=["coco"]))
    through_ray = list(iter_pose_batches(read_shards(s3_out, datasets=["coco"]), config, batch_size=8))
    ids = lambda batches: sorted(int(i) for b in batches for i in b["ann_id"])  # noqa: E731
    assert ids(standalone) == ids(through_ray) and len(ids(standalone)) == 12
    image = np.concatenate([b["image"].numpy() for b in standalone])
    assert image.shape == (12, 3, 128, 96)


def test_storage_helpers_on_s3(s3_server):
    uri = f"s3://{BUCKET}/storage-test/a/b.bin"
    storage.write_bytes(uri, b"abc")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"abc"
    assert storage.list_files(f"s3://{BUCKET}/storage-test", recursive=True) == [uri]
    assert storage.sha256_of(uri)[1] == 3
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(f"s3://{BUCKET}/storage-test/nope")
    storage.delete_dir(f"s3://{BUCKET}/storage-test")
    assert not storage.exists(uri)
