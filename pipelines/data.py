"""Reading side of the shards: a Ray Dataset, and per-worker streams of augmented training batches.

One shard set serves every input resolution: crops are stored once at a canonical size with context
(pipelines/shard/crops.py); the stream decodes each JPEG, samples flip / half-body / scale / rotation,
warps once to the chosen input size (vitpose_core.augment) and encodes UDP heatmap targets
(vitpose_core.codec). It runs in the process that consumes it, so the same code serves:

- a Ray Train worker:   `iter_pose_batches(ray.train.get_dataset_shard("train"), config, ...)`
- a Ray Dataset:        `iter_pose_batches(read_shards(uri, split="val"), config, ...)`
- no Ray at all:        `iter_pose_batches("s3://bucket/shards", config, split="train", ...)`

Batches are dicts of torch tensors (B = batch, K = keypoints, (W, H) = input size):

    image          [B, 3, H, W] float32  RGB, normalised with ImageNet mean / std
    target         [B, K, H/4, W/4] float32  UDP Gaussian heatmaps
    target_weight  [B, K] float32        1 for labelled keypoints that land on the heatmap
    keypoints      [B, K, 3] float32     (x, y, v) in input pixels, after augmentation
    crop_to_input  [B, 2, 3] float32     stored crop px -> input px (includes the mirror on a flip)
    crop_to_image  [B, 2, 3] float32     stored crop px -> original image px
    input_to_image [B, 2, 3] float32     input px -> original image px: maps decoded predictions back
    image_id, ann_id [B] int64;  bbox [B, 4] float32 (x, y, w, h);  area [B] float32
    dataset_index  [B] int64             multi-dataset streams only: the row's dataset (order of `datasets`)

Keypoint layouts come from the data: the shard manifest records each dataset's keypoint set
(`shard_keypoint_sets`). A single-layout stream emits that set (`StreamConfig.keypoints` None), or the
set `keypoints` names (AIC rows are then mapped onto COCO's limbs for `coco`). A multi-dataset stream
(`datasets=[...]`) keeps every row in its own dataset's layout, pads targets to the widest set
(weight 0 on the padding) and mixes datasets by `ratios` (`mix_by_ratio`).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import Field

from pipelines import storage
from pipelines.config import StrictConfig
from vitpose_core.augment import NO_AUGMENT, AugmentConfig, augment_top_down
from vitpose_core.codec import UDPHeatmapCodec
from vitpose_core.geometry import compose_affine, fix_aspect_ratio, invert_affine
from vitpose_core.inference import normalize_images
from vitpose_core.keypoints import AIC, COCO, KEYPOINT_SETS, KeypointSet, aic_to_coco, resolve_keypoint_set
from vitpose_core.multi_dataset import dataset_schedule, pad_keypoint_targets

SHARDS_DIR = "shards"  # under the shard stage's output URI (pipelines/shard/run.py)


class StreamConfig(StrictConfig):
    """How shard rows become model batches. Augmentation defaults follow ViTPose's COCO recipe."""

    input_size: tuple[int, int] = Field((192, 256), description="model input (W, H)")
    heatmap_stride: int = Field(4, ge=1)
    sigma: float = Field(2.0, gt=0)
    keypoints: str | None = Field(
        None, description="output layout: None = the shards' own keypoint set (manifest); or a set name / COCO "
                          "json / keypoint-set YAML ('coco' also maps AIC rows onto COCO's limbs)")
    augment: bool = Field(True, description="False: plain evaluation crops (no flip, scale, rotation)")
    flip_prob: float = Field(0.5, ge=0, le=1)
    half_body_prob: float = Field(0.3, ge=0, le=1)
    scale_factor: float = Field(0.35, ge=0, lt=1)
    rotation_factor: float = Field(40.0, ge=0)
    rotation_prob: float = Field(0.6, ge=0, le=1)

    @property
    def heatmap_size(self) -> tuple[int, int]:
        return self.input_size[0] // self.heatmap_stride, self.input_size[1] // self.heatmap_stride

    def augment_config(self) -> AugmentConfig:
        if not self.augment:
            return NO_AUGMENT
        return AugmentConfig(flip_prob=self.flip_prob, half_body_prob=self.half_body_prob,
                             scale_factor=self.scale_factor, rotation_factor=self.rotation_factor,
                             rotation_prob=self.rotation_prob)


