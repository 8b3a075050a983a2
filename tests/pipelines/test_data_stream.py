"""Reading side: shards -> augmented, normalised batches with UDP targets at any input size."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from pipelines.data import (
    StreamConfig,
    iter_pose_batches,
    iter_prepared_batches,
    prefetch,
    read_shards,
    shard_keypoint_sets,
    transform_in_ray_data,
)
from pipelines.shard.config import ShardConfig
from pipelines.shard.run import run_shard, write_synthetic_dataset
from vitpose_core.codec import UDPHeatmapCodec
from vitpose_core.geometry import transform_points
from vitpose_core.inference import IMAGENET_MEAN, IMAGENET_STD
from vitpose_core.keypoints import COCO
from vitpose_core.synthetic import SyntheticConfig


@pytest.fixture(scope="module")
def shards(ray_local, shared_data, tmp_path_factory):
    """Shards of 24 synthetic images (train) and the COCO sample (val); returns (uri, {ann_id: keypoints})."""
    root = tmp_path_factory.mktemp("stream")
    synth = write_synthetic_dataset(str(root / "synth"), SyntheticConfig(num_images=24, seed=5), "train")
    sources = [{"annotations": synth, "images": str(root / "synth" / "images"), "dataset": "coco", "split": "train"},
               {"annotations": str(shared_data / "coco/test_coco.json"), "images": str(shared_data / "coco"),
                "dataset": "coco", "split": "val"},
               {"annotations": str(shared_data / "aic/test_aic.json"), "images": str(shared_data / "aic"),
                "dataset": "aic", "split": "val"}]
    out = str(root / "shards")
    manifest = run_shard(ShardConfig.model_validate({"sources": sources, "out": out}))
    originals = {}
    for path in (synth, shared_data / "coco/test_coco.json"):
        for ann in json.loads(open(path).read())["annotations"]:
            originals[ann["id"]] = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
    return out, originals, manifest


def collect(batches) -> dict[str, torch.Tensor]:
    batches = list(batches)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("input_size", [(192, 256), (96, 128)])
def test_batches_have_the_documented_shapes_at_any_resolution(shards, input_size):
    out, _, manifest = shards
    w, h = input_size
    batch = next(iter_pose_batches(out, StreamConfig(input_size=input_size, keypoints="coco"), batch_size=8,
                                      split="train"))
    assert batch["image"].shape == (8, 3, h, w) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (8, 17, h // 4, w // 4)
    assert batch["target_weight"].shape == (8, 17) and batch["keypoints"].shape == (8, 17, 3)
    for key in ("crop_to_input", "crop_to_image", "input_to_image"):
        assert batch[key].shape == (8, 2, 3)
    assert batch["image_id"].dtype == torch.int64 and batch["bbox"].shape == (8, 4)
    # ImageNet-normalised: the black context padding maps to -mean/std
    assert batch["image"].amin() == pytest.approx(float(-(IMAGENET_MEAN / IMAGENET_STD).max()),
                                                  abs=0.05)
    assert float(batch["target"].amax()) == pytest.approx(1.0, abs=0.01)


def test_without_augmentation_decoded_targets_map_back_to_the_annotations(shards):
    out, originals, _ = shards
    config = StreamConfig(input_size=(192, 256), augment=False)
    batch = collect(iter_pose_batches(out, config, batch_size=5, split="val", datasets=["coco"]))
    assert len(batch["ann_id"]) == 12
    decoded, _ = UDPHeatmapCodec(config.input_size, config.heatmap_size).decode(batch["target"])
    for i, ann_id in enumerate(batch["ann_id"].tolist()):
        expected = originals[ann_id]
        labelled = (expected[:, 2] > 0) & (batch["target_weight"][i].numpy() > 0)
        back = transform_points(decoded[i][labelled], batch["input_to_image"][i].numpy().astype(np.float64))
        # heatmap quantisation at 1/4 resolution after DARK refinement: well under a heatmap pixel
        np.testing.assert_allclose(back, expected[labelled, :2], atol=2.0)


def test_augmented_keypoints_still_map_back_exactly(shards):
    out, originals, _ = shards
    config = StreamConfig(input_size=(192, 256), flip_prob=0.5, rotation_prob=1.0, half_body_prob=0.3, keypoints="coco")
    batch = collect(iter_pose_batches(out, config, batch_size=16, split="train", seed=7))
    flips = 0
    for i, ann_id in enumerate(batch["ann_id"].tolist()):
        flipped = bool(np.linalg.det(batch["crop_to_input"][i, :, :2].numpy()) < 0)
        # a flip swaps the labels: output joint k is the source's joint flip_index[k], mirrored
        expected = originals[ann_id][COCO.flip_index] if flipped else originals[ann_id]
        keypoints = batch["keypoints"][i].numpy().astype(np.float64)
        labelled = keypoints[:, 2] > 0
        np.testing.assert_array_equal(labelled, expected[:, 2] > 0)
        back = transform_points(keypoints[labelled, :2], batch["input_to_image"][i].numpy().astype(np.float64))
        np.testing.assert_allclose(back, expected[labelled, :2], atol=0.05)
        flips += flipped
    assert 0 < flips < len(batch["ann_id"])


def test_stream_is_seeded_by_seed_epoch_and_rank(shards):
    out, _, _ = shards
    config = StreamConfig(input_size=(96, 128), keypoints="coco")  # the train split mixes COCO and AIC rows
    first = lambda **kw: next(iter_pose_batches(out, config, batch_size=4, split="train", **kw))  # noqa: E731
    a, b = first(seed=1, epoch=0), first(seed=1, epoch=0)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["ann_id"], b["ann_id"])
    assert not torch.equal(a["crop_to_input"], first(seed=1, epoch=1)["crop_to_input"])
    assert not torch.equal(a["crop_to_input"], first(seed=1, epoch=0, rank=1)["crop_to_input"])


def test_prefetched_stream_equals_the_plain_stream_and_stops_cleanly(shards):
    out, _, _ = shards
    config = StreamConfig(input_size=(96, 128), keypoints="coco")
    stream = lambda: iter_pose_batches(out, config, batch_size=4, split="train", seed=3)  # noqa: E731
    plain, ahead = list(stream()), list(prefetch(stream(), depth=2))
    assert len(plain) == len(ahead) > 2
    for a, b in zip(plain, ahead, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    # a consumer that stops early (islice of an epoch) stops the producer thread, which reads no further
    threads_before = threading.active_count()
    reads = []
    early = prefetch((reads.append(i) or i for i in range(1000)), depth=2)
    assert [next(early) for _ in range(3)] == [0, 1, 2]
    early.close()
    assert len(reads) <= 3 + 2 + 1 and threading.active_count() == threads_before
    # an error in the stream reaches the consumer
    def failing():
        yield 1
        raise OSError("shard unreadable")
    with pytest.raises(OSError, match="shard unreadable"):
        list(prefetch(failing()))


def test_aic_rows_join_the_coco_layout_or_keep_their_own(shards):
    out, _, _ = shards
    coco_layout = collect(iter_pose_batches(out, StreamConfig(augment=False, keypoints="coco"), batch_size=9,
                                            datasets=["aic"]))
    assert coco_layout["target"].shape[1] == 17
    assert float(coco_layout["target_weight"][:, :5].sum()) == 0  # no face joints in AIC
    aic_layout = next(iter_pose_batches(out, StreamConfig(augment=False, keypoints="aic"), batch_size=9,
                                        datasets=["aic"]))
    assert aic_layout["target"].shape[1] == 14
    # by default the stream emits the rows' own set, as the shard manifest records it
    own_layout = next(iter_pose_batches(out, StreamConfig(augment=False), batch_size=9, datasets=["aic"]))
    assert own_layout["target"].shape[1] == 14
    with pytest.raises(ValueError, match="layout"):
        next(iter_pose_batches(out, StreamConfig(keypoints="aic"), batch_size=4, datasets=["coco"]))


def test_ray_dataset_path(shards):
    out, _, manifest = shards
    train = read_shards(out, split="train")
    assert train.count() == manifest["counts"]["coco/train"]["rows_out"]
    batches = collect(iter_pose_batches(train, StreamConfig(input_size=(96, 128)), batch_size=8, drop_last=True))
    assert len(batches["ann_id"]) == 8 * (train.count() // 8)
    assert batches["image"].shape[1:] == (3, 128, 96)


def test_ray_data_transform_gives_the_in_worker_batches(shards):
    """data.preprocess.where: ray_data: the transform in Ray Data tasks, normalised by the consumer, equals the
    in-worker stream row for row (augmentation off); with augmentation the targets still follow the keypoints."""
    out, originals, _ = shards
    keypoint_sets = shard_keypoint_sets(out)
    plain = StreamConfig(input_size=(96, 128), augment=False, keypoints="coco")
    in_worker = collect(iter_pose_batches(out, plain, batch_size=8, split="train", shuffle=False))
    prepared = transform_in_ray_data(read_shards(out, split="train"), plain, keypoint_sets=keypoint_sets,
                                     batch_size=8, num_cpus=0.5, max_tasks=2)
    first = next(iter(prepared.iter_batches(batch_size=8, batch_format="numpy")))
    assert first["image"].dtype == np.uint8 and first["image"].shape[1:] == (128, 96, 3)  # what crosses processes
    from_ray = collect(iter_prepared_batches(prepared, batch_size=8, shuffle=False))
    order = torch.argsort(from_ray["ann_id"])
    assert torch.equal(from_ray["ann_id"][order], torch.sort(in_worker["ann_id"]).values)
    expected_order = torch.argsort(in_worker["ann_id"])
    for key, value in in_worker.items():
        assert from_ray[key].dtype == value.dtype, key
        torch.testing.assert_close(from_ray[key][order], value[expected_order], rtol=0, atol=0, msg=key)

    # augmented in the tasks: every row's keypoints still map back onto its annotation, and draws differ by row
    augmented = StreamConfig(input_size=(96, 128), flip_prob=0.5, rotation_prob=1.0, keypoints="coco")
    batch = collect(iter_prepared_batches(transform_in_ray_data(read_shards(out, split="train"), augmented,
                                                                keypoint_sets=keypoint_sets, batch_size=8),
                                          batch_size=8, shuffle=True, shuffle_buffer=16))
    flips = 0
    for i, ann_id in enumerate(batch["ann_id"].tolist()):
        if ann_id not in originals:  # an AIC-layout row mapped onto COCO: covered by the in-worker tests
            continue
        flipped = bool(np.linalg.det(batch["crop_to_input"][i, :, :2].numpy()) < 0)
        expected = originals[ann_id][COCO.flip_index] if flipped else originals[ann_id]
        keypoints = batch["keypoints"][i].numpy().astype(np.float64)
        labelled = keypoints[:, 2] > 0
        back = transform_points(keypoints[labelled, :2], batch["input_to_image"][i].numpy().astype(np.float64))
        np.testing.assert_allclose(back, expected[labelled, :2], atol=0.05)
        flips += flipped
    assert 0 < flips < len(batch["ann_id"])


@pytest.mark.slow
def test_inside_a_ray_train_worker(shards, tmp_path):
    from ray.train import DataConfig, ScalingConfig, get_dataset_shard
    from ray.train.torch import TorchTrainer

    out, _, _ = shards
    train = read_shards(out, split="train")
    config = StreamConfig(input_size=(96, 128), keypoints="coco")  # the train split mixes COCO and AIC rows
    record = tmp_path / "rows.json"  # absolute: Train workers chdir elsewhere

    def train_loop_per_worker() -> None:
        rows = 0
        for batch in iter_pose_batches(get_dataset_shard("train"), config, batch_size=8, drop_last=True):
            assert batch["image"].shape[1:] == (3, 128, 96)
            rows += len(batch["image"])
        record.write_text(json.dumps(rows))

    # one worker with half a CPU leaves room for the Parquet read tasks (RAY_NOTES 1.3)
    TorchTrainer(train_loop_per_worker, datasets={"train": train},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                 dataset_config=DataConfig(datasets_to_split="all")).fit()
    assert json.loads(record.read_text()) == 8 * (train.count() // 8)
