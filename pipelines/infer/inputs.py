"""The inputs of `vitpose infer`: images of a folder or s3:// prefix, or the frames of a video, cut into parts.

Image ids: a folder's images are sorted by name; when every file stem is a number (COCO's
`000000000785.jpg`) the number is the id, so COCO ground truth and detection files match as they are;
otherwise the id is the position in that order. A video's ids are frame indices (0-based, in the video),
its file names `<video stem>/frame_<index>`.

A part is `batch_size` consecutive images (frames): one actor call, one file `parts/part-<key>.json`.
Its key hashes everything its results depend on: each image's name, id and (size, mtime) (a video's
size and mtime and the frame indices), the model's identity, the person boxes given or the detector's
identity, and the pose settings. Same command, same inputs -> same keys -> finished parts are skipped;
another model or setting -> other keys -> nothing stale is reused.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.infer.config import InferConfig
from vitpose_core.errors import InvalidInputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
PART_SCHEMA = 1


@dataclass(frozen=True)
class InputItem:
    """One image to pose: an image file, or frame `frame` of a video file."""

    image_id: int
    file_name: str
    uri: str
    frame: int | None = None


@dataclass
class InputPlan:
    """What `--input` holds: `images` (files) or `video` (frames of one file), and every item to pose."""

    kind: str
    source: str
    items: list[InputItem]
    fingerprints: dict[str, str] = field(default_factory=dict)  # file URI -> "size:mtime_ns"
    video: dict[str, Any] = field(default_factory=dict)  # fps, width, height, frames (video input)


def plan_inputs(source: str, max_frames: int | None = None, frame_stride: int = 1) -> InputPlan:
    """The items under `source`; a FileNotFoundError / InvalidInputError naming it when there are none."""
    uri = storage.normalize(source)
    if Path(uri).suffix.lower() in VIDEO_SUFFIXES:
        return _plan_video(uri, max_frames, frame_stride)
    infos = storage.list_file_infos(uri)
    if not infos:
        if storage.is_s3(uri):
            raise FileNotFoundError(f"--input {uri}: nothing under this S3 prefix (no .jpg/.jpeg/.png images)")
        if not Path(uri).exists():
            raise FileNotFoundError(f"--input {uri}: no such folder or video file")
        if Path(uri).is_file():
            raise InvalidInputError(f"--input {uri} is a file that is not a video ({', '.join(VIDEO_SUFFIXES)}); "
                                    "give a folder of images, an s3:// prefix or a video")
    images = [(file_uri, size, mtime) for file_uri, size, mtime in infos
              if posixpath.splitext(file_uri)[1].lower() in IMAGE_SUFFIXES]
    if not images:
        raise InvalidInputError(f"--input {uri}: no .jpg/.jpeg/.png images in it ({len(infos)} other files)")
    names = [posixpath.basename(file_uri) for file_uri, _, _ in images]
    stems = [posixpath.splitext(name)[0] for name in names]
    numeric = all(stem.isdigit() for stem in stems) and len({int(stem) for stem in stems}) == len(stems)
    ids = [int(stem) for stem in stems] if numeric else list(range(len(images)))
    items = [InputItem(image_id, name, file_uri) for image_id, name, (file_uri, _, _) in
             zip(ids, names, images, strict=True)]
    return InputPlan("images", uri, items, {file_uri: f"{size}:{mtime}" for file_uri, size, mtime in images})


def _plan_video(uri: str, max_frames: int | None, frame_stride: int) -> InputPlan:
    """Frame indices 0, stride, 2*stride ... of a local video, counted by decoding (container frame counts lie)."""
    import cv2

    if storage.is_s3(uri):
        raise InvalidInputError(f"--input {uri}: a video must be a local file (copy it from S3 first)")
    path = Path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"--input {uri}: no such video file")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise InvalidInputError(f"--input {uri}: cannot open the video (not a video OpenCV can decode?)")
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        wanted = None if max_frames is None else (max_frames - 1) * frame_stride + 1
        count = 0
        while (wanted is None or count < wanted) and capture.grab():
            count += 1
    finally:
        capture.release()
    if count == 0:
        raise InvalidInputError(f"--input {uri}: the video has no decodable frames")
    stem = path.stem
    frames = list(range(0, count, frame_stride))[:max_frames]
    items = [InputItem(frame, f"{stem}/frame_{frame:06d}", uri, frame) for frame in frames]
    size, mtime = storage.file_info(uri) or (0, 0)
    return InputPlan("video", uri, items, {uri: f"{size}:{mtime}"},
                     {"fps": fps, "width": width, "height": height, "frames_read": count})


def load_boxes(path: str, plan: InputPlan, score_threshold: float) -> tuple[dict[int, list], dict[str, int]]:
    """COCO detection results -> image_id -> [(box xywh, score)], and counts of what was matched.

    A record names its image by `image_id` (the ids above) or by `file_name` (the image's name under
    `--input`); boxes of images that are not among the inputs are counted, not used.
    """
    from vitpose_core.errors import read_json_file
    from vitpose_core.evaluation import load_detections

    records = read_json_file(path, "boxes")
    if not isinstance(records, list):
        raise InvalidInputError(f"boxes file {path} must be a COCO detection-results list of "
                                "{image_id | file_name, bbox, score}")
    by_name = {item.file_name: item.image_id for item in plan.items}
    unknown_names = 0
    resolved = []
    for record in records:
        if isinstance(record, dict) and "file_name" in record:
            if record["file_name"] not in by_name:
                unknown_names += 1
                continue
            record = {**record, "image_id": by_name[record["file_name"]]}
        resolved.append(record)
    known = {item.image_id for item in plan.items}
    boxes = load_detections(resolved, score_threshold, image_ids=known)
    used = sum(len(found) for found in boxes.values())
    return boxes, {"records": len(records), "used": used, "images_with_boxes": len(boxes),
                   "unknown_file_names": unknown_names}


def content_identity(uri: str) -> str:
    """SHA-256 over a checkpoint's files (a file, or every file under a folder / prefix): a model's identity."""
    digest = hashlib.sha256()
    normal = storage.normalize(uri)
    files = [normal] if storage.file_info(normal) is not None else storage.list_files(normal, recursive=True)
    if not files:
        raise FileNotFoundError(f"model checkpoint not found: {normal}")
    for file_uri in files:
        sha, size = storage.sha256_of(file_uri)
        digest.update(f"{file_uri[len(normal):]}:{size}:{sha}\n".encode())
    return digest.hexdigest()


@dataclass
class Part:
    """`batch_size` consecutive items, their boxes (None: the detector's or the whole image) and their key."""

    index: int
    key: str
    items: list[InputItem]
    boxes: dict[int, list] | None

    def file_name(self) -> str:
        return f"part-{self.key}.json"

    def task(self) -> dict[str, Any]:
        """What an actor gets: plain JSON-able values."""
        return {"key": self.key, "index": self.index,
                "items": [[i.image_id, i.file_name, i.uri, i.frame] for i in self.items],
                "boxes": None if self.boxes is None else {str(k): v for k, v in self.boxes.items()}}


def make_parts(plan: InputPlan, config: InferConfig, boxes: dict[int, list] | None) -> list[Part]:
    """The plan cut into parts of `config.batch_size` items, each with its key."""
    common = {"schema": PART_SCHEMA, "model": config.model.identity, "settings": config.pose_settings(),
              "people": _people_identity(config)}
    parts = []
    for index, start in enumerate(range(0, len(plan.items), config.batch_size)):
        items = plan.items[start:start + config.batch_size]
        part_boxes = None if boxes is None else {i.image_id: boxes.get(i.image_id, []) for i in items}
        payload = {**common, "items": [[i.image_id, i.file_name, i.uri, i.frame, plan.fingerprints.get(i.uri)]
                                       for i in items], "boxes": part_boxes}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
        parts.append(Part(index, key, items, part_boxes))
    return parts


def _people_identity(config: InferConfig) -> dict[str, Any]:
    """Where the person boxes come from, as part keys see it (the given boxes themselves go in per part)."""
    if config.boxes is not None:
        return {"source": "boxes", "score_threshold": config.box_score_threshold}
    if config.detector is not None:
        return {"source": "detector", "detector": config.detector.identity,
                "score_threshold": config.detector_score_threshold}
    return {"source": "whole-image"}