def shard_files(uri: str) -> list[str]:
    """The Parquet files of a shard set (`uri` is the shard stage's output or its shards/ folder)."""
    uri = storage.normalize(uri)
    files = storage.list_files(storage.join(uri, SHARDS_DIR), suffix=".parquet") or \
        storage.list_files(uri, suffix=".parquet")
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {uri} (expected {storage.join(uri, SHARDS_DIR)}/*.parquet)")
    return files


def _row_filter(split: str | None, datasets: Iterable[str] | None, for_ray: bool = False) -> Any:
    """`split == ... & dataset in (...)` as a pyarrow expression, or as a Ray Data one (pushed down)."""
    if for_ray:
        from ray.data.expressions import col as field
    else:
        field = pc.field
    expression = None
    if split is not None:
        expression = field("split") == split
    if datasets is not None:
        wanted = field("dataset").is_in(list(datasets)) if for_ray else field("dataset").isin(list(datasets))
        expression = wanted if expression is None else expression & wanted
    return expression


def read_shards(uri: str, *, split: str | None = None, datasets: Iterable[str] | None = None,
                columns: list[str] | None = None, **read_parquet_args: Any):
    """The shard set at `uri` as a `ray.data.Dataset`, optionally only one split / some datasets."""
    import ray

    files = shard_files(uri)
    fs, _ = storage.filesystem_and_path(files[0])
    paths = [storage.filesystem_and_path(f)[1] for f in files]
    # Ray Data's V1 Parquet reader: V2 (the default since Ray 2.5x) lists the files and reads their footers in
    # a pool of 32 FooterReader actors at every execution, i.e. at the start of every epoch of a Train
    # dataset: 4.7 s before the first row on 2 CPUs, 0.2 s per step of the embedded default's finetune
    # (bench/bench_train_overhead.py). The shard set's file list is known, so there is nothing to discover.
    # read_parquet picks the reader when it is called; the caller's DataContext is left as it was, and
    # RAY_DATA_USE_DATASOURCE_V2 set in the environment still decides.
    context = ray.data.DataContext.get_current()
    use_v2 = context.use_datasource_v2
    context.use_datasource_v2 = use_v2 if "RAY_DATA_USE_DATASOURCE_V2" in os.environ else False
    try:
        dataset = ray.data.read_parquet(paths, filesystem=fs, columns=columns, **read_parquet_args)
    finally:
        context.use_datasource_v2 = use_v2
    expression = _row_filter(split, datasets, for_ray=True)
    return dataset if expression is None else dataset.filter(expr=expression)


def iter_shard_tables(uri: str, *, batch_size: int, split: str | None = None, datasets: Iterable[str] | None = None,
                      shuffle: bool = False, seed: int = 0, shuffle_buffer: int = 1024) -> Iterator[pa.Table]:
    """Stream rows of a shard set as Arrow tables of `batch_size` rows, without Ray.

    Files are read one row group at a time, so memory stays at about `shuffle_buffer` rows. With
    `shuffle`, file order and a rolling buffer of rows are permuted with `seed`.
    """
    rng = np.random.default_rng(seed)
    files = shard_files(uri)
    if shuffle:
        files = [files[i] for i in rng.permutation(len(files))]
    expression = _row_filter(split, datasets)

    def tables() -> Iterator[pa.Table]:
        for uri_ in files:
            fs, path = storage.filesystem_and_path(uri_)
            with fs.open_input_file(path) as handle:
                for record_batch in pq.ParquetFile(handle).iter_batches(batch_size=max(batch_size, 64)):
                    table = pa.Table.from_batches([record_batch])
                    yield table if expression is None else table.filter(expression)

    buffer: pa.Table | None = None
    limit = max(shuffle_buffer, batch_size) if shuffle else batch_size
    for table in tables():
        buffer = table if buffer is None else pa.concat_tables([buffer, table])
        while buffer.num_rows >= limit:
            if shuffle:
                buffer = buffer.take(rng.permutation(buffer.num_rows))
            yield buffer.slice(0, batch_size)
            buffer = buffer.slice(batch_size)
    if buffer is not None and buffer.num_rows:
        if shuffle:
            buffer = buffer.take(rng.permutation(buffer.num_rows))
        for start in range(0, buffer.num_rows, batch_size):
            yield buffer.slice(start, batch_size)


def shard_keypoint_sets(uri: str) -> dict[str, KeypointSet]:
    """dataset name -> keypoint set, as the shard manifest records them ({} for manifests older than that)."""
    uri = storage.normalize(uri)
    try:
        manifest = json.loads(storage.read_text(storage.join(uri, "manifest.json")))
    except FileNotFoundError:
        return {}
    return {name: KeypointSet.from_dict(record, source=f"{uri}/manifest.json keypoint_sets.{name}")
            for name, record in manifest.get("keypoint_sets", {}).items()}


def row_keypoint_set(dataset: str, keypoint_sets: Mapping[str, KeypointSet]) -> KeypointSet | None:
    """The layout of a dataset's rows: the manifest's record, else (old manifests) the built-in set of that name."""
    return keypoint_sets.get(dataset) or KEYPOINT_SETS.get(dataset)


def stream_keypoint_set(config: StreamConfig, keypoint_sets: Mapping[str, KeypointSet],
                        datasets: Iterable[str] | None = None) -> KeypointSet:
    """The one layout a single-decoder stream emits: ``config.keypoints`` (a dataset's set is found by its
    name first), else the shards' set when every (selected) dataset has the same layout."""
    if config.keypoints is not None:
        named = {s.name: s for s in keypoint_sets.values()}
        return named.get(config.keypoints) or resolve_keypoint_set(config.keypoints)
    selected = {name: s for name, s in keypoint_sets.items() if datasets is None or name in set(datasets)}
    if not selected:
        return COCO  # nothing recorded (old manifests, bare Ray Datasets): the historical default
    first = next(iter(selected.values()))
    if all(first.same_layout(other) for other in selected.values()):
        return first
    layouts = ", ".join(f"{name}: {s.name} ({s.num_keypoints})" for name, s in selected.items())
    raise ValueError(f"the shards hold datasets with different keypoint sets ({layouts}); train one decoder per "
                     "dataset (finetune `datasets:`), or set data.stream.keypoints (e.g. coco: AIC rows mapped "
                     "onto COCO's limbs)")


class PoseBatchTransform:
    """Arrow table of shard rows -> dict of numpy arrays (the keys in the module docstring).

    Callable on any worker; holds a numpy Generator so successive calls draw fresh augmentations.

    Args:
        keypoint_sets: dataset name -> the layout of its rows (``shard_keypoint_sets``).
        datasets: multi-dataset mode: each row in its own dataset's layout, ``dataset_index`` = the
            position of its dataset here, targets padded to the widest set.
    """

    def __init__(self, config: StreamConfig, rng: np.random.Generator | None = None,
                 keypoint_sets: Mapping[str, KeypointSet] | None = None, datasets: Sequence[str] = ()) -> None:
        self.config = config
        self.augment = config.augment_config()
        self.keypoint_sets = dict(keypoint_sets or {})
        self.datasets = tuple(datasets)
        if self.datasets:
            missing = [d for d in self.datasets if row_keypoint_set(d, self.keypoint_sets) is None]
            if missing:
                raise ValueError(f"no keypoint set known for datasets {missing} (not in the shard manifest)")
            self.dataset_sets = [row_keypoint_set(d, self.keypoint_sets) for d in self.datasets]
            self.max_keypoints = max(s.num_keypoints for s in self.dataset_sets)
            self.keypoint_set = self.dataset_sets[0]
        else:
            self.keypoint_set = stream_keypoint_set(config, self.keypoint_sets)
        self.codec = UDPHeatmapCodec(config.input_size, config.heatmap_size, config.sigma)
        self.rng = rng or np.random.default_rng(0)

    def _layout(self, dataset: str) -> tuple[KeypointSet, int]:
        """(the set a row is emitted in, its dataset index or -1)."""
        if not self.datasets:
            return self.keypoint_set, -1
        try:
            index = self.datasets.index(dataset)
        except ValueError:
            raise ValueError(f"a row of dataset {dataset!r} reached a stream of datasets {list(self.datasets)}") from None
        return self.dataset_sets[index], index

    def _keypoints(self, flat: list[list[float]], dataset: str, target: KeypointSet) -> np.ndarray:
        keypoints = np.asarray(flat, np.float64).reshape(-1, 3)
        source = row_keypoint_set(dataset, self.keypoint_sets)
        if source is not None and source.names == AIC.names and target.names == COCO.names:
            return aic_to_coco(keypoints)
        if keypoints.shape[0] != target.num_keypoints:
            raise ValueError(f"a {dataset!r} row has {keypoints.shape[0]} keypoints; the stream emits the "
                             f"{target.name!r} layout ({target.num_keypoints})")
        return keypoints

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        return normalize_batch(self.prepare(table))

    def prepare(self, table: pa.Table) -> dict[str, np.ndarray]:
        """Everything but the normalisation: ``image`` stays BGR uint8 [N, H, W, 3], a quarter of the
        float32 bytes, which is what crosses processes when Ray Data runs the transform (``transform_in_ray_data``)."""
        cv2.setNumThreads(1)
        cols = {name: table.column(name).to_pylist() for name in
                ("keypoints", "crop_to_image", "person_center", "person_scale", "dataset")}
        aspect = self.config.input_size[0] / self.config.input_size[1]
        out: dict[str, list[Any]] = {k: [] for k in ("image", "target", "target_weight", "keypoints",
                                                     "crop_to_input", "crop_to_image", "input_to_image")}
        indices = []
        for i, jpeg in enumerate(table.column("image").to_pylist()):
            crop = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
            if crop is None:
                raise ValueError(f"row {i} (ann_id {table.column('ann_id')[i]}) holds an undecodable crop")
            layout, index = self._layout(cols["dataset"][i])
            keypoints = self._keypoints(cols["keypoints"][i], cols["dataset"][i], layout)
            scale = fix_aspect_ratio(np.asarray(cols["person_scale"][i]), aspect)
            sample = augment_top_down(crop, keypoints[:, :2], keypoints[:, 2], cols["person_center"][i], scale,
                                      self.config.input_size, layout, self.rng, self.augment)
            heatmaps, weights = self.codec.encode(sample.keypoints, sample.visibility)
            points = np.concatenate([sample.keypoints, sample.visibility[:, None]], axis=1)
            if self.datasets:  # a mixed batch stacks only at the widest set's K (padding has weight 0)
                heatmaps, weights = pad_keypoint_targets(heatmaps, weights, self.max_keypoints)
                points = np.concatenate([points, np.zeros((self.max_keypoints - len(points), 3))], axis=0)
                indices.append(index)
            crop_to_image = np.asarray(cols["crop_to_image"][i], np.float64)
            out["image"].append(sample.image)  # (H, W, 3) BGR uint8; normalised as one batch below
            out["target"].append(heatmaps)
            out["target_weight"].append(weights)
            out["keypoints"].append(points)
            out["crop_to_input"].append(sample.image_to_input)
            out["crop_to_image"].append(crop_to_image)
            out["input_to_image"].append(compose_affine(crop_to_image, invert_affine(sample.image_to_input)))
        batch = {"image": np.stack(out.pop("image")),  # (N, H, W, 3) BGR uint8
                 **{k: np.stack(v).astype(np.float32, copy=False) for k, v in out.items()}}
        batch["image_id"] = table.column("image_id").to_numpy().astype(np.int64)
        batch["ann_id"] = table.column("ann_id").to_numpy().astype(np.int64)
        batch["bbox"] = np.asarray(table.column("bbox").to_pylist(), np.float32).reshape(-1, 4)
        batch["area"] = table.column("area").to_numpy().astype(np.float32)
        if self.datasets:
            batch["dataset_index"] = np.asarray(indices, np.int64)
        return batch


def normalize_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A prepared batch (``PoseBatchTransform.prepare``) made model-ready: ``image`` BGR uint8 [N, H, W, 3]
    -> ImageNet-normalised RGB float32 [N, 3, H, W]; the other keys as they are."""
    return {**batch, "image": normalize_images(np.asarray(batch["image"]), channel_order="bgr")}


def transform_in_ray_data(dataset: Any, config: StreamConfig, *, keypoint_sets: Mapping[str, KeypointSet],
                          batch_size: int, num_cpus: float = 1.0, resources: Mapping[str, float] | None = None,
                          max_tasks: int | None = None, mixed_datasets: Sequence[str] = ()) -> Any:
    """The training transform as a Ray Data operator: ``dataset`` (shard rows) -> prepared rows.

    Ray Data runs it in tasks on whatever nodes hold ``num_cpus`` and ``resources`` (e.g. CPU-only nodes),
    streaming the results into the Train workers' dataset shards, so decode, augment and encode scale
    with the cluster's CPUs instead of the Train worker's. Rows leave the task prepared
    (``PoseBatchTransform.prepare``: uint8 images); the consumer normalises them (``iter_prepared_batches``).

    Augmentation draws come from fresh OS entropy in every task: a pass over the data re-runs the
    transform, so each epoch draws anew, but which task transforms which rows is Ray's scheduling, so
    draws are not reproducible run to run (the in-worker path, seeded by seed / epoch / rank, is).

    ``mixed_datasets``: multi-dataset mode (``PoseBatchTransform``'s ``datasets``); the rows keep their
    ``dataset`` name, by which the consumer mixes them by ratio (``iter_prepared_batches``).
    """
    def prepare(table: pa.Table) -> dict[str, np.ndarray]:
        batch = PoseBatchTransform(config, np.random.default_rng(), keypoint_sets, mixed_datasets).prepare(table)
        if mixed_datasets:
            batch["dataset"] = np.asarray(table.column("dataset").to_pylist())
        return batch

    import ray.data

    return dataset.map_batches(prepare, batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus,
                               resources=dict(resources or {}) or None,
                               compute=ray.data.TaskPoolStrategy(size=max_tasks))


def iter_prepared_batches(source: Any, *, batch_size: int, seed: int = 0, epoch: int = 0, rank: int = 0,
                          shuffle: bool = True, shuffle_buffer: int = 1024, drop_last: bool = False,
                          mixed_datasets: Sequence[str] = (),
                          ratios: Sequence[float] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Model-ready batches (module docstring) from a DataIterator over ``transform_in_ray_data`` rows.

    ``mixed_datasets``/``ratios``: the rows (transformed with the same ``mixed_datasets``) are re-cut into
    batches by ratio, as ``iter_pose_batches`` does with shard rows (`mix_by_ratio`). One difference: a
    row repeated at the end of an epoch to fill a short dataset's slots repeats its augmentation too (it
    was drawn in a Ray Data task), where the in-worker stream draws it anew.
    """
    from ray.data.block import BlockAccessor

    rng = np.random.default_rng([seed, epoch, rank])
    mixing = bool(mixed_datasets)
    batches = source.iter_batches(batch_size=batch_size, batch_format="pyarrow" if mixing else "numpy",
                                  drop_last=drop_last and not mixing,  # a mix drops at its own end
                                  local_shuffle_buffer_size=shuffle_buffer if shuffle else None,
                                  local_shuffle_seed=int(rng.integers(2**31)) if shuffle else None)
    if mixing:
        tables = mix_by_ratio(batches, mixed_datasets, ratios or [1.0] * len(mixed_datasets), batch_size,
                              buffer_rows=max(4 * shuffle_buffer, 4 * batch_size), seed=int(rng.integers(2**31)))
        batches = (BlockAccessor.for_block(table.drop_columns(["dataset"])).to_batch_format("numpy")
                   for table in tables if table.num_rows == batch_size or not drop_last)
    for batch in batches:
        yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in normalize_batch(batch).items()}


def mix_by_ratio(tables: Iterable[pa.Table], datasets: Sequence[str], ratios: Sequence[float], batch_size: int,
                 buffer_rows: int = 4096, reuse_rows: int = 256, seed: int = 0) -> Iterator[pa.Table]:
    """Re-cut a stream of rows of several datasets into batches whose datasets follow ``ratios``.

    Slot by slot ``dataset_schedule(ratios)`` names the dataset; the slot takes that dataset's next
    unused row, reading on while it has none. Two bounds keep this safe for DDP and memory:

    * at most ``buffer_rows`` unused rows wait; past that a slot takes a row of the fullest dataset
      instead (the ratio then follows the data until the buffer drains);
    * once the stream is exhausted, a dataset without unused rows repeats one of its last
      ``reuse_rows`` rows (freshly augmented downstream). Batches end when every row was used once, so
      a worker gets at least as many batches as plain batching would give (ranks stay in step).
    """
    names = list(datasets)
    position = {name: i for i, name in enumerate(names)}
    fresh: list[deque[pa.Table]] = [deque() for _ in names]
    recent: list[deque[pa.Table]] = [deque(maxlen=reuse_rows) for _ in names]
    rng = np.random.default_rng(seed)
    source = iter(tables)
    exhausted = False

    def pull() -> bool:
        nonlocal exhausted
        for table in source:
            for row, dataset in enumerate(table.column("dataset").to_pylist()):
                if dataset not in position:
                    raise ValueError(f"a row of dataset {dataset!r} reached a mix of datasets {names}")
                fresh[position[dataset]].append(table.slice(row, 1))
            if table.num_rows:
                return True
        exhausted = True
        return False

    def take(index: int) -> pa.Table | None:
        while not fresh[index] and not exhausted and sum(map(len, fresh)) < buffer_rows:
            pull()
        if fresh[index]:
            row = fresh[index].popleft()
            recent[index].append(row)
            return row
        if not exhausted:  # buffer full of other datasets: drain the fullest
            return take(max(range(len(names)), key=lambda i: len(fresh[i])))
        if recent[index]:
            return recent[index][int(rng.integers(len(recent[index])))]
        others = [i for i in range(len(names)) if fresh[i]]
        return take(others[0]) if others else None

    schedule = dataset_schedule(ratios)
    while True:
        rows: list[pa.Table] = []
        while len(rows) < batch_size and not (exhausted and not any(fresh)):
            row = take(next(schedule))
            if row is None:
                break
            rows.append(row)
        if rows:
            yield pa.concat_tables(rows)
        if exhausted and not any(fresh):
            return


def iter_pose_batches(source: Any, config: StreamConfig, *, batch_size: int, seed: int = 0, epoch: int = 0,
                      rank: int = 0, shuffle: bool | None = None, shuffle_buffer: int = 1024, drop_last: bool = False,
                      split: str | None = None, datasets: Iterable[str] | None = None,
                      keypoint_sets: Mapping[str, KeypointSet] | None = None, mixed_datasets: Sequence[str] = (),
                      ratios: Sequence[float] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Stream model-ready batches (module docstring) from a Ray DataIterator, a Ray Dataset or a URI.

    Args:
        source: `ray.train.get_dataset_shard(...)` inside a Train worker, a `ray.data.Dataset`
            (e.g. from `read_shards`), or a shard URI / path (read directly with pyarrow, no Ray).
        config: input size, target and augmentation settings.
        batch_size: rows per batch.
        seed, epoch, rank: the augmentation (and shuffle) stream is seeded by all three, so every
            epoch and every worker draws differently and a rerun reproduces them.
        shuffle: shuffle rows (a local buffer); defaults to `config.augment`.
        shuffle_buffer: rows in the shuffle buffer.
        drop_last: drop a final short batch (keeps DDP ranks in step).
        split, datasets: row filters, used when `source` is a URI (filter a Dataset in `read_shards`).
        keypoint_sets: dataset name -> layout of its rows; default: the manifest's when `source` is a URI.
        mixed_datasets: multi-dataset mode (one decoder each): the datasets in decoder order; batches get
            ``dataset_index`` and are mixed by ``ratios`` (default equal; `mix_by_ratio`).
    """
    shuffle = config.augment if shuffle is None else shuffle
    rng = np.random.default_rng([seed, epoch, rank])
    if keypoint_sets is None:
        keypoint_sets = shard_keypoint_sets(source) if isinstance(source, str) else {}
    if not mixed_datasets and config.keypoints is None and isinstance(source, str):
        # one layout out of the rows this stream reads (the selected datasets), not of the whole shard set
        keypoint_sets = {k: v for k, v in keypoint_sets.items() if datasets is None or k in set(datasets)}
    transform = PoseBatchTransform(config, rng, keypoint_sets, mixed_datasets)
    mixing = bool(mixed_datasets)
    drop_short = drop_last and not mixing  # a mix re-cuts rows into batches: it drops at its own end
    if isinstance(source, str):
        tables: Iterable[pa.Table] = iter_shard_tables(
            source, batch_size=batch_size, split=split, datasets=datasets, shuffle=shuffle,
            seed=int(rng.integers(2**31)), shuffle_buffer=shuffle_buffer)
    elif hasattr(source, "iter_batches"):
        tables = source.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=drop_short,
                                     local_shuffle_buffer_size=shuffle_buffer if shuffle else None,
                                     local_shuffle_seed=int(rng.integers(2**31)) if shuffle else None)
    else:
        raise TypeError(f"source must be a shard URI, a ray.data.Dataset or a DataIterator, got {type(source).__name__}")
    if mixing:
        tables = mix_by_ratio(tables, mixed_datasets, ratios or [1.0] * len(mixed_datasets), batch_size,
                              buffer_rows=max(4 * shuffle_buffer, 4 * batch_size), seed=int(rng.integers(2**31)))
    for table in tables:
        if drop_last and table.num_rows < batch_size:
            continue
        if table.num_rows == 0:
            continue
        yield {k: torch.from_numpy(v) for k, v in transform(table).items()}



_PREFETCH_DONE = object()


class prefetch(Iterator):  # noqa: N801 - used like a generator function: `for batch in prefetch(batches)`
    """Iterate ``items`` on a background thread, up to ``depth`` items ahead of the consumer.

    A training step spends its time in torch kernels and the stream its time in JPEG decodes and
    cv2 warps; both release the GIL, so producing the next batches while the current one trains
    overlaps the two. Order is kept, so a seeded stream yields the same batches as without
    prefetching; an exception in the producer is raised in the consumer. ``close()`` (or dropping
    the last reference, e.g. after ``islice`` took what it needed) stops the thread without reading
    further; the thread holds no reference to this object, so garbage collection reaches it.
    """

    def __init__(self, items: Iterable[Any], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=_produce, args=(iter(items), self._queue, self._stop),
                                        name="prefetch", daemon=True)
        self._thread.start()

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item, error = self._queue.get()
        if item is _PREFETCH_DONE:
            self._finished = True
            self._thread.join()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer (it finishes the item in hand) and wait for its thread."""
        self._finished = True
        self._stop.set()
        self._thread.join()

    def __del__(self) -> None:
        if hasattr(self, "_thread"):
            self.close()


def _produce(items: Iterator[Any], out: queue.Queue, stop: threading.Event) -> None:
    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put((item, None)):
                return
        put((_PREFETCH_DONE, None))
    except BaseException as error:  # noqa: BLE001 - handed to the consumer, who raises it
        put((_PREFETCH_DONE, error))
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
