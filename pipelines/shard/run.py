"""Shard stage: COCO / AI Challenger annotations + images -> Parquet person-crop shards + manifest.

The driver parses the annotation files (small JSON, see RAY_NOTES 1.2), validates every record,
groups the good ones by image and packs whole images into tasks of at most `images_per_task` images
and `rows_per_file` records. Ray Data runs one task per item: it reads and decodes each image once,
cuts every person in it into a JPEG crop with context for train-time rotation and scaling, and
writes the crops to its own Parquet file in the same process. A task returns only its bookkeeping
(files written with row counts, rows per dataset/split, the records it skipped: missing or broken
image, box or keypoints outside the image), from which the driver builds `manifest.json`, so that
records in = rows out + skipped, always.

Why one fused task and not `map_batches` -> `write_parquet`: on 2 CPUs that plan ran at 0.7-0.9x a
plain single-process loop (bench/bench_shard.py). Every crop went through the object store into a
separate write task, the crop and write tasks competed for the same cores, and the driver read every
file back (plus per-task skip side files) to count rows for the manifest.

Output layout under `out` (a local directory or an s3:// prefix):

    out/manifest.json          schema version, config, inputs with hashes, counts, every skip
    out/shards/part-*.parquet  one row per person crop (schema: docs/data.md)
    out/.vitpose-shard.json    the files this stage wrote: a rerun deletes those and refuses to touch others

The manifest is written last and doubles as the completion marker: a rerun with the same config
and inputs finds it and returns at once; `force=True` redoes the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections import Counter
from typing import Any

from pipelines import storage
from pipelines.config import config_hash, dump_config
from pipelines.contract import StageOutput
from pipelines.shard.config import ShardConfig, ShardSource
from pipelines.shard.crops import shard_task
from vitpose_core.datasets import SKIP_REASONS, parse_annotation_bytes
from vitpose_core.keypoints import AIC_TO_COCO, KeypointSetError, resolve_keypoint_set

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SHARDS_DIR, SKIPPED_DIR, MANIFEST = "shards", "_skipped", "manifest.json"
OWNERSHIP = ".vitpose-shard.json"  # what this stage wrote under its output, so a rerun deletes only that


def run_shard(config: ShardConfig, force: bool = False) -> dict[str, Any]:
    """Run the shard stage and return its manifest (also written to `<out>/manifest.json`)."""
    out = storage.normalize(config.out)
    if config.synthetic is not None:
        config = config.model_copy(update={"sources": (*config.sources, *write_synthetic_sources(config))})
    manifest_uri = storage.join(out, MANIFEST)
    inputs, parsed_sources, file_skips = _read_sources(config)
    fingerprint = _fingerprint(config, inputs)

    if storage.exists(manifest_uri) and not force:
        previous = json.loads(storage.read_text(manifest_uri))
        if previous.get("fingerprint") == fingerprint:
            logger.info("shards at %s are up to date (same config and inputs); use --force to redo", out)
            return previous
        raise ValueError(f"{out} already holds shards made from other inputs or another config; "
                         "pass --force to replace them or choose another --out")
    # a forced rerun or an interrupted run (no manifest yet): clear what this stage wrote, and nothing else
    _claim_output(out)

    start = time.perf_counter()
    records_in: Counter[str] = Counter()
    skipped: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for source, parsed in parsed_sources:
        records_in[f"{source.dataset}/{source.split}"] += parsed.records_in
        skipped.extend(parsed.skipped)
        images.extend(_group_by_image(source, parsed.records))
    images.sort(key=lambda i: (i["dataset"], i["split"], i["image_id"], i["image_uri"]))

    files: list[dict[str, Any]] = []
    rows_out: Counter[str] = Counter()
    for result in _run_crop_job(config, out, _pack_tasks(images, config.images_per_task, config.rows_per_file)):
        files += [{"path": f"{SHARDS_DIR}/{f['name']}", "rows": f["rows"]} for f in json.loads(result["files_json"])]
        rows_out.update(json.loads(result["rows_json"]))
        skipped.extend(json.loads(result["skipped_json"]))
    files.sort(key=lambda f: f["path"])
    skipped.sort(key=lambda s: (s["dataset"], s["split"], str(s["image_id"]), str(s["ann_id"])))

    counts = {}
    for key in sorted(set(records_in) | set(rows_out)):
        dataset, split = key.split("/")
        skips = [s for s in skipped if s["dataset"] == dataset and s["split"] == split]
        counts[key] = {"records_in": records_in[key], "rows_out": rows_out[key], "skipped": len(skips),
                       "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skips).items()))}
        if records_in[key] != rows_out[key] + len(skips):
            raise RuntimeError(f"shard bookkeeping is off for {key}: {records_in[key]} records in, "
                               f"{rows_out[key]} rows out, {len(skips)} skipped")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "config": {k: v for k, v in dump_config(config).items() if k != "out"},
        "inputs": inputs,
        # each dataset's keypoint set (names, flips, skeleton, sigmas): the data stream, training and
        # evaluation take the layout of a dataset's rows from here
        "keypoint_sets": dataset_keypoint_sets(parsed_sources),
        "aic_to_coco": list(AIC_TO_COCO),
        "shards_dir": SHARDS_DIR,
        "files": files,
        "counts": counts,
        "totals": {"records_in": sum(records_in.values()), "rows_out": sum(rows_out.values()),
                   "skipped": len(skipped), "skipped_files": len(file_skips)},
        "skip_reasons": SKIP_REASONS,
        "skipped_files": file_skips,
        "skipped": skipped,
    }
    _write_ownership(out, "done", [*(f["path"] for f in files), MANIFEST])
    storage.write_text(manifest_uri, json.dumps(manifest, indent=1, sort_keys=False))
    logger.info("sharded %d records into %d rows (%d skipped, %d files unreadable) in %.1f s -> %s",
                manifest["totals"]["records_in"], manifest["totals"]["rows_out"], len(skipped),
                len(file_skips), time.perf_counter() - start, out)
    return manifest


def _written_here(out: str) -> list[str]:
    """Paths (relative to `out`) of the files in the places this stage writes: shards/, the manifest, and
    _skipped/ (where earlier versions of this stage left per-task skip files)."""
    found = [uri[len(out) + 1:] for directory in (SHARDS_DIR, SKIPPED_DIR)
             for uri in storage.list_files(storage.join(out, directory), recursive=True)]
    return found + ([MANIFEST] if storage.exists(storage.join(out, MANIFEST)) else [])


def _write_ownership(out: str, state: str, files: list[str]) -> None:
    storage.write_text(storage.join(out, OWNERSHIP), json.dumps({"writer": "vitpose shard", "state": state,
                                                                 "files": sorted(files)}, indent=1))


def _claim_output(out: str) -> None:
    """Delete what an earlier run of this stage wrote under `out`; refuse when anything else is in its way.

    The stage owns only the files its ownership marker lists (or, while a run is writing, its own folders,
    which held nothing foreign when it claimed them). A file that someone else put in shards/ or _skipped/
    stops the run with its name instead of being deleted; files elsewhere under `out` are never touched.
    """
    present = _written_here(out)
    marker_uri = storage.join(out, OWNERSHIP)
    marker = json.loads(storage.read_text(marker_uri)) if storage.exists(marker_uri) else None
    if marker is None:
        foreign = present
    elif marker.get("state") == "writing":
        foreign = []
    else:
        foreign = sorted(set(present) - set(marker.get("files", [])))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{out} holds files vitpose shard did not write ({shown}); they would be overwritten: "
                         "move them, or choose another --out")
    _write_ownership(out, "writing", [])
    for relative in present:
        _delete_file(storage.join(out, relative))


def _delete_file(uri: str) -> None:
    fs, path = storage.filesystem_and_path(uri)
    fs.delete_file(path)


def _read_sources(config: ShardConfig) -> tuple[list[dict[str, Any]], list[tuple[ShardSource, Any]], list[dict]]:
    """Hash and parse every annotation file. Unreadable or non-JSON files become file-level skips."""
    inputs, parsed_sources, file_skips = [], [], []
    # a bad --keypoints (unknown set, unreadable file) stops the run before anything is read
    layouts = {source.keypoints: _resolve_layout(source.keypoints, source.dataset)
               for source in config.sources if source.keypoints}
    for source in config.sources:
        uri = storage.normalize(source.annotations)
        entry: dict[str, Any] = {"annotations": uri, "images": storage.normalize(source.images),
                                 "dataset": source.dataset, "split": source.split}
        try:
            data = storage.read_bytes(uri)
        except (FileNotFoundError, OSError) as error:
            entry["error"] = str(error)
            inputs.append(entry)
            file_skips.append({**entry, "reason": "missing_annotations", "detail": str(error)})
            continue
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        try:
            parsed = parse_annotation_bytes(data, source.dataset, source.split, _basename(uri), source.format,
                                            keypoint_set=layouts[source.keypoints] if source.keypoints else None)
        except KeypointSetError:
            raise  # the file's category names no usable keypoint set: the user must fix it or pass --keypoints
        except ValueError as error:
            entry["error"] = str(error)
            inputs.append(entry)
            file_skips.append({**{k: entry[k] for k in ("annotations", "dataset", "split")},
                               "reason": "malformed_json", "detail": str(error)})
            continue
        # the resolved set is an input too: a changed keypoint-set YAML must change the fingerprint
        entry.update(format=parsed.format, records_in=parsed.records_in, keypoint_set=parsed.keypoint_set.to_dict())
        inputs.append(entry)
        parsed_sources.append((source, parsed))
    return inputs, parsed_sources, file_skips


def _resolve_layout(spec: str, dataset: str) -> Any:
    try:
        return resolve_keypoint_set(spec)
    except KeypointSetError as error:
        raise KeypointSetError(f"shard source {dataset!r}: keypoints {spec!r}: {error}") from None


def dataset_keypoint_sets(parsed_sources: list[tuple[ShardSource, Any]]) -> dict[str, dict[str, Any]]:
    """dataset name -> its keypoint set record; every file of one dataset must share one layout."""
    sets: dict[str, Any] = {}
    for source, parsed in parsed_sources:
        layout = parsed.keypoint_set
        known = sets.setdefault(source.dataset, layout)
        if not known.same_layout(layout):
            raise KeypointSetError(
                f"dataset {source.dataset!r}: {source.annotations} has keypoint set {layout.name!r} "
                f"({layout.num_keypoints} keypoints) but another of its files has {known.name!r} "
                f"({known.num_keypoints}); give the files of one dataset one layout (--keypoints) or different names")
    return {name: layout.to_dict() for name, layout in sorted(sets.items())}


def _basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _fingerprint(config: ShardConfig, inputs: list[dict[str, Any]]) -> str:
    """Same schema, config (except where it is written) and input contents -> same fingerprint."""
    payload = {"schema_version": SCHEMA_VERSION,
               "config": {k: v for k, v in dump_config(config).items() if k != "out"},
               "inputs": inputs}
    return config_hash(payload)


def _group_by_image(source: ShardSource, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One item per image with its records (sorted by annotation id)."""
    by_image: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for record in records:
        by_image.setdefault((record["image_id"], record["file_name"]), []).append(record)
    images_root = storage.normalize(source.images)
    return [{"dataset": source.dataset, "split": source.split, "image_id": image_id,
             "image_uri": storage.join(images_root, file_name), "records": sorted(recs, key=lambda r: r["ann_id"])}
            for (image_id, file_name), recs in by_image.items()]


