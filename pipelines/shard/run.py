"""Shard stage: COCO / AI Challenger annotations + images -> Parquet person-crop shards + manifest.

The driver parses the annotation files (small JSON, see RAY_NOTES 1.2), validates every record and
groups the good ones by image. Ray Data then fans the images out to tasks: each task reads and
decodes an image once, cuts every person in it into a JPEG crop with context for train-time
rotation and scaling, and streams the rows to `write_parquet`. Records that a task has to skip
(missing or broken image, box or keypoints outside the image) are written as small JSON side files
that the driver folds into `manifest.json`, so that records in = rows out + skipped, always.

Output layout under `out` (a local directory or an s3:// prefix):

    out/manifest.json          schema version, config, inputs with hashes, counts, every skip
    out/shards/part-*.parquet  one row per person crop (schema: docs/data.md)
    out/_skipped/*.json        task side output, removed once merged into the manifest
    out/.vitpose-shard.json    the files this stage wrote: a rerun deletes those and refuses to touch others

The manifest is written last and doubles as the completion marker: a rerun with the same config
and inputs finds it and returns at once; `force=True` redoes the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.config import config_hash, dump_config
from pipelines.contract import StageOutput
from pipelines.shard.config import ShardConfig, ShardSource
from pipelines.shard.crops import cut_image_batch, shard_schema
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
    image_tasks: list[dict[str, Any]] = []
    for source, parsed in parsed_sources:
        records_in[f"{source.dataset}/{source.split}"] += parsed.records_in
        skipped.extend(parsed.skipped)
        image_tasks.extend(_group_by_image(source, parsed.records))
    image_tasks.sort(key=lambda t: (t["dataset"], t["split"], t["image_id"], t["image_uri"]))
    for index, task in enumerate(image_tasks):
        task["task_index"] = index

    if image_tasks:
        _run_crop_job(config, out, image_tasks)
    skipped.extend(_collect_side_skips(out))
    skipped.sort(key=lambda s: (s["dataset"], s["split"], str(s["image_id"]), str(s["ann_id"])))
    files, rows_out = _summarise_shards(out)

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
    """Paths (relative to `out`) of the files in the places this stage writes: shards/, _skipped/, the manifest."""
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
    """One task item per image, carrying its records as a JSON string (a flat, Arrow-friendly row)."""
    by_image: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for record in records:
        by_image.setdefault((record["image_id"], record["file_name"]), []).append(record)
    images_root = storage.normalize(source.images)
    return [{"dataset": source.dataset, "split": source.split, "image_id": image_id,
             "image_uri": storage.join(images_root, file_name),
             "records_json": json.dumps(sorted(recs, key=lambda r: r["ann_id"]))}
            for (image_id, file_name), recs in by_image.items()]


def _run_crop_job(config: ShardConfig, out: str, image_tasks: list[dict[str, Any]]) -> None:
    """The Ray Data part: image items -> crop rows -> Parquet, in order, streaming."""
    import ray
    from ray.data import DataContext, TaskPoolStrategy
    from ray.data.datasource import FilenameProvider

    class ShardFilenames(FilenameProvider):
        # deterministic names (no write UUID) so a rerun reproduces the same files
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}"

    context = DataContext.get_current()
    saved_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # same block order -> same rows per file
    # a task's StorageError (S3 outage) reaches the driver as itself, not as a UserCodeException that drops it
    saved_raise = context.raise_original_map_exception
    context.raise_original_map_exception = True
    try:
        any_s3 = any(storage.is_s3(t["image_uri"]) for t in image_tasks)
        out_fs, out_path = storage.filesystem_and_path(out)
        num_blocks = math.ceil(len(image_tasks) / config.images_per_task)
        dataset = ray.data.from_items(image_tasks, override_num_blocks=num_blocks)
        crops = dataset.map_batches(
            cut_image_batch,
            batch_size=config.images_per_task,
            batch_format="pyarrow",
            compute=TaskPoolStrategy(size=config.max_tasks),
            num_cpus=config.cpus_per_task,
            # a memory reservation bounds concurrent decodes, and (differing from the writer's remote
            # args) keeps the crop op unfused from the write, so `rows_per_file` counts crop rows
            memory=config.task_memory_mb * 1024 * 1024,
            fn_kwargs={"crop": config.crop, "s3_fs": storage.s3_filesystem() if any_s3 else None, "out_fs": out_fs,
                       "skipped_dir": f"{out_path}/{SKIPPED_DIR}"},
        )
        crops.write_parquet(
            f"{out_path}/{SHARDS_DIR}", filesystem=out_fs, mode="overwrite",
            min_rows_per_file=config.rows_per_file, max_rows_per_file=config.rows_per_file,
            filename_provider=ShardFilenames(), schema=shard_schema(),
            # writing is I/O: a quarter CPU keeps it from stalling a crop task on small clusters
            ray_remote_args={"num_cpus": 0.25},
        )
    finally:
        context.execution_options.preserve_order = saved_order
        context.raise_original_map_exception = saved_raise


def _collect_side_skips(out: str) -> list[dict[str, Any]]:
    """Merge the tasks' skip side files, then delete them (the manifest is their home)."""
    skipped = []
    for uri in storage.list_files(storage.join(out, SKIPPED_DIR), suffix=".json"):
        skipped.extend(json.loads(storage.read_text(uri)))
    storage.delete_dir(storage.join(out, SKIPPED_DIR))
    return skipped


def _summarise_shards(out: str) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Files with row counts, and rows per dataset/split, read back from what is on disk."""
    import pyarrow.parquet as pq

    files, rows_out = [], Counter()
    for uri in storage.list_files(storage.join(out, SHARDS_DIR), suffix=".parquet"):
        fs, path = storage.filesystem_and_path(uri)
        table = pq.read_table(path, filesystem=fs, columns=["dataset", "split"])
        files.append({"path": f"{SHARDS_DIR}/{_basename(uri)}", "rows": table.num_rows})
        keys = np.char.add(np.char.add(table["dataset"].to_numpy(zero_copy_only=False).astype(str), "/"),
                           table["split"].to_numpy(zero_copy_only=False).astype(str))
        rows_out.update(Counter(keys.tolist()))
    return files, rows_out


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
