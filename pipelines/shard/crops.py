"""The per-image work of the shard stage: read, decode once, cut every person, JPEG-encode.

`cut_image_batch` is the Ray Data UDF; `cut_person_crop` is the pure geometry it applies to each
person, also used by the single-process baseline in bench/bench_shard.py so both do the same work.

Crop geometry (UDP, see vitpose_core/geometry.py): the person box is grown to the crop's aspect
ratio, padded by `padding` (1.25, the usual top-down margin), then by `context` (1.5) so that
train-time rotation (up to ~40 deg) and scaling (+-35 %) still find real pixels, and warped onto a
`width` x `height` crop. In the crop, the padded person box is centred at ((W-1)/2, (H-1)/2) with
size ((W-1)/context, (H-1)/context) pixels: `person_center` / `person_scale` in each row. A model
input of that size or smaller is never upsampled: 288x384 serves inputs up to 192x256.
"""

from __future__ import annotations

import json
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import Field

from pipelines import storage
from pipelines.config import StrictConfig
from vitpose_core.datasets import check_against_image, skip_record
from vitpose_core.geometry import (
    box_xywh_to_center_scale,
    invert_affine,
    transform_points,
    udp_warp_matrix,
    warp_image,
)
from vitpose_core.image_io import DATASET_MAX_IMAGE_PIXELS, ImageTooLargeError, image_size_from_bytes


class CropConfig(StrictConfig):
    width: int = Field(288, ge=8, description="canonical crop width in pixels")
    height: int = Field(384, ge=8, description="canonical crop height in pixels")
    padding: float = Field(1.25, gt=0, description="top-down box padding (the person region)")
    context: float = Field(1.5, ge=1, description="extra margin around the person region for augmentation")
    jpeg_quality: int = Field(95, ge=50, le=100)

    @property
    def person_center(self) -> tuple[float, float]:
        return (self.width - 1) / 2, (self.height - 1) / 2

    @property
    def person_scale(self) -> tuple[float, float]:
        return (self.width - 1) / self.context, (self.height - 1) / self.context


def shard_schema() -> pa.Schema:
    """Arrow schema of one shard row (documented in docs/data.md)."""
    f32 = pa.float32()
    return pa.schema([
        ("image", pa.binary()),                         # JPEG bytes of the crop
        ("keypoints", pa.list_(pa.list_(f32, 3))),      # [K, 3] (x, y, v) in crop pixels
        ("num_keypoints", pa.int32()),                  # labelled keypoints (v > 0)
        ("crop_to_image", pa.list_(pa.list_(f32, 3), 2)),  # [2, 3] affine crop px -> image px
        ("person_center", pa.list_(f32, 2)),            # padded person box in crop px
        ("person_scale", pa.list_(f32, 2)),
        ("bbox", pa.list_(f32, 4)),                     # [x, y, w, h] in image px
        ("area", f32),
        ("image_id", pa.int64()),
        ("ann_id", pa.int64()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),                        # image file name, relative to the images root
        ("width", pa.int32()),                          # original image size
        ("height", pa.int32()),
    ])


