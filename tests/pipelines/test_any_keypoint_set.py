"""Any keypoint dataset through the stages (issue #16, pipelines half): shard -> finetune -> eval -> predict.

* every shared sample shards with its own keypoint set, recorded in the manifest and streamed in that layout;
* a custom set defined only by a COCO file's category (5 keypoints, its own skeleton) goes end to end:
  shard, a few Ray Train steps, `vitpose eval --checkpoint --shards`, `vitpose predict` drawing its skeleton;
* multi-dataset fine-tuning: synthetic COCO-layout people + synthetic AIC-layout people, one backbone
  (MoE FFNs) and one decoder per dataset, both decoders trained, AP per dataset, single-dataset export.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.cli import main
from pipelines.config import build_config
from pipelines.data import StreamConfig, iter_pose_batches, shard_keypoint_sets
from pipelines.finetune.config import FinetuneConfig
from pipelines.finetune.run import build_finetune_model, run_finetune
from pipelines.shard.config import ShardConfig, ShardSource
from pipelines.shard.crops import CropConfig
from pipelines.shard.run import run_shard, write_synthetic_dataset
from vitpose_core.checkpoint import load_model
from vitpose_core.keypoints import KeypointSet, get_keypoint_set
from vitpose_core.synthetic import SyntheticConfig
from vitpose_core.visualize import draw_poses

CROP = CropConfig(width=72, height=96)

# shared sample -> (annotation file, image folder, the keypoint set its rows must carry)
SHARED = {
    "coco": ("coco/test_coco.json", "coco", "coco"),
    "aic": ("aic/test_aic.json", "aic", "aic"),
    "aic_raw": ("aic/keypoint_annotations_example.json", "aic", "aic"),
    "mpii": ("mpii/test_mpii.json", "mpii", "mpii"),
    "crowdpose": ("crowdpose/test_crowdpose.json", "crowdpose", "crowdpose"),
    "ochuman": ("ochuman/test_ochuman.json", "ochuman", "coco"),  # OCHuman annotates COCO-17
    "ap10k": ("ap10k/test_ap10k.json", "ap10k", "ap10k"),
    "posetrack18": ("posetrack18/annotations/test_posetrack18_val.json", "posetrack18", "posetrack18"),
}


def test_each_shared_sample_shards_and_streams_with_its_own_keypoint_set(ray_local, shared_data, tmp_path):
    sources = [ShardSource(annotations=str(shared_data / ann), images=str(shared_data / images), dataset=name,
                           split="val") for name, (ann, images, _) in SHARED.items()]
    manifest = run_shard(ShardConfig(sources=tuple(sources), out=str(tmp_path / "shards"), crop=CROP))
    recorded = shard_keypoint_sets(str(tmp_path / "shards"))
    assert sorted(recorded) == sorted(SHARED)
    tables = [pq.read_table(tmp_path / "shards" / f["path"]) for f in manifest["files"]]
    for name, (_, _, expected) in SHARED.items():
        builtin = get_keypoint_set(expected)
        assert recorded[name].same_layout(builtin), name  # names, flip pairs, skeleton, sigmas
        assert manifest["keypoint_sets"][name]["skeleton"] == [list(limb) for limb in builtin.skeleton]
        rows = [k for t in tables for d, k in zip(t["dataset"].to_pylist(), t["keypoints"].to_pylist(), strict=True)
                if d == name]
        assert rows and all(len(k) == builtin.num_keypoints for k in rows), name
        # the stream emits the dataset's own layout: K target channels, flips from its own pairs
        batch = next(iter_pose_batches(str(tmp_path / "shards"), StreamConfig(input_size=(48, 64)), batch_size=4,
                                       datasets=[name], split="val"))
        assert batch["target"].shape[1:] == (builtin.num_keypoints, 16, 12), name
    # several layouts in one single-decoder stream is an error that says what to do
    with pytest.raises(ValueError, match="different keypoint sets"):
        next(iter_pose_batches(str(tmp_path / "shards"), StreamConfig(input_size=(48, 64)), batch_size=4))


# ---- a custom set defined only by a COCO file's category ------------------------------------------------

CUSTOM_NAMES = ["crown", "left_hand", "right_hand", "left_foot", "right_foot"]
FROM_COCO = [0, 9, 10, 15, 16]  # nose, wrists, ankles of the synthetic people
CUSTOM_SKELETON_1_BASED = [[1, 2], [1, 3], [1, 4], [1, 5], [4, 5]]


def _write_custom_split(root: Path, split: str, images: int, seed: int) -> str:
    """Synthetic people relabelled as a 5-keypoint 'stickman' set that no built-in table knows."""
    annotations = write_synthetic_dataset(str(root / split), SyntheticConfig(num_images=images, seed=seed), split)
    document = json.loads(Path(annotations).read_text())
    for ann in document["annotations"]:
        points = np.asarray(ann["keypoints"], dtype=float).reshape(17, 3)[FROM_COCO]
        ann["keypoints"] = points.reshape(-1).tolist()
        ann["num_keypoints"] = int((points[:, 2] > 0).sum())
    document["categories"] = [{"id": 1, "name": "stickman", "supercategory": "stickman",
                               "keypoints": CUSTOM_NAMES, "skeleton": CUSTOM_SKELETON_1_BASED}]
    Path(annotations).write_text(json.dumps(document))
    return annotations


def _finetune_config(shards: str, storage: Path, **extra) -> FinetuneConfig:
    data = {
        "model": {"variant": "vitpose-tiny", "input_size": [48, 64]},
        "data": {"shards": shards, "batch_size": 8, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3},
        "schedule": {"epochs": 1, "max_steps": 4, "warmup_steps": 1, "kind": "constant"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5, "precision": "fp32"},
        "checkpoint": {"storage_path": str(storage), "every_n_steps": 100},
        "tracking": {"enabled": False},
        "eval": {"batch_size": 16, "num_visualized": 0},
        **extra,
    }
    return build_config(FinetuneConfig, data)


def test_custom_keypoint_set_from_a_coco_category_shards_trains_evaluates_and_draws(ray_local, tmp_path, capsys):
    sources = [ShardSource(annotations=_write_custom_split(tmp_path / "data", split, images, seed),
                           images=str(tmp_path / "data" / split / "images"), dataset="stickman", split=split)
               for split, images, seed in (("train", 12, 0), ("val", 3, 1))]
    shards = str(tmp_path / "shards")
    manifest = run_shard(ShardConfig(sources=tuple(sources), out=shards, crop=CROP))
    recorded = manifest["keypoint_sets"]["stickman"]
    assert recorded["names"] == CUSTOM_NAMES
    assert recorded["skeleton"] == [[a - 1, b - 1] for a, b in CUSTOM_SKELETON_1_BASED]
    assert recorded["flip_pairs"] == [[1, 2], [3, 4]]  # inferred from left/right names

    output = run_finetune(_finetune_config(shards, tmp_path / "runs"), name="ft-stickman")
    checkpoint = output.outputs["checkpoint"]
    assert checkpoint and 0.0 <= output.metrics["val_AP"] <= 1.0
    model = load_model(checkpoint)
    custom = model.config.keypoint_set_data  # the checkpoint records the whole set, not just a name
    assert list(custom.names) == CUSTOM_NAMES and custom.skeleton == tuple(map(tuple, recorded["skeleton"]))

    assert main(["eval", "--checkpoint", checkpoint, "--shards", shards, "--precision", "fp32",
                 "--output", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["AP"] == pytest.approx(output.metrics["val_AP"], abs=1e-6)  # what training logged

    image_bgr = cv2.imread(str(tmp_path / "data" / "val" / "images" / sorted(
        p.name for p in (tmp_path / "data" / "val" / "images").iterdir())[0]))
    cv2.imwrite(str(tmp_path / "person.png"), image_bgr)  # lossless input: pixel-exact comparison below
    capsys.readouterr()
    assert main(["predict", "--checkpoint", checkpoint, "--image", str(tmp_path / "person.png"),
                 "--score-thr", "0", "--output-dir", str(tmp_path / "pred")]) == 0
    record = json.loads((tmp_path / "pred" / "person.pose.json").read_text())
    assert record["keypoint_names"] == CUSTOM_NAMES and record["skeleton"] == recorded["skeleton"]
    keypoints = np.asarray([p["keypoints"] for p in record["persons"]])
    assert keypoints.shape == (1, 5, 3)
    drawn = cv2.cvtColor(cv2.imread(str(tmp_path / "pred" / "person.pose.png")), cv2.COLOR_BGR2RGB)
    image = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    boxes = [p["box"] for p in record["persons"]]
    assert np.array_equal(drawn, draw_poses(image, keypoints, custom, 0.0, boxes_xywh=boxes))
    no_limbs = KeypointSet("bare", custom.names, custom.flip_pairs, (), custom.sigmas, custom.upper_body)
    assert not np.array_equal(drawn, draw_poses(image, keypoints, no_limbs, 0.0, boxes_xywh=boxes))  # limbs drawn


# ---- multi-dataset fine-tuning ---------------------------------------------------------------------------

def test_multi_dataset_finetune_trains_both_decoders_and_reports_ap_per_dataset(ray_local, tmp_path):
    sources = []
    for dataset, layout in (("coco", "coco"), ("aic_synth", "aic")):
        for split, images, seed in (("train", 10, 0), ("val", 3, 1)):
            root = tmp_path / dataset / split
            annotations = write_synthetic_dataset(str(root), SyntheticConfig(num_images=images, seed=seed,
                                                                             layout=layout), split)
            sources.append(ShardSource(annotations=annotations, images=str(root / "images"), dataset=dataset,
                                       split=split))
    shards = str(tmp_path / "shards")
    run_shard(ShardConfig(sources=tuple(sources), out=shards, crop=CROP))
    config = _finetune_config(shards, tmp_path / "runs",
                              datasets=[{"name": "coco", "ratio": 1}, {"name": "aic_synth", "ratio": 1}])
    config = config.model_copy(update={"model": config.model.model_copy(update={"num_experts": 2})})

    torch.manual_seed(config.seed)  # the loop's initial weights
    initial = build_finetune_model(config).state_dict()
    output = run_finetune(config, name="ft-multi")
    for name in ("coco", "aic_synth"):
        assert 0.0 <= output.metrics[f"val_AP_{name}"] <= 1.0
    assert output.metrics["val_AP"] == output.metrics["val_AP_coco"]  # the primary dataset's

    model = load_model(output.outputs["checkpoint"])
    assert model.config.dataset_names == ["coco", "aic_synth"] and model.config.num_experts == 2
    assert [s.num_keypoints for s in model.config.dataset_keypoint_sets()] == [17, 14]
    trained = model.state_dict()
    for prefix in ("keypoint_head.", "associate_keypoint_heads.0.", "backbone.blocks.0.mlp.experts.1."):
        changed = [k for k in trained if k.startswith(prefix) and not torch.equal(trained[k], initial[k])]
        assert changed, f"{prefix} was not trained"

    aic_only = load_model(output.outputs["checkpoint"], dataset="aic_synth")
    assert aic_only.config.keypoint_set == "aic" and aic_only.config.num_experts == 0
    assert main(["eval", "--checkpoint", output.outputs["checkpoint"], "--shards", shards, "--precision", "fp32",
                 "--output", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["AP_aic_synth"] == pytest.approx(output.metrics["val_AP_aic_synth"], abs=1e-6)


def _synthetic_shards(tmp_path: Path, images: dict[str, int]) -> str:
    """Shards of synthetic people in two layouts, as bench_multi_dataset writes them: coco and aic_synth."""
    sources = []
    for dataset, layout in (("coco", "coco"), ("aic_synth", "aic")):
        for split, seed in (("train", 0), ("val", 1)):
            root = tmp_path / dataset / split
            annotations = write_synthetic_dataset(str(root), SyntheticConfig(num_images=images[split], seed=seed,
                                                                             layout=layout), split)
            sources.append(ShardSource(annotations=annotations, images=str(root / "images"), dataset=dataset,
                                       split=split))
    shards = str(tmp_path / "shards")
    run_shard(ShardConfig(sources=tuple(sources), out=shards, crop=CROP))
    return shards


def test_per_dataset_val_ap_of_ground_truth_as_predictions_is_one_for_each_layout(ray_local, tmp_path):
    """The finetune's per-dataset val AP (the path bench_multi_dataset scores with too: val rows of one dataset,
    its manifest val file, its keypoint set's sigmas and flip pairs) scores a model that answers every val crop
    with its target heatmaps (and the mirrored crop with the mirrored heatmaps, left and right swapped by the
    generator's own layout) at AP 1 for both decoders, the AIC-14 one included (issue 16)."""
    from pipelines.finetune.run import validate
    from vitpose_core.codec import flip_heatmaps
    from vitpose_core.synthetic import layout_keypoint_set

    shards = _synthetic_shards(tmp_path, {"train": 2, "val": 6})
    config = _finetune_config(shards, tmp_path / "runs", model={"variant": "vitpose-tiny", "input_size": [96, 128]},
                              datasets=[{"name": "coco", "ratio": 1}, {"name": "aic_synth", "ratio": 1}])
    model = build_finetune_model(config)
    stream = config.data.stream_config(config.model.input_size).model_copy(update={"augment": False})
    answers, flips = {}, []
    for index, (name, layout) in enumerate((("coco", "coco"), ("aic_synth", "aic"))):
        flips.append(layout_keypoint_set(layout).flip_index)
        for batch in iter_pose_batches(shards, stream, batch_size=4, split="val", datasets=[name]):
            for image, target in zip(batch["image"], batch["target"], strict=True):
                answers[(index, image.numpy().tobytes())] = target
    asked = []

    def ground_truth(images, extra_tokens=None, dataset_index=None, per_dataset=False):
        count = len(images) // 2  # the eval runs with flip test: the mirrored crops follow the crops
        originals = torch.stack([answers[(dataset_index, image.numpy().tobytes())] for image in images[:count]])
        asked.append((dataset_index, count))
        return torch.cat([originals, flip_heatmaps(originals, flips[dataset_index])])

    model.forward = ground_truth
    metrics = validate(model, config, tracker=None, epoch=0)
    assert {index for index, _ in asked} == {0, 1}
    assert metrics["val_AP_coco"] == pytest.approx(1.0, abs=1e-6), metrics
    assert metrics["val_AP_aic_synth"] == pytest.approx(1.0, abs=1e-6), metrics


def test_mix_by_ratio_follows_the_ratios_uses_every_row_and_never_runs_short():
    import pyarrow as pa

    from pipelines.data import mix_by_ratio

    # 30 rows of "a", 10 of "b", arriving a-heavy; ratio 1:1 asks for equal shares
    datasets = ["a"] * 30 + ["b"] * 10
    tables = [pa.table({"dataset": datasets[i:i + 8], "row": list(range(i, i + 8))}) for i in range(0, 40, 8)]
    batches = list(mix_by_ratio(tables, ["a", "b"], [1, 1], batch_size=4, buffer_rows=64))
    rows = [r for b in batches for r in b["row"].to_pylist()]
    assert set(rows) == set(range(40))  # every row once at least (b repeats once it runs out)
    assert len([b for b in batches if b.num_rows == 4]) >= 40 // 4  # >= plain batching: DDP ranks stay in step
    first = [d for b in batches[:5] for d in b["dataset"].to_pylist()]
    assert first.count("a") == first.count("b") == 10  # while both have rows, the 1:1 ratio holds exactly
    with pytest.raises(ValueError, match="dataset 'c'"):
        list(mix_by_ratio([pa.table({"dataset": ["c"], "row": [0]})], ["a", "b"], [1, 1], batch_size=2))


def test_a_shared_non_coco_sample_trains_a_few_steps_and_evaluates_in_its_own_layout(ray_local, shared_data, tmp_path):
    # MPII in its own list layout (converted by the shard stage): 16 keypoints, raw-format val ground truth
    sources = [ShardSource(annotations=str(shared_data / "mpii/test_mpii.json"), images=str(shared_data / "mpii"),
                           dataset="mpii", split=split) for split in ("train", "val")]
    shards = str(tmp_path / "shards")
    run_shard(ShardConfig(sources=tuple(sources), out=shards, crop=CROP))
    config = _finetune_config(shards, tmp_path / "runs",
                              data={"shards": shards, "batch_size": 2, "shuffle_buffer": 8})
    output = run_finetune(config, name="ft-mpii")
    model = load_model(output.outputs["checkpoint"])
    assert model.config.keypoint_set_data == get_keypoint_set("mpii") and model.config.num_keypoints == 16
    assert output.metrics["steps"] == 2 and 0.0 <= output.metrics["val_AP"] <= 1.0


def test_export_takes_one_datasets_model_out_of_a_multi_dataset_checkpoint(tmp_path):
    from vitpose_core.checkpoint import save_checkpoint
    from vitpose_core.models import build_model
    from vitpose_core.multi_dataset import dataset_view

    torch.manual_seed(0)
    multi = build_model("vitpose-tiny", input_size=(48, 64), num_experts=2, part_features=48,
                        datasets=[("coco", get_keypoint_set("coco")), ("aic_synth", get_keypoint_set("aic"))]).eval()
    save_checkpoint(multi, tmp_path / "multi")
    assert main(["export", "--checkpoint", str(tmp_path / "multi"), "--format", "checkpoint",
                 "--dataset", "aic_synth", "--out", str(tmp_path / "aic")]) == 0
    single = load_model(tmp_path / "aic")
    assert single.config.keypoint_set_data == get_keypoint_set("aic") and single.config.num_experts == 0
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.allclose(single(images), dataset_view(multi, "aic_synth")(images), atol=1e-5)


def test_a_mix_transformed_in_ray_data_follows_the_ratio_in_each_datasets_layout(ray_local, tmp_path):
    """data.preprocess.where: ray_data with a multi-dataset mix: Ray Data tasks emit each row in its own
    dataset's layout (AIC-14 rows padded to 17 with weight 0), and the consumer re-cuts the transformed rows
    into batches by ratio, every row used, as the in-worker stream does with shard rows."""
    from pipelines.data import iter_prepared_batches, read_shards, transform_in_ray_data

    shards = _synthetic_shards(tmp_path, {"train": 12, "val": 1})
    stream = StreamConfig(input_size=(48, 64), augment=False)
    mixed = ["coco", "aic_synth"]
    rows = read_shards(shards, split="train")
    per_dataset = {name: rows.filter(expr=f"dataset == '{name}'").count() for name in mixed}
    assert min(per_dataset.values()) >= 8, per_dataset
    prepared = transform_in_ray_data(rows, stream, keypoint_sets=shard_keypoint_sets(shards), batch_size=8,
                                     num_cpus=0.5, max_tasks=2, mixed_datasets=mixed)
    batches = list(iter_prepared_batches(prepared, batch_size=4, shuffle=False, drop_last=True,
                                         mixed_datasets=mixed, ratios=[1, 1]))
    assert batches and all(len(b["ann_id"]) == 4 for b in batches)
    assert batches[0]["image"].dtype == torch.float32 and batches[0]["image"].shape[1:] == (3, 64, 48)
    seen = {(int(d), int(a)) for b in batches for d, a in zip(b["dataset_index"], b["ann_id"], strict=True)}
    assert len(seen) >= sum(per_dataset.values()) - 3  # every row but a last short batch's (ann ids repeat across)
    # while both datasets have rows, each batch holds two of each (1:1); at the end the short one repeats rows
    for batch in batches[:min(per_dataset.values()) // 2]:
        assert sorted(batch["dataset_index"].tolist()) == [0, 0, 1, 1], batch["dataset_index"]
    for batch in batches:
        assert batch["target"].shape[1] == 17
        aic = batch["dataset_index"] == 1
        assert torch.all(batch["target_weight"][aic, 14:] == 0) and torch.all(batch["keypoints"][aic, 14:] == 0)
        assert torch.any(batch["target_weight"][aic, :14] > 0)


def test_multi_dataset_finetune_with_the_transform_in_ray_data_trains_both_decoders(ray_local, tmp_path):
    shards = _synthetic_shards(tmp_path, {"train": 10, "val": 2})
    config = _finetune_config(shards, tmp_path / "runs",
                              datasets=[{"name": "coco", "ratio": 1}, {"name": "aic_synth", "ratio": 1}])
    config = config.model_copy(update={
        "data": config.data.model_copy(update={"preprocess": config.data.preprocess.model_copy(
            update={"where": "ray_data", "num_cpus": 0.5, "max_tasks": 1})})})
    torch.manual_seed(config.seed)  # the loop's initial weights
    initial = build_finetune_model(config).state_dict()
    output = run_finetune(config, name="ft-multi-ray-data")
    assert output.metrics["steps"] == 4
    for name in ("coco", "aic_synth"):
        assert 0.0 <= output.metrics[f"val_AP_{name}"] <= 1.0
    trained = load_model(output.outputs["checkpoint"]).state_dict()
    for prefix in ("keypoint_head.", "associate_keypoint_heads.0."):
        changed = [k for k in trained if k.startswith(prefix) and not torch.equal(trained[k], initial[k])]
        assert changed, f"{prefix} was not trained"
