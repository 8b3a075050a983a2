"""The per-image work of the shard stage: read, decode once, cut every person, JPEG-encode, write Parquet.

`shard_task` is the Ray Data UDF (one task: its images -> its Parquet files + bookkeeping);
`cut_images` does the per-image work; `cut_person_crop` is the pure geometry it applies to each
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
import pickle
from collections import Counter
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import Field

from pipelines import storage
from pipelines.config import StrictConfig
from vitpose_core.datasets import check_against_image, skip_record
from vitpose_core.geometry import box_xywh_to_center_scale, transform_points, udp_warp_matrix, warp_image
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


def cut_images(images: list[dict[str, Any]], crop: CropConfig, s3_fs: pafs.FileSystem | None
               ) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Read and decode each image once, cut every person in it: a table of crop rows (`shard_schema`) and
    the records that could not be cut, as skip entries.

    Each image is `{image_uri, records}`. The fixed-shape columns are built from stacked numpy arrays
    rather than per-row Python lists: converting nested lists row by row cost as much as a tenth of
    the crop itself.
    """
    cv2.setNumThreads(1)  # Ray runs one task per CPU; cv2's own threads would oversubscribe the cores
    columns: dict[str, list[Any]] = {name: [] for name in ("image", "keypoints", "crop_to_image", "num_keypoints",
                                                           "bbox", "area", "image_id", "ann_id", "dataset",
                                                           "split", "source", "width", "height")}
    skipped: list[dict[str, Any]] = []
    for item in images:
        image, reason, detail = _read_image(item["image_uri"], s3_fs)
        if image is None:
            skipped.extend(skip_record(r, reason, detail) for r in item["records"])
            continue
        height, width = image.shape[:2]
        for record in item["records"]:
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
            columns["image"].append(encoded.tobytes())
            columns["keypoints"].append(crop_keypoints)
            columns["crop_to_image"].append(cv2.invertAffineTransform(image_to_crop))
            for name in ("num_keypoints", "bbox", "area", "image_id", "ann_id", "dataset", "split"):
                columns[name].append(record[name])
            columns["source"].append(record["file_name"])
            columns["width"].append(width)
            columns["height"].append(height)
    return crop_table(columns, crop), skipped


def crop_table(columns: dict[str, list[Any]], crop: CropConfig) -> pa.Table:
    """The crop rows as one Arrow table (`shard_schema`) from per-row lists of every column but
    person_center / person_scale (the crop config's); nested float columns from flat float32 arrays."""
    schema, rows = shard_schema(), len(columns["image"])

    def fixed(values: Any, *shape: int) -> pa.Array:  # (rows, *shape) floats -> nested fixed-size lists
        array = pa.array(np.asarray(values, np.float32).reshape(-1))
        for size in reversed(shape):
            array = pa.FixedSizeListArray.from_arrays(array, size)
        return array

    # keypoints: K varies by dataset, so (x, y, v) triples under per-row offsets
    counts = [len(k) for k in columns["keypoints"]]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
    flat = np.concatenate(columns["keypoints"]) if rows else np.zeros((0, 3))
    arrays = {
        "keypoints": pa.ListArray.from_arrays(offsets, fixed(flat, 3)),
        "crop_to_image": fixed(np.reshape(columns["crop_to_image"], (rows, 2, 3)), 2, 3),
        "person_center": fixed(np.tile(crop.person_center, (rows, 1)), 2),
        "person_scale": fixed(np.tile(crop.person_scale, (rows, 1)), 2),
        "bbox": fixed(np.reshape(columns["bbox"], (rows, 4)), 4),
    }
    return pa.table([arrays[f.name] if f.name in arrays else pa.array(columns[f.name], f.type) for f in schema],
                    schema=schema)


def shard_task(task: dict[str, Any], *, crop: CropConfig, s3_fs: pafs.FileSystem | None, out_fs: pafs.FileSystem,
               shards_uri: str, rows_per_file: int) -> dict[str, Any]:
    """Ray Data UDF, one row per task: cut the task's images and write their crops to Parquet here.

    Decoded images and encoded crops never leave this process (no object-store copy between a crop
    operator and a write operator); what the task returns is its bookkeeping: the files it wrote with
    their row counts, rows per dataset/split, and its skips. The driver builds the manifest from that,
    without reading the files back. File names come from the task index, so a retried task overwrites
    its own files and a rerun writes the same ones.
    """
    table, skipped = cut_images(pickle.loads(task["images"]), crop, s3_fs)  # packed by the driver: run._pack_tasks
    files = []
    for part, start in enumerate(range(0, table.num_rows, rows_per_file)):
        name = f"part-{task['task_index']:05d}-{part}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table.slice(start, rows_per_file), sink)
        # through storage.write_bytes: an S3 failure is a StorageError naming the URI, after the same retries
        storage.write_bytes(storage.join(shards_uri, name), sink.getvalue(), out_fs)
        files.append({"name": name, "rows": min(rows_per_file, table.num_rows - start)})
    keys = [f"{d}/{s}" for d, s in zip(table["dataset"].to_pylist(), table["split"].to_pylist(), strict=True)]
    return {"task_index": task["task_index"], "files_json": json.dumps(files),
            "rows_json": json.dumps(Counter(keys)), "skipped_json": json.dumps(skipped)}
