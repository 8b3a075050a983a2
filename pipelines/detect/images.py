"""The shard set's source images: what the detector trains on and where pose AP with detected boxes is measured.

The shard stage records every annotation file and image folder it read in its manifest (`inputs`, with the
split and dataset of each). This module reads them back through `pipelines.storage` (local paths or
s3://), so the detect and register stages see exactly the images the pose model's crops were cut from:

    split = read_split(shards_uri, "val", cache_dir)      # COCO document + local image files
    split.document["annotations"], split.paths[image_id]

Raw AIC / MPII files are converted to the COCO layout (`vitpose_core.datasets.records_to_coco`), whose
person boxes the detector learns. Images on S3 are copied into `cache_dir` once; local images are read
where they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines import storage


@dataclass
class ImageSplit:
    """One split of the shard set's sources: a COCO document and a local file per image id."""

    document: dict[str, Any]
    paths: dict[int, Path] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # the annotation URIs it was read from


def read_manifest(shards: str) -> dict[str, Any]:
    uri = storage.join(storage.normalize(shards), "manifest.json")
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {uri} (data.shards must be the shard stage's output)") from None


def split_inputs(manifest: dict[str, Any], split: str, datasets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The manifest's readable inputs of `split` (of `datasets` when given), in manifest order."""
    return [entry for entry in manifest.get("inputs", []) if entry.get("split") == split and "error" not in entry
            and (not datasets or entry.get("dataset") in datasets)]


def coco_document(entry: dict[str, Any]) -> dict[str, Any]:
    """The COCO document of a manifest input (raw AIC / MPII converted, as the shard stage parsed them)."""
    from vitpose_core.datasets import parse_annotation_bytes, records_to_coco

    data = storage.read_bytes(entry["annotations"])
    if entry.get("format", "coco") == "coco":
        return json.loads(data)
    parsed = parse_annotation_bytes(data, entry["dataset"], entry["split"], entry["annotations"], entry["format"])
    return records_to_coco(parsed.records, parsed.keypoint_set)


def read_split(shards: str, split: str, cache_dir: str | Path, datasets: tuple[str, ...] = (),
               max_images: int | None = None, one_source: bool = False) -> ImageSplit:
    """The images and person annotations of `split`, from every source the shard manifest lists for it.

    Args:
        shards: the shard stage's output (its `manifest.json` names the sources).
        cache_dir: where images on S3 are copied (local images are not copied).
        datasets: only these datasets' sources (empty: all).
        max_images: the first N images (manifest order, then file order); None: all.
        one_source: the split must have exactly one source (the val split, scored with one annotation file).
    """
    inputs = split_inputs(read_manifest(shards), split, datasets)
    if not inputs or (one_source and len(inputs) != 1):
        which = f" of datasets {list(datasets)}" if datasets else ""
        raise ValueError(f"{shards}/manifest.json has {len(inputs)} readable {split} sources{which}; "
                         f"expected {'exactly one' if one_source else 'at least one'}")
    result = ImageSplit(document={"images": [], "annotations": [], "categories": []})
    next_id = 1
    for entry in inputs:
        document = coco_document(entry)
        images = document.get("images", [])
        if max_images is not None:
            images = images[:max(0, max_images - len(result.document["images"]))]
        # several sources (COCO + AIC train) may reuse ids: renumber unless there is one source
        ids = {image["id"]: image["id"] if len(inputs) == 1 else next_id + i for i, image in enumerate(images)}
        next_id += len(images)
        for image in images:
            local = _local_image(entry["images"], image["file_name"], cache_dir)
            result.paths[ids[image["id"]]] = local
            result.document["images"].append({**image, "id": ids[image["id"]]})
        result.document["annotations"] += [{**ann, "image_id": ids[ann["image_id"]]}
                                           for ann in document.get("annotations", []) if ann.get("image_id") in ids]
        result.document["categories"] = result.document["categories"] or document.get("categories", [])
        result.sources.append(entry["annotations"])
        if max_images is not None and len(result.document["images"]) >= max_images:
            break
    return result


def _local_image(images_uri: str, file_name: str, cache_dir: str | Path) -> Path:
    uri = storage.join(images_uri, file_name)
    if not storage.is_s3(uri):
        return Path(uri)
    local = Path(cache_dir) / uri.removeprefix("s3://")
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(storage.read_bytes(uri))
    return local