def _pack_tasks(images: list[dict[str, Any]], images_per_task: int, rows_per_file: int) -> list[dict[str, Any]]:
    """Consecutive images -> tasks of at most `images_per_task` images and `rows_per_file` records (an image
    is never split: one with more records than that is a task of its own, written as several files).

    Each task is one flat row, its images pickled: Ray Data ships it as a small Arrow block, and pickling
    is the driver's serial work before any task starts (JSON took 25x longer: 0.3 s per 2,000 images).
    The packing depends only on the inputs and the config, which makes the files deterministic.
    """
    tasks: list[list[dict[str, Any]]] = []
    records = 0
    for image in images:
        if not tasks or len(tasks[-1]) == images_per_task or records + len(image["records"]) > rows_per_file:
            tasks.append([])
            records = 0
        tasks[-1].append({"image_uri": image["image_uri"], "records": image["records"]})
        records += len(image["records"])
    return [{"task_index": index, "images": pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)}
            for index, task in enumerate(tasks)]


def _run_crop_job(config: ShardConfig, out: str, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Ray Data part: one task per item (read, decode, crop, encode, write Parquet); returns each
    task's bookkeeping, in task order."""
    if not tasks:
        return []
    import ray
    from ray.data import DataContext, TaskPoolStrategy

    context = DataContext.get_current()
    overrides = {
        # a task's StorageError (S3 outage) reaches the driver as itself, not as a UserCodeException that drops it
        "raise_original_map_exception": True,
        # The reservation allocator keeps part of the budget for each operator of a multi-operator plan. With
        # this plan's single operator it held the second of 2 CPUs back until the first task had finished, and
        # left each worker idle 0.1-0.2 s between tasks: 4.95 s instead of 4.05 s for 8 tasks of 2,000 images.
        "op_resource_reservation_enabled": False,
    }
    saved = {name: getattr(context, name) for name in overrides}
    for name, value in overrides.items():
        setattr(context, name, value)
    try:
        any_s3 = any(storage.is_s3(storage.normalize(source.images)) for source in config.sources)
        # one block per task: Ray Data starts one task per block, and the packing above already sized them
        results = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(
            shard_task,
            compute=TaskPoolStrategy(size=config.max_tasks),
            num_cpus=config.cpus_per_task,
            memory=config.task_memory_mb * 1024 * 1024,  # bounds concurrent tasks by their decoded images and crops
            fn_kwargs={"crop": config.crop, "s3_fs": storage.s3_filesystem() if any_s3 else None,
                       "out_fs": storage.filesystem_and_path(out)[0], "shards_uri": storage.join(out, SHARDS_DIR),
                       "rows_per_file": config.rows_per_file},
        ).take_all()
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
    return sorted(results, key=lambda r: r["task_index"])


def write_synthetic_sources(config: ShardConfig) -> list[ShardSource]:
    """Write (or reuse) the synthetic train and val sets; returns shard sources for them."""
    from vitpose_core.synthetic import SyntheticConfig

    synthetic = config.synthetic
    root = synthetic.out or storage.join(storage.normalize(config.out), "synthetic")
    sources = []
    for split, count, seed in (("train", synthetic.train_images, synthetic.seed),
                               ("val", synthetic.val_images, synthetic.seed + 1_000_003)):
        out = storage.join(root, split)
        params = {"num_images": count, "width": synthetic.width, "height": synthetic.height,
                  "max_people": synthetic.max_people, "seed": seed}
        marker = storage.join(out, "synthetic.json")
        if not (storage.exists(marker) and json.loads(storage.read_text(marker)) == params):
            logger.info("generating %d synthetic %s images in %s", count, split, out)
            write_synthetic_dataset(out, SyntheticConfig(**params), split)
            storage.write_text(marker, json.dumps(params))  # last: marks the set complete
        sources.append(ShardSource(annotations=storage.join(out, "annotations", f"person_keypoints_{split}.json"),
                                   images=storage.join(out, "images"), dataset="coco", split=split))
    return sources


def write_synthetic_dataset(out: str, config: Any, split: str = "train") -> str:
    """Write images and the COCO JSON under `out`; returns the annotation file's URI."""
    from vitpose_core.synthetic import coco_json, iter_dataset

    images, annotations = [], []
    for entry, jpeg, anns in iter_dataset(config):
        storage.write_bytes(storage.join(out, "images", entry["file_name"]), jpeg)
        images.append(entry)
        annotations.extend(anns)
    annotations_uri = storage.join(out, "annotations", f"person_keypoints_{split}.json")
    storage.write_bytes(annotations_uri, coco_json(images, annotations, config))
    return annotations_uri


def shard_output(manifest: dict[str, Any], out: str) -> StageOutput:
    """The stage record of a shard run: where the shards are, and what went in and out."""
    totals = manifest["totals"]
    splits = ", ".join(f"{key} {value['rows_out']}" for key, value in manifest["counts"].items())
    return StageOutput(outputs={"shards": storage.normalize(out)},
                       metrics={"rows_out": totals["rows_out"], "records_in": totals["records_in"],
                                "skipped": totals["skipped"]},
                       summary=f"{totals['rows_out']} crops ({splits}), {totals['skipped']} skipped")
