"""`run_infer`: the inputs -> parts -> Ray Data actor pool -> part files -> `results.json` + `images.json`.

Output under `out` (a local folder or an s3:// prefix):

    out/parts/part-<key>.json   one per part (batch_size images or frames): per image its size and persons
                                (box, box score, crop area, keypoints), or why it was skipped; written by the
                                driver as each part comes back, so an interrupted run keeps what it finished
    out/results.json            COCO keypoint results: image_id, category_id 1, keypoints [x, y, score] * K,
                                score = box score x mean keypoint score > 0.2 (`evaluation.instance_score`,
                                as the API's `score`), OKS-NMS per image unless turned off (as `vitpose eval`)
    out/images.json             COCO `images` (id, file_name, width, height) and `categories` (the model's
                                keypoint set), plus `skipped` (unreadable images with the reason)
    out/infer.json              what ran: inputs, model, people source, counts, parts run / skipped, times
    out/rendered/               with render: drawn images, or `<video stem>.pose.mp4`

`prepare` does everything that needs no Ray (inputs, boxes, part keys, which parts exist); `execute`
runs the missing parts and merges. A rerun of the same command finds every part and only merges.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from pipelines import storage
from pipelines.infer.config import InferConfig
from pipelines.infer.inputs import InputPlan, Part, load_boxes, make_parts, plan_inputs
from pipelines.infer.worker import RENDERED_DIR, PoseWorker

logger = logging.getLogger(__name__)

PARTS_DIR, RESULTS, IMAGES, SUMMARY = "parts", "results.json", "images.json", "infer.json"


@dataclass
class Prepared:
    """A run planned on the driver: its inputs, parts, and the part records already written."""

    config: InferConfig
    out: str
    plan: InputPlan
    parts: list[Part]
    done: dict[str, dict[str, Any]]  # part file name -> its record, for the parts that need no rerun
    stale: list[str]  # part files of other inputs, models or settings
    box_counts: dict[str, int] | None = None
    ran: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def todo(self) -> list[Part]:
        return [part for part in self.parts if part.file_name() not in self.done]

    def people_source(self) -> str:
        if self.config.boxes is not None:
            counts = self.box_counts or {}
            return (f"boxes from {self.config.boxes} ({counts.get('used', 0)} boxes >= score "
                    f"{self.config.box_score_threshold} for {counts.get('images_with_boxes', 0)} images)")
        if self.config.detector is not None:
            return f"person detector {self.config.detector.label}"
        return "one whole-image box per image (no --boxes and no detector; ViTPose is top-down)"


def prepare(config: InferConfig) -> Prepared:
    """Plan inputs and parts and read the parts already written; no Ray, no model loading."""
    out = storage.normalize(config.out)
    plan = plan_inputs(config.input, config.max_frames, config.frame_stride)
    boxes, box_counts = load_boxes(config.boxes, plan, config.box_score_threshold) if config.boxes else (None, None)
    parts = make_parts(plan, config, boxes)
    wanted = {part.file_name() for part in parts}
    existing = {uri.rsplit("/", 1)[-1]: uri for uri in storage.list_files(storage.join(out, PARTS_DIR), ".json")}
    done = {}
    render_images = config.render and plan.kind == "images"
    for name in sorted(wanted & set(existing)):
        try:
            record = json.loads(storage.read_text(existing[name]))
        except (ValueError, FileNotFoundError):  # a torn write: run that part again
            continue
        if not render_images or record.get("rendered"):
            done[name] = record
    stale = sorted(uri for name, uri in existing.items() if name.startswith("part-") and name not in wanted)
    return Prepared(config, out, plan, parts, done, stale, box_counts)


def execute(prepared: Prepared, stream: TextIO | None = None) -> dict[str, Any]:
    """Run the missing parts on the connected Ray cluster, then merge; returns the run summary."""
    stream = stream or sys.stdout
    started = time.perf_counter()
    for uri in prepared.stale:
        storage.delete_file(uri)
    todo = prepared.todo
    if todo:
        _run_parts(prepared, todo, stream)
    prepared.seconds["pose"] = time.perf_counter() - started
    summary = _merge(prepared)
    if prepared.config.render and prepared.plan.kind == "video":
        summary["rendered_video"] = _render_video(prepared, summary)
    prepared.seconds["total"] = time.perf_counter() - started
    summary["seconds"] = {k: round(v, 2) for k, v in prepared.seconds.items()}
    storage.write_text(storage.join(prepared.out, SUMMARY), json.dumps(summary, indent=1))
    return summary


def check_resources(config: InferConfig, local: bool) -> None:
    """Fail before Ray Data waits forever: a local cluster must hold the actor pool."""
    import ray

    available = ray.cluster_resources()
    need = {"CPU": config.actors * config.cpus_per_actor}
    if config.device == "cuda":
        need["GPU"] = config.actors * config.gpus_per_actor
    short = {name: (amount, available.get(name, 0.0)) for name, amount in need.items()
             if amount > available.get(name, 0.0)}
    if short and local:
        text = ", ".join(f"{need:g} {name} (it has {have:g})" for name, (need, have) in short.items())
        raise ValueError(f"--actors {config.actors} needs {text} on this local Ray cluster; use fewer actors, "
                         "--cpus-per-actor, or a cluster (RAY_ADDRESS)")
    if short:
        logger.warning("the cluster has %s now, the actor pool needs %s: waiting for the autoscaler", available, need)


def _run_parts(prepared: Prepared, todo: list[Part], stream: TextIO) -> None:
    import ray
    from ray.data import DataContext

    from pipelines.progress import CountProgress

    config = prepared.config
    context = DataContext.get_current()
    saved_raise = context.raise_original_map_exception
    # an actor's error (a checkpoint that will not load, an S3 outage) reaches the driver as itself
    context.raise_original_map_exception = True
    input_fs = storage.s3_filesystem() if storage.is_s3(prepared.plan.source) else None
    out_fs = storage.s3_filesystem() if storage.is_s3(prepared.out) else None
    progress = CountProgress(sum(len(part.items) for part in todo), "infer",
                             "frame" if prepared.plan.kind == "video" else "image", stream=stream)
    try:
        tasks = ray.data.from_items([{"task": json.dumps(part.task())} for part in todo],
                                    override_num_blocks=len(todo))
        results = tasks.map_batches(
            PoseWorker, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=config.actors),
            num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor if config.device == "cuda" else 0,
            fn_constructor_kwargs={
                "model": _actor_ref(config.model), "detector": _actor_ref(config.detector),
                "detector_score_threshold": config.detector_score_threshold, "device": config.device,
                "dtype": config.dtype, "flip_test": config.flip_test, "torch_threads": config.torch_threads,
                "crops_per_forward": config.crops_per_forward, "render": config.render,
                "draw_score_threshold": config.draw_score_threshold, "out": prepared.out,
                "input_fs": input_fs, "out_fs": out_fs})
        for row in results.iter_rows():
            record = json.loads(row["result"])
            name = f"part-{record['key']}.json"
            storage.write_text(storage.join(prepared.out, PARTS_DIR, name), json.dumps(record))
            prepared.done[name] = record
            prepared.ran += 1
            progress.update(len(record["images"]), f"{prepared.ran}/{len(todo)} parts")
    finally:
        progress.close()
        context.raise_original_map_exception = saved_raise


def _actor_ref(model: Any) -> dict[str, Any] | None:
    """What an actor needs to load a `ModelRef`."""
    return None if model is None else {"uri": model.uri, "tracking_uri": model.tracking_uri}


def _merge(prepared: Prepared) -> dict[str, Any]:
    """Every part of the plan -> results.json, images.json; returns the summary (also infer.json)."""
    import numpy as np

    from vitpose_core.evaluation import OKS_NMS_THRESHOLD, PersonPrediction, rescore_and_nms
    from vitpose_core.keypoints import KeypointSet

    config = prepared.config
    records = [prepared.done[part.file_name()] for part in prepared.parts]
    keypoint_set = KeypointSet.from_dict(records[0]["model"]["keypoint_set"], "the model's keypoint set")
    images, skipped, predictions = [], [], []
    outside = 0
    for record in records:
        for entry in record["images"]:
            if "error" in entry:
                skipped.append({"id": entry["image_id"], "file_name": entry["file_name"], "reason": entry["error"]})
                continue
            images.append({"id": entry["image_id"], "file_name": entry["file_name"], "width": entry["width"],
                           "height": entry["height"]})
            outside += entry.get("boxes_outside", 0)
            predictions += [PersonPrediction(entry["image_id"], np.asarray(person["keypoints"], np.float64),
                                             person["box_score"], person["area"]) for person in entry["persons"]]
    results = rescore_and_nms(predictions, keypoint_set.sigmas_array(),
                              nms_threshold=OKS_NMS_THRESHOLD if config.oks_nms else None)
    storage.write_text(storage.join(prepared.out, RESULTS), json.dumps(results, allow_nan=False))
    storage.write_text(storage.join(prepared.out, IMAGES), json.dumps({
        "images": images, "categories": [keypoint_set.coco_category()], "skipped": skipped}, indent=1))
    if skipped:
        logger.warning("skipped %d unreadable images: %s", len(skipped), skipped[:5])
    return {
        "input": prepared.plan.source, "kind": prepared.plan.kind, "out": prepared.out,
        "model": config.model.label, "model_identity": config.model.identity,
        "model_variant": records[0]["model"]["variant"], "keypoint_set": keypoint_set.name,
        "dtype": sorted({record["model"].get("dtype", config.dtype) for record in records}),
        "people": prepared.people_source(), "boxes": prepared.box_counts, "settings": config.pose_settings(),
        "oks_nms": config.oks_nms, "video": prepared.plan.video or None,
        "counts": {"inputs": len(prepared.plan.items), "images": len(images), "skipped": len(skipped),
                   "persons": len(predictions), "results": len(results), "boxes_outside_images": outside},
        "parts": {"total": len(prepared.parts), "run": prepared.ran,
                  "skipped": len(prepared.parts) - prepared.ran, "stale_removed": len(prepared.stale)},
        "skipped": skipped, "results": storage.join(prepared.out, RESULTS),
        "images": storage.join(prepared.out, IMAGES),
    }


def _render_video(prepared: Prepared, summary: dict[str, Any]) -> str:
    """`<out>/rendered/<stem>.pose.mp4`: the posed frames (results.json's people) in order, at the video's
    frame rate over the stride. Redrawn only when the parts or drawing settings changed."""
    import tempfile
    from pathlib import Path

    import cv2
    import numpy as np

    from vitpose_core.keypoints import KeypointSet
    from vitpose_core.visualize import draw_poses

    plan, config = prepared.plan, prepared.config
    uri = storage.join(prepared.out, RENDERED_DIR, f"{Path(plan.source).stem}.pose.mp4")
    fingerprint = hashlib.sha256(json.dumps([[p.key for p in prepared.parts], config.draw_score_threshold,
                                             config.oks_nms]).encode()).hexdigest()[:24]
    summary_uri = storage.join(prepared.out, SUMMARY)
    if storage.exists(uri) and storage.exists(summary_uri):
        previous = json.loads(storage.read_text(summary_uri)).get("rendered_video_fingerprint")
        if previous == fingerprint:
            summary["rendered_video_fingerprint"] = fingerprint
            return uri
    keypoint_set = KeypointSet.from_dict(prepared.done[prepared.parts[0].file_name()]["model"]["keypoint_set"])
    people: dict[int, list[np.ndarray]] = {}
    for result in json.loads(storage.read_text(storage.join(prepared.out, RESULTS))):
        people.setdefault(result["image_id"], []).append(np.asarray(result["keypoints"]).reshape(-1, 3))
    wanted = {item.frame for item in plan.items}
    last = max(wanted)
    fps = (plan.video.get("fps") or 25.0) / config.frame_stride
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "video.mp4"
        capture = cv2.VideoCapture(plan.source)
        writer = None
        try:
            for index in range(last + 1):
                ok, frame = capture.read()
                if not ok:
                    break
                if index not in wanted:
                    continue
                if writer is None:
                    writer = cv2.VideoWriter(str(local), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                             (frame.shape[1], frame.shape[0]))
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                found = people.get(index, [])
                keypoints = np.stack(found) if found else np.zeros((0, keypoint_set.num_keypoints, 3))
                writer.write(cv2.cvtColor(draw_poses(rgb, keypoints, keypoint_set, config.draw_score_threshold),
                                          cv2.COLOR_RGB2BGR))
        finally:
            capture.release()
            if writer is not None:
                writer.release()
        if not local.is_file():
            raise RuntimeError(f"OpenCV wrote no video for {plan.source} (no mp4v encoder?)")
        storage.write_bytes(uri, local.read_bytes())
    summary["rendered_video_fingerprint"] = fingerprint
    return uri