def cut_person_crop(image: np.ndarray, bbox: list[float], keypoints: np.ndarray, crop: CropConfig
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one person out of a decoded image.

    Args:
        image: [H, W, 3] uint8 image.
        bbox: [x, y, w, h] person box in image pixels.
        keypoints: [K, 3] (x, y, v) in image pixels.
        crop: crop size and margins.

    Returns:
        crop [crop.height, crop.width, 3] uint8, image_to_crop [2, 3] float64, keypoints [K, 3] in crop
        pixels (unlabelled keypoints, v = 0, stay at (0, 0)).
    """
    center, scale = box_xywh_to_center_scale(np.asarray(bbox, np.float64), crop.width / crop.height, crop.padding)
    image_to_crop = udp_warp_matrix(center, scale * crop.context, 0.0, (crop.width, crop.height))
    pixels = warp_image(image, image_to_crop, (crop.width, crop.height))
    moved = transform_points(keypoints, image_to_crop)
    moved[keypoints[:, 2] <= 0] = 0.0
    return pixels, image_to_crop, moved


def image_bytes_problem(data: bytes) -> str | None:
    """Why these bytes are not a complete image, or None. cv2 silently decodes a truncated JPEG
    (grey bottom rows, a warning on stderr), so the end markers are checked explicitly."""
    if not data:
        return "empty file"
    if data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return "JPEG without end-of-image marker (truncated)"
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-16:]:
        return "PNG without IEND chunk (truncated)"
    return None


def _read_image(uri: str, s3_fs: pafs.FileSystem | None) -> tuple[np.ndarray | None, str, str]:
    """(image or None, skip reason, detail)."""
    try:
        data = storage.read_bytes(uri, s3_fs if storage.is_s3(uri) else pafs.LocalFileSystem())
    except FileNotFoundError:
        return None, "missing_image", f"not found: {uri}"
    except OSError as error:
        return None, "unreadable_image", f"{uri}: {error}"
    problem = image_bytes_problem(data)
    if not problem:
        try:  # the pixel count from the header, before decoding: a 107 KB PNG can claim 30000 x 30000 pixels
            image_size_from_bytes(data, uri, DATASET_MAX_IMAGE_PIXELS)
        except ImageTooLargeError as error:
            return None, "image_too_large", str(error)
        except ValueError:  # a header PIL cannot read: cv2's decoder has the last word, as before
            pass
    image = None if problem else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None, "undecodable_image", f"{uri}: {problem or 'cv2 cannot decode it'}"
    return image, "", ""


def cut_image_batch(batch: pa.Table, *, crop: CropConfig, s3_fs: pafs.FileSystem | None,
                    out_fs: pafs.FileSystem, skipped_dir: str) -> pa.Table:
    """Ray Data UDF: a batch of image items -> a table of crop rows (`shard_schema`).

    Each item is `{image_uri, records_json, task_index, ...}`. Records that cannot be cut are written
    to `<skipped_dir>/part-<first task_index>.json`: deterministic, so a retried task overwrites its
    own file instead of double counting.
    """
    cv2.setNumThreads(1)  # Ray already runs one task per CPU; cv2's own threads would oversubscribe
    schema = shard_schema()
    rows: dict[str, list[Any]] = {name: [] for name in schema.names}
    skipped: list[dict[str, Any]] = []
    items = batch.to_pylist()
    for item in items:
        records = json.loads(item["records_json"])
        image, reason, detail = _read_image(item["image_uri"], s3_fs)
        if image is None:
            skipped.extend(skip_record(r, reason, detail) for r in records)
            continue
        height, width = image.shape[:2]
        for record in records:
            problem = check_against_image(record, width, height)
            if problem:
                skipped.append(skip_record(record, *problem))
                continue
            try:
                keypoints = np.asarray(record["keypoints"], np.float64).reshape(-1, 3)
                pixels, image_to_crop, crop_keypoints = cut_person_crop(image, record["bbox"], keypoints, crop)
                ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, crop.jpeg_quality])
                if not ok:
                    raise RuntimeError("cv2.imencode failed")
            except Exception as error:  # one bad record must not take the whole job down
                skipped.append(skip_record(record, "processing_error", f"{type(error).__name__}: {error}"))
                continue
            rows["image"].append(encoded.tobytes())
            rows["keypoints"].append(crop_keypoints.astype(np.float32).tolist())
            rows["num_keypoints"].append(record["num_keypoints"])
            rows["crop_to_image"].append(invert_affine(image_to_crop).astype(np.float32).tolist())
            rows["person_center"].append(list(crop.person_center))
            rows["person_scale"].append(list(crop.person_scale))
            for name in ("bbox", "area", "image_id", "ann_id", "dataset", "split"):
                rows[name].append(record[name])
            rows["source"].append(record["file_name"])
            rows["width"].append(width)
            rows["height"].append(height)
    if skipped:
        first = min(int(item["task_index"]) for item in items)
        storage.write_bytes(f"{skipped_dir}/part-{first:08d}.json", json.dumps(skipped).encode(), out_fs)
    return pa.table(rows, schema=schema)
