"""`vitpose infer` end to end on real Ray Data (the session's local cluster), real files, a real S3 server.

A tiny random-weight ViTPose keeps it fast: what is checked is the plumbing (every image and frame in
the results, ids that pycocotools accepts, skips, resume, renders, S3), not the poses' quality.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from serve_helpers import tiny_checkpoint

from pipelines import storage
from pipelines.cli import main

COCO_IMAGES = ("000000000785.jpg", "000000040083.jpg", "000000196141.jpg", "000000197388.jpg")


def infer(capsys, *argv) -> str:
    code = main(["infer", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def error_of(capsys, *argv) -> str:
    assert main(["infer", *map(str, argv)]) == 2
    return capsys.readouterr().err


def coco_from(images_json: dict) -> COCO:
    """A ground truth with the images infer wrote (no annotations): what loadRes needs to accept the results."""
    coco = COCO()
    coco.dataset = {"images": images_json["images"], "categories": images_json["categories"], "annotations": []}
    coco.createIndex()
    return coco


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def image_dir(shared_data, tmp_path_factory) -> Path:
    """The 4 COCO val images, a corrupt one with a COCO-style name, and a file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    for name in COCO_IMAGES:
        shutil.copy(shared_data / "coco" / name, folder / name)
    (folder / "000000000001.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (folder / "notes.txt").write_text("not an input")
    return folder


def test_images_with_boxes_render_resume_and_model_change(ray_local, shared_data, checkpoint, image_dir, tmp_path,
                                                           capsys):
    out = tmp_path / "out"
    dets = shared_data / "coco" / "test_coco_det_AP_H_56.json"
    argv = ["--checkpoint", checkpoint, "--input", image_dir, "--out", out, "--boxes", dets,
            "--box-score-thr", "0.3", "--batch-size", "2", "--render"]
    first = infer(capsys, *argv)
    assert "3 of 3 to run" in first and "skipped  1 unreadable images: 000000000001.jpg" in first

    images = json.loads((out / "images.json").read_text())
    assert sorted(i["id"] for i in images["images"]) == [785, 40083, 196141, 197388]  # numeric stems = COCO ids
    assert [s["file_name"] for s in images["skipped"]] == ["000000000001.jpg"]
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} == {785, 40083, 196141, 197388}
    assert all(r["category_id"] == 1 and len(r["keypoints"]) == 17 * 3 and 0 <= r["score"] <= 1 for r in results)
    # loads in pycocotools against the ids infer wrote, and against COCO's own ground truth (same ids)
    assert len(coco_from(images).loadRes(str(out / "results.json")).getAnnIds()) == len(results)
    ground_truth = COCO(str(shared_data / "coco" / "test_coco.json"))
    assert len(ground_truth.loadRes(copy.deepcopy(results)).getAnnIds()) == len(results)  # loadRes adds keys
    summary = json.loads((out / "infer.json").read_text())
    assert summary["counts"]["skipped"] == 1 and summary["boxes"]["used"] > 4
    drawn = cv2.imread(str(out / "rendered" / "000000000785.jpg"))
    assert drawn.shape == cv2.imread(str(image_dir / "000000000785.jpg")).shape

    parts = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("part-*.json")}
    assert len(parts) == 3
    again = infer(capsys, *argv)  # the same command: every part is found, nothing is posed again
    assert "0 of 3 to run, 3 finished earlier (skipped)" in again and "ray " not in again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("part-*.json")} == parts
    assert json.loads((out / "results.json").read_text()) == results

    other = tiny_checkpoint(tmp_path / "other", seed=1)  # another model: no stale part may be reused
    changed = infer(capsys, *[other if a == checkpoint else a for a in argv])
    assert "3 of 3 to run" in changed and "3 stale removed" in changed
    assert not set(parts) & {p.name for p in (out / "parts").glob("part-*.json")}
    assert json.loads((out / "results.json").read_text()) != results


