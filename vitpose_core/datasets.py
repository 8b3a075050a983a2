"""COCO-format, AI Challenger and MPII keypoint annotations -> one per-person record schema, with skip reasons.

Both formats are parsed into plain, JSON-serialisable dicts (so they can travel to Ray tasks):

- `PersonRecord`: one person instance to crop. Keypoints are flat [K * 3] (x, y, v) in image
  pixels with COCO visibility (0 unlabelled, 1 labelled but occluded, 2 visible); `bbox` is
  [x, y, w, h]. `width` / `height` are None when the annotation file does not give them (raw AIC);
  they are then checked once the image is decoded.
- `SkipRecord`: a record that was not turned into a crop, with a `reason` from `SKIP_REASONS` and a
  human-readable `detail`. Nothing is dropped without one: records in = crops out + skipped.

Supported layouts:

- COCO person_keypoints (`{"images", "annotations", "categories"}`) of any keypoint set: the set
  is the file's category (`vitpose_core.keypoints.keypoint_set_from_coco`) unless one is given.
  mmpose's COCO-style AIC, CrowdPose, OCHuman, AP-10K and PoseTrack18 files are of this kind.
- Raw AI Challenger (a list of `{"image_id", "keypoint_annotations", "human_annotations"}`), with
  boxes as corners [x1, y1, x2, y2] and visibility 1 visible / 2 occluded / 3 unlabelled, which is
  remapped to COCO's 2 / 1 / 0 exactly as mmpose's conversion does.
- MPII in the HRNet/mmpose list layout (`[{"image", "center", "scale", "joints", "joints_vis"}]`),
  converted by `mpii_to_coco`: one image per file name, box = the square of side 200 * scale
  centred on `center` (MPII's `scale` is the person height / 200 px; HRNet crops this square), joints
  with `joints_vis` 1 become visibility 2 (MPII does not mark occlusion), others 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from vitpose_core.keypoints import (
    AIC,
    KEYPOINT_SETS,
    MPII,
    KeypointSet,
    KeypointSetError,
    keypoint_set_from_coco,
    resolve_keypoint_set,
)

PersonRecord = dict[str, Any]
SkipRecord = dict[str, Any]

SKIP_REASONS: dict[str, str] = {
    # file level: the whole annotation file is unusable, so its records cannot even be counted
    "missing_annotations": "the annotation file does not exist or cannot be read",
    "malformed_json": "the annotation file is not valid JSON, or not a COCO / raw AIC layout",
    # record level
    "malformed_annotation": "a required field is missing or has the wrong type or length",
    "unknown_image": "the annotation refers to an image id that the file does not list",
    "crowd": "iscrowd = 1: a crowd region, not a single person",
    "no_keypoints": "no labelled keypoint (every visibility is 0)",
    "invalid_box": "the box is not finite or has zero or negative width or height",
    "box_outside_image": "the box does not overlap the image",
    "keypoints_outside_image": "a labelled keypoint lies outside the image",
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image file exists but could not be read",
    "undecodable_image": "the image bytes are not a decodable image, or are truncated",
    "image_too_large": "the image header claims more pixels than a dataset image may have (not decoded)",
    "image_size_mismatch": "the decoded image size differs from the annotation's width / height",
    "processing_error": "cutting or encoding the crop failed (the detail names the error)",
}

# raw AIC visibility -> COCO visibility (mmpose's conversion: visible 1 -> 2, occluded 2 -> 1, unlabelled 3 -> 0)
AIC_RAW_TO_COCO_VISIBILITY = {1: 2, 2: 1, 3: 0}


@dataclass
class ParsedAnnotations:
    """What one annotation file yields: records to crop, and records already skipped."""

    format: str
    records: list[PersonRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    keypoint_set: KeypointSet | None = None  # the layout of the records' keypoints

    @property
    def records_in(self) -> int:
        return len(self.records) + len(self.skipped)


def skip_record(base: dict[str, Any], reason: str, detail: str) -> SkipRecord:
    """A skip entry carrying the identifying fields of `base` (a record or a partial one)."""
    if reason not in SKIP_REASONS:
        raise ValueError(f"unknown skip reason {reason!r}; known: {sorted(SKIP_REASONS)}")
    keys = ("dataset", "split", "source", "image_id", "ann_id", "file_name")
    return {**{k: base.get(k) for k in keys}, "reason": reason, "detail": detail}


def detect_format(document: Any) -> str:
    """'coco' for a COCO-style dict, 'aic_raw' for the raw AIC list, 'mpii' for the MPII list; ValueError otherwise."""
    if isinstance(document, dict) and "annotations" in document and "images" in document:
        return "coco"
    if isinstance(document, list) and document and isinstance(document[0], dict) and "joints" in document[0]:
        return "mpii"
    if isinstance(document, list) and (not document or "keypoint_annotations" in document[0]):
        return "aic_raw"
    raise ValueError("annotation file is neither COCO person_keypoints (a dict with 'images' and "
                     "'annotations'), raw AI Challenger (a list of dicts with 'keypoint_annotations') nor MPII "
                     "(a list of dicts with 'joints', 'joints_vis', 'center', 'scale')")


def parse_annotation_bytes(data: bytes, dataset: str, split: str, source: str, fmt: str = "auto",
                           keypoint_set: KeypointSet | str | None = None) -> ParsedAnnotations:
    """Parse an annotation file's bytes. Raises ValueError (naming `source`) if it is not usable JSON.

    ``keypoint_set`` (a KeypointSet, a built-in name or a COCO json / keypoint-set YAML path) fixes
    the layout of a COCO-format file; by default it is the file's category. Raw AIC is AIC-14 and
    MPII is MPII-16 whatever ``dataset`` is called.
    """
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{source}: not valid JSON ({error})") from None
    detected = detect_format(document)
    if fmt not in ("auto", detected):
        raise ValueError(f"{source}: expected format {fmt!r} but the file looks like {detected!r}")
    if detected == "coco":
        return parse_coco(document, dataset, split, source, keypoint_set)
    if detected == "mpii":
        parsed = parse_coco(mpii_to_coco(document, source=source), dataset, split, source, MPII)
        parsed.format = "mpii"
        return parsed
    return parse_aic_raw(document, dataset, split, source)


def coco_keypoint_set(document: dict[str, Any], dataset: str, source: str,
                      keypoint_set: KeypointSet | str | None = None) -> KeypointSet:
    """The layout of a COCO-format document: given, else its category, else the built-in set named `dataset`."""
    if keypoint_set is not None:
        return resolve_keypoint_set(keypoint_set)
    try:
        return keypoint_set_from_coco(document, source=source)
    except KeypointSetError:
        if dataset in KEYPOINT_SETS:  # a file without keypoint names (e.g. a bare conversion)
            return KEYPOINT_SETS[dataset]
        raise


def mpii_to_coco(document: list[Any], image_sizes: dict[str, tuple[int, int]] | None = None,
                 source: str = "MPII annotations") -> dict[str, Any]:
    """MPII's list layout -> a COCO person_keypoints document in MPII-16 layout.

    ``image_sizes`` (file name -> (width, height)) fills the images' sizes; without it they are left
    out and checked when the images are decoded. Image ids are the file names' digits where they are
    numbers (MPII's are), else their order; annotation ids count entries from 1.
    """
    if not isinstance(document, list):
        raise ValueError(f"{source}: MPII annotations must be a list of person entries")
    images: dict[str, dict[str, Any]] = {}
    annotations = []
    for index, entry in enumerate(document):
        where = f"{source}: entry #{index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ValueError(f"{where} lacks 'image'")
        try:
            joints = [_float_list(j, 2, f"{where} joint") for j in entry["joints"]]
            visible = [float(v) for v in entry["joints_vis"]]
            center = _float_list(entry["center"], 2, f"{where} center")
            scale = float(entry["scale"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{where}: missing or malformed {error}") from None
        if len(joints) != MPII.num_keypoints or len(visible) != MPII.num_keypoints:
            raise ValueError(f"{where} has {len(joints)} joints / {len(visible)} visibilities, MPII has 16")
        name = entry["image"]
        if name not in images:
            stem = name.rsplit(".", 1)[0]
            image_id = int(stem) if stem.isdigit() else len(images) + 1
            images[name] = {"id": image_id, "file_name": name}
            if image_sizes and name in image_sizes:
                images[name]["width"], images[name]["height"] = image_sizes[name]
        keypoints: list[float] = []
        for (x, y), v in zip(joints, visible, strict=True):
            labelled = v > 0 and x >= 0 and y >= 0  # some MPII conversions mark missing joints with -1
            keypoints += [x, y, 2.0] if labelled else [0.0, 0.0, 0.0]
        side = 200.0 * scale
        annotations.append({
            "id": index + 1, "image_id": images[name]["id"], "category_id": 1, "iscrowd": 0,
            "bbox": [center[0] - side / 2, center[1] - side / 2, side, side], "area": side * side,
            "keypoints": keypoints, "num_keypoints": sum(1 for v in keypoints[2::3] if v > 0),
        })
    return {"images": list(images.values()), "annotations": annotations, "categories": [MPII.coco_category()]}


def _float_list(value: Any, length: int, what: str) -> list[float]:
    if not isinstance(value, list | tuple) or len(value) != length:
        got = len(value) if isinstance(value, list | tuple) else type(value).__name__
        raise ValueError(f"{what} must be a list of {length} numbers, got {got}")
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{what} holds a non-number") from None


def validate_record(record: PersonRecord) -> tuple[str, str] | None:
    """Checks that need no image: crowd, box, labelled keypoints. Returns (reason, detail) or None."""
    if record.get("iscrowd"):
        return "crowd", "iscrowd = 1"
    x, y, w, h = record["bbox"]
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return "invalid_box", f"bbox [x, y, w, h] = {record['bbox']}"
    if record["num_keypoints"] == 0:
        return "no_keypoints", "all keypoints have visibility 0"
    return None


def check_against_image(record: PersonRecord, width: int, height: int) -> tuple[str, str] | None:
    """Checks that need the image size. Pixel centres run 0..W-1, so the image spans [-0.5, W - 0.5]."""
    expected = (record.get("width"), record.get("height"))
    if expected != (None, None) and expected != (width, height):
        return "image_size_mismatch", f"annotation says {expected[0]}x{expected[1]}, image is {width}x{height}"
    x, y, w, h = record["bbox"]
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "box_outside_image", f"bbox {record['bbox']} vs image {width}x{height}"
    kp = record["keypoints"]
    for k in range(len(kp) // 3):
        kx, ky, v = kp[3 * k: 3 * k + 3]
        if v > 0 and not (-0.5 <= kx <= width - 0.5 and -0.5 <= ky <= height - 0.5):
            return "keypoints_outside_image", f"keypoint {k} at ({kx}, {ky}) vs image {width}x{height}"
    return None


def _finish(record: PersonRecord, parsed: ParsedAnnotations) -> None:
    """Count labelled keypoints (the file's own `num_keypoints` is not trusted) and file the record."""
    kp = record["keypoints"]
    record["num_keypoints"] = sum(1 for v in kp[2::3] if v > 0)
    problem = validate_record(record)
    if problem:
        parsed.skipped.append(skip_record(record, *problem))
    else:
        parsed.records.append(record)


def parse_coco(document: dict[str, Any], dataset: str, split: str, source: str,
               keypoint_set: KeypointSet | str | None = None) -> ParsedAnnotations:
    """COCO person_keypoints dict -> records. Every entry of `annotations` is one record in.

    The keypoint count comes from ``keypoint_set`` or the file's category (`coco_keypoint_set`).
    """
    layout = coco_keypoint_set(document, dataset, source, keypoint_set)
    num_keypoints = layout.num_keypoints
    parsed = ParsedAnnotations(format="coco", keypoint_set=layout)
    images: dict[Any, dict[str, Any]] = {}
    for entry in document.get("images") or []:
        if isinstance(entry, dict) and "id" in entry and "file_name" in entry:
            images[entry["id"]] = entry
    for index, ann in enumerate(document.get("annotations") or []):
        base = {"dataset": dataset, "split": split, "source": source,
                "ann_id": ann.get("id", f"#{index}") if isinstance(ann, dict) else f"#{index}"}
        try:
            if not isinstance(ann, dict):
                raise ValueError(f"annotation #{index} is a {type(ann).__name__}, not an object")
            base["image_id"] = ann.get("image_id")
            image = images.get(ann.get("image_id"))
            if image is None:
                parsed.skipped.append(skip_record(base, "unknown_image", f"image_id {ann.get('image_id')!r} not in images"))
                continue
            base["file_name"] = image["file_name"]
            keypoints = _float_list(ann.get("keypoints"), 3 * num_keypoints, "keypoints")
            bbox = _float_list(ann.get("bbox"), 4, "bbox")
            record = {
                **base, "image_id": int(ann["image_id"]), "ann_id": int(ann["id"]),
                "width": int(image["width"]) if "width" in image else None,
                "height": int(image["height"]) if "height" in image else None,
                "bbox": bbox, "keypoints": keypoints,
                # mmpose's AIC conversion has no area: fall back to the box area, as its evaluator does
                "area": float(ann["area"]) if "area" in ann else bbox[2] * bbox[3],
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        except (KeyError, TypeError, ValueError) as error:
            detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
            parsed.skipped.append(skip_record(base, "malformed_annotation", detail))
            continue
        _finish(record, parsed)
    return parsed


def aic_image_id(image_key: str, index: int) -> int:
    """AIC image ids are 40-hex-digit SHA-1 strings; the first 15 digits give a stable int64 id."""
    try:
        return int(image_key[:15], 16)
    except (TypeError, ValueError):
        return index + 1


def parse_aic_raw(document: list[Any], dataset: str, split: str, source: str) -> ParsedAnnotations:
    """Raw AI Challenger list -> records. Every `humanN` of every image is one record in.

    Annotation ids count humans in file order (1-based), humans sorted by their number, so they are
    stable for a given file.
    """
    num_keypoints = AIC.num_keypoints
    parsed = ParsedAnnotations(format="aic_raw", keypoint_set=AIC)
    ann_id = 0
    for index, entry in enumerate(document):
        key = entry.get("image_id") if isinstance(entry, dict) else None
        image_base = {"dataset": dataset, "split": split, "source": source,
                      "image_id": aic_image_id(key, index) if isinstance(key, str) else None,
                      "file_name": f"{key}.jpg" if isinstance(key, str) else None}
        humans = entry.get("keypoint_annotations") if isinstance(entry, dict) else None
        boxes = entry.get("human_annotations") if isinstance(entry, dict) else None
        if not isinstance(key, str) or not isinstance(humans, dict) or not isinstance(boxes, dict):
            ann_id += 1  # the entry still counts as (at least) one record in
            parsed.skipped.append(skip_record({**image_base, "ann_id": ann_id}, "malformed_annotation",
                                              f"image entry #{index} lacks image_id / keypoint_annotations / human_annotations"))
            continue
        for name in sorted(humans, key=lambda n: (len(n), n)):  # human2 before human10
            ann_id += 1
            base = {**image_base, "ann_id": ann_id}
            try:
                raw = _float_list(humans[name], 3 * num_keypoints, f"{name} keypoints")
                x1, y1, x2, y2 = _float_list(boxes.get(name), 4, f"{name} box")
                keypoints = []
                for k in range(num_keypoints):
                    x, y, v = raw[3 * k: 3 * k + 3]
                    if int(v) not in AIC_RAW_TO_COCO_VISIBILITY or v != int(v):
                        raise ValueError(f"{name} keypoint {k} has visibility {v}; raw AIC uses 1, 2, 3")
                    coco_v = AIC_RAW_TO_COCO_VISIBILITY[int(v)]
                    keypoints += [x, y, float(coco_v)] if coco_v else [0.0, 0.0, 0.0]
            except ValueError as error:
                parsed.skipped.append(skip_record(base, "malformed_annotation", str(error)))
                continue
            record = {**base, "width": None, "height": None, "bbox": [x1, y1, x2 - x1, y2 - y1],
                      "keypoints": keypoints, "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            _finish(record, parsed)
    return parsed


def records_to_coco(records: list[PersonRecord], keypoint_set: KeypointSet,
                    image_sizes: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Parsed person records -> a COCO document in ``keypoint_set``'s layout (e.g. ground truth for
    evaluating a raw-format split). Images without a size in the records take it from ``image_sizes``
    (file name -> (width, height))."""
    images: dict[Any, dict[str, Any]] = {}
    annotations = []
    for record in records:
        image = images.setdefault(record["image_id"], {"id": record["image_id"], "file_name": record["file_name"]})
        width, height = record.get("width"), record.get("height")
        if (width is None or height is None) and image_sizes and record["file_name"] in image_sizes:
            width, height = image_sizes[record["file_name"]]
        if width is not None and height is not None:
            image["width"], image["height"] = int(width), int(height)
        annotations.append({"id": record["ann_id"], "image_id": record["image_id"], "category_id": 1,
                            "bbox": list(record["bbox"]), "area": float(record["area"]),
                            "iscrowd": int(record.get("iscrowd", 0)), "keypoints": list(record["keypoints"]),
                            "num_keypoints": int(record["num_keypoints"])})
    return {"images": list(images.values()), "annotations": annotations,
            "categories": [keypoint_set.coco_category()]}
