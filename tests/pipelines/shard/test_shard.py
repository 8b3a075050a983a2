"""Shard stage on the real COCO / AIC samples: one row per person, exact geometry, nothing lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, build_config
from pipelines.shard.config import ShardConfig
from pipelines.shard.run import run_shard
from vitpose_core.geometry import transform_points


def sample_sources(data: Path) -> list[dict]:
    return [
        {"annotations": str(data / "coco/test_coco.json"), "images": str(data / "coco"), "dataset": "coco", "split": "val"},
        {"annotations": str(data / "aic/test_aic.json"), "images": str(data / "aic"), "dataset": "aic", "split": "val"},
        # the raw AIC file lists 1000 images; only 3 are in the samples, the rest must show up as skips
        {"annotations": str(data / "aic/keypoint_annotations_example.json"), "images": str(data / "aic"),
         "dataset": "aic", "split": "train"},
    ]


def read_rows(out: str | Path) -> list[dict]:
    table = pq.read_table(Path(out) / "shards")
    return sorted(table.to_pylist(), key=lambda r: (r["dataset"], r["split"], r["ann_id"]))


@pytest.fixture(scope="module")
def sharded(ray_local, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    config = ShardConfig.model_validate({"sources": sample_sources(shared_data), "out": str(out),
                                         "rows_per_file": 8, "images_per_task": 50})
    return config, run_shard(config), out


def test_one_row_per_person_with_keypoints_and_every_record_accounted_for(sharded):
    _, manifest, out = sharded
    counts = manifest["counts"]
    assert counts["coco/val"] == {"records_in": 14, "rows_out": 12, "skipped": 2,
                                  "skipped_by_reason": {"no_keypoints": 2}}
    assert counts["aic/val"] == {"records_in": 9, "rows_out": 9, "skipped": 0, "skipped_by_reason": {}}
    assert counts["aic/train"] == {"records_in": 2761, "rows_out": 9, "skipped": 2752,
                                   "skipped_by_reason": {"missing_image": 2752}}
    assert len(read_rows(out)) == 30 == sum(f["rows"] for f in manifest["files"])
    assert all(f["rows"] <= 8 for f in manifest["files"])  # rows_per_file is honoured
    assert len(manifest["skipped"]) == 2754 and all(s["reason"] and s["detail"] for s in manifest["skipped"])
    assert {i["sha256"] for i in manifest["inputs"]} and all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not (out / "_skipped").exists()  # side output merged into the manifest, then removed


def test_keypoints_map_back_to_the_annotations_within_half_a_pixel(sharded, shared_data):
    _, _, out = sharded
    originals = {}
    for dataset, name in (("coco", "coco/test_coco.json"), ("aic", "aic/test_aic.json")):
        document = json.loads((shared_data / name).read_text())
        sizes = {i["id"]: (i["width"], i["height"]) for i in document["images"]}
        for ann in document["annotations"]:
            originals[(dataset, ann["id"])] = (ann, sizes[ann["image_id"]])
    checked = 0
    for row in read_rows(out):
        if row["split"] != "val":
            continue
        ann, (width, height) = originals[(row["dataset"], row["ann_id"])]
        expected = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
        keypoints = np.asarray(row["keypoints"], np.float64)
        assert keypoints.shape == expected.shape
        np.testing.assert_array_equal(keypoints[:, 2], expected[:, 2])
        labelled = expected[:, 2] > 0
        assert np.all(keypoints[~labelled] == 0)
        back = transform_points(keypoints[labelled, :2], np.asarray(row["crop_to_image"], np.float64))
        np.testing.assert_allclose(back, expected[labelled, :2], atol=0.5)
        np.testing.assert_allclose(row["bbox"], ann["bbox"], atol=1e-3)
        assert (row["width"], row["height"], row["image_id"]) == (width, height, ann["image_id"])
        crop = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
        assert crop.shape == (384, 288, 3)
        # the context margin keeps every labelled keypoint of the samples inside the crop
        assert np.all((keypoints[labelled, :2] >= 0) & (keypoints[labelled, :2] <= [287, 383]))
        np.testing.assert_allclose(row["person_center"], [143.5, 191.5])
        checked += 1
    assert checked == 21


def test_raw_aic_gives_the_same_people_as_its_coco_style_conversion(sharded):
    _, _, out = sharded
    rows = read_rows(out)
    by_box = lambda split: {(r["source"], tuple(r["bbox"])): r for r in rows if r["dataset"] == "aic" and r["split"] == split}  # noqa: E731
    raw, converted = by_box("train"), by_box("val")
    assert raw.keys() == converted.keys() and len(raw) == 9
    for key, row in raw.items():
        np.testing.assert_allclose(row["keypoints"], converted[key]["keypoints"], atol=1e-4)
        assert len(row["keypoints"]) == 14  # AIC keeps its native 14 keypoints


def test_rerun_is_a_no_op_and_force_reproduces_the_same_rows(sharded):
    config, manifest, out = sharded
    files = sorted((out / "shards").glob("*.parquet"))
    stamps = [f.stat().st_mtime_ns for f in files]
    assert run_shard(config) == manifest
    assert [f.stat().st_mtime_ns for f in files] == stamps
    before = read_rows(out)
    assert run_shard(config, force=True) == manifest  # deterministic: same files, counts and skips
    assert read_rows(out) == before
    changed = config.model_copy(update={"rows_per_file": 4})
    with pytest.raises(ValueError, match="--force"):
        run_shard(changed)


def test_the_stage_deletes_only_what_it_wrote_and_refuses_to_overwrite_other_files(ray_local, shared_data, tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    theirs = out / "shards" / "notes.txt"
    theirs.write_text("not a shard")
    beside = out / "README.md"  # beside the stage's folders: never the stage's business
    beside.write_text("keep me")
    config = ShardConfig.model_validate({"sources": sample_sources(shared_data)[:1], "out": str(out)})
    with pytest.raises(ValueError, match=r"holds files vitpose shard did not write \(shards/notes\.txt\)"):
        run_shard(config)
    assert theirs.read_text() == "not a shard" and not (out / "manifest.json").exists()

    theirs.unlink()
    manifest = run_shard(config)
    assert manifest["totals"]["rows_out"] > 0 and beside.read_text() == "keep me"
    owned = set(json.loads((out / ".vitpose-shard.json").read_text())["files"])
    assert owned == {f["path"] for f in manifest["files"]} | {"manifest.json"}
    # a file dropped in after the run is refused on the forced rerun; the stage's own files are replaced
    late = out / "shards" / "extra.parquet"
    late.write_bytes(b"x")
    with pytest.raises(ValueError, match="extra.parquet"):
        run_shard(config, force=True)
    late.unlink()
    assert run_shard(config, force=True)["files"] == manifest["files"] and beside.read_text() == "keep me"


def test_damaged_inputs_are_skipped_with_reasons(ray_local, shared_data, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(shared_data / "coco", images, ignore=shutil.ignore_patterns("*.json", "*.md"))
    truncated = images / "000000196141.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (images / "000000040083.jpg").unlink()
    document = json.loads((shared_data / "coco/test_coco.json").read_text())
    anns = [a for a in document["annotations"] if a["image_id"] == 197388]  # the intact image
    anns[0]["bbox"] = [10.0, 10.0, -5.0, 40.0]  # negative width
    anns[1]["bbox"] = [5000.0, 10.0, 50.0, 50.0]  # entirely right of the 640 px image
    anns[2]["keypoints"][0] = 9999  # a labelled keypoint outside the image
    del anns[3]["keypoints"]  # malformed record
    (tmp_path / "coco.json").write_text(json.dumps(document))
    (tmp_path / "broken.json").write_text("this is { not json")
    sources = [{"annotations": str(tmp_path / name), "images": str(images), "dataset": "coco", "split": split}
               for name, split in (("coco.json", "val"), ("broken.json", "train"))]
    manifest = run_shard(build_config(ShardConfig, {"sources": sources, "out": str(tmp_path / "out")}))

    reasons = {s["ann_id"]: s["reason"] for s in manifest["skipped"]}
    assert reasons[anns[0]["id"]] == "invalid_box"
    assert reasons[anns[1]["id"]] == "box_outside_image"
    assert reasons[anns[2]["id"]] == "keypoints_outside_image"
    assert reasons[anns[3]["id"]] == "malformed_annotation"
    by_reason = manifest["counts"]["coco/val"]["skipped_by_reason"]
    # the persons without keypoints are skipped as such before their image is even opened
    assert by_reason == {"undecodable_image": 4, "missing_image": 2, "no_keypoints": 2, "invalid_box": 1,
                         "box_outside_image": 1, "keypoints_outside_image": 1, "malformed_annotation": 1}
    assert manifest["counts"]["coco/val"]["rows_out"] == 2  # 000000000785 (1) + the last 197388 person
    (file_skip,) = manifest["skipped_files"]
    assert file_skip["reason"] == "malformed_json" and file_skip["annotations"].endswith("broken.json")
    truncated_skip = next(s for s in manifest["skipped"] if s["reason"] == "undecodable_image")
    assert "truncated" in truncated_skip["detail"]


def test_config_is_strict():
    with pytest.raises(ConfigError, match="rows_per_fil"):
        build_config(ShardConfig, {"sources": [], "out": "x", "rows_per_fil": 3})
    with pytest.raises(ConfigError, match="sources"):
        build_config(ShardConfig, {"sources": [], "out": "x"})


def test_rows_do_not_depend_on_how_images_are_packed_into_tasks(sharded, tmp_path):
    """Tasks are packed by images_per_task and rows_per_file; an image with more people than rows_per_file
    is one task written as several files. The rows and the counts stay the same."""
    config, manifest, out = sharded
    small = config.model_copy(update={"out": str(tmp_path / "small"), "rows_per_file": 2, "images_per_task": 2})
    packed = run_shard(small)
    assert packed["counts"] == manifest["counts"] and packed["skipped"] == manifest["skipped"]
    assert all(f["rows"] <= 2 for f in packed["files"]) and len(packed["files"]) > len(manifest["files"])
    # a sample image holds more than 2 people: its task wrote part-<task>-0 and part-<task>-1
    assert any(f["path"].endswith("-1.parquet") for f in packed["files"])
    assert read_rows(tmp_path / "small") == read_rows(out)