def test_video_every_frame_in_results_and_a_drawn_video(ray_local, shared_data, checkpoint, tmp_path, capsys):
    out = tmp_path / "video-out"
    video = shared_data / "video" / "demo.mp4"  # 5 frames, 960x540
    printed = infer(capsys, "--checkpoint", checkpoint, "--input", video, "--out", out, "--batch-size", "2",
                    "--render")
    assert "whole-image box" in printed and "3 of 3 to run" in printed
    images = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in images["images"]] == [0, 1, 2, 3, 4]
    assert images["images"][3]["file_name"] == "demo/frame_000003"
    assert all((i["width"], i["height"]) == (960, 540) for i in images["images"])
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["image_id"] for r in results) == [0, 1, 2, 3, 4]  # one whole-image person per frame
    assert len(coco_from(images).loadRes(copy.deepcopy(results)).getAnnIds()) == 5
    capture = cv2.VideoCapture(str(out / "rendered" / "demo.pose.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 5 and int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == 960
    capture.release()


def test_video_parts_read_the_frames_a_sequential_read_gives(shared_data):
    from pipelines.infer.worker import _read_video_frames

    video = str(shared_data / "video" / "demo_skeleton.mp4")
    capture = cv2.VideoCapture(video)
    sequential = [cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB) for _ in range(12)]
    capture.release()
    seeked = _read_video_frames([[index, "", video, index] for index in (9, 10, 11)])
    assert all(np.array_equal(a, b) for a, b in zip(seeked, sequential[9:12], strict=True))
    assert _read_video_frames([[5000, "", video, 5000]]) == [f"frame 5000 of {video} could not be decoded"]


def test_s3_prefix_in_and_out_with_two_actors(ray_local, s3_server, shared_data, checkpoint, capsys):
    for name in COCO_IMAGES[:2]:
        storage.write_bytes(f"s3://vitpose-test/infer/in/{name}", (shared_data / "coco" / name).read_bytes())
    out = "s3://vitpose-test/infer/out"
    printed = infer(capsys, "--checkpoint", checkpoint, "--input", "s3://vitpose-test/infer/in", "--out", out,
                    "--batch-size", "1", "--actors", "2", "--render")
    assert "2 actor(s)" in printed
    images = json.loads(storage.read_text(f"{out}/images.json"))
    assert sorted(i["id"] for i in images["images"]) == [785, 40083]
    results = json.loads(storage.read_text(f"{out}/results.json"))
    assert sorted(r["image_id"] for r in results) == [785, 40083]
    assert len(storage.list_files(f"{out}/parts", ".json")) == 2
    drawn = storage.read_bytes(f"{out}/rendered/{COCO_IMAGES[0]}")
    assert cv2.imdecode(np.frombuffer(drawn, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (425, 640)
    assert "0 of 2 to run" in infer(capsys, "--checkpoint", checkpoint, "--input", "s3://vitpose-test/infer/in",
                                    "--out", out, "--batch-size", "1", "--actors", "2", "--render")


def test_a_person_detector_finds_the_boxes(ray_local, shared_data, checkpoint, tmp_path, capsys):
    from detector_helpers import briefly_trained_detector

    # 8 training steps at score threshold 0: real boxes, not people; the plumbing is what counts here
    detector = briefly_trained_detector(tmp_path / "detector-train")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(shared_data / "coco" / COCO_IMAGES[0], folder / COCO_IMAGES[0])
    out = tmp_path / "out"
    printed = infer(capsys, "--checkpoint", checkpoint, "--input", folder, "--out", out, "--detector", detector,
                    "--detector-score-thr", "0", "--no-oks-nms")
    assert f"person detector {detector}" in printed
    part = json.loads(next((out / "parts").glob("part-*.json")).read_text())
    persons = part["images"][0]["persons"]
    assert 1 <= len(persons) <= 32 and all(p["box_score"] < 1.0 for p in persons)  # max_detections 32
    assert len(json.loads((out / "results.json").read_text())) == len(persons)


def test_bad_inputs_name_the_path(checkpoint, s3_server, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert f"--input {missing}: no such folder or video file" in error_of(
        capsys, "--checkpoint", checkpoint, "--input", missing, "--out", tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    assert f"--input {empty}: no .jpg/.jpeg/.png images in it" in error_of(
        capsys, "--checkpoint", checkpoint, "--input", empty, "--out", tmp_path / "o")
    assert "--input s3://vitpose-test/no/such/prefix: nothing under this S3 prefix" in error_of(
        capsys, "--checkpoint", checkpoint, "--input", "s3://vitpose-test/no/such/prefix", "--out", tmp_path / "o")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    assert f"--input {broken}:" in error_of(capsys, "--checkpoint", checkpoint, "--input", broken,
                                            "--out", tmp_path / "o")
    assert f"--checkpoint {missing}: not found" in error_of(capsys, "--checkpoint", missing, "--input", empty,
                                                           "--out", tmp_path / "o")


def test_a_registered_model_by_alias(ray_local, shared_data, checkpoint, tmp_path, capsys):
    import mlflow

    from pipelines import registry

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("infer-tests", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        model_uri = registry.log_checkpoint_model(checkpoint, tracking_uri=tracking_uri)
    registry.set_alias("vitpose-infer", "champion", registry.register(model_uri, "vitpose-infer", tracking_uri),
                       tracking_uri)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(shared_data / "coco" / COCO_IMAGES[1], folder / COCO_IMAGES[1])
    argv = ["--input", folder, "--out", tmp_path / "out", "--tracking-uri", tracking_uri]
    printed = infer(capsys, "--model-alias", "champion", "--model-name", "vitpose-infer", *argv)
    assert "model    vitpose-infer v1 (@champion)" in printed
    summary = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert summary["model_identity"] == "models:/vitpose-infer/1" and summary["counts"]["results"] == 1
    assert "nope" in error_of(capsys, "--model-alias", "nope", "--model-name", "vitpose-infer", *argv)
