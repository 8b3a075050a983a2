"""The model deployment: one ViTPose per replica, crops from concurrent requests batched into one forward pass.

The ingress sends each request's crops (already cut and normalised by `prepare_crops`) as one
`predict(crops, crop_to_image)` call of at most `max_batch_size` crops. `@serve.batch` with a
`batch_size_fn` that counts *crops* packs calls from many requests into one batch of up to
`max_batch_size` crops: a 1-person request and a 12-person request fill the batch by what they cost,
not by how many calls they are. The forward pass and the heatmap decoding run in a worker thread,
so the replica's event loop keeps queueing the next batch while this one computes.

Promotion without downtime: everything that belongs to one model version (weights, dtype, keypoint
set, input size, codec, identity) is one immutable `LoadedModel`. A new version is loaded and warmed
up beside the serving one, then `self._loaded` is rebound in one assignment; a batch reads the
attribute once, so it runs entirely on the old or entirely on the new version, and the old one keeps
answering while the new one loads. New versions come from
- `reconfigure(user_config)`: Serve calls it when the deployment's `user_config` (the `model`
  section of `ServeConfig`) changes in `serve deploy` / a RayService update, without restarting
  the replica;
- the alias watch: with an alias source, a thread polls the registry every `watch_interval_s`
  and loads the version the alias now points at.
A version that fails to load is logged and reported in `/v1/model` (`promotion_error`); the replica
keeps serving the old one and retries only when the alias moves again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

logger = logging.getLogger("ray.serve")

CropChunk = tuple[np.ndarray, np.ndarray]  # crops [P, 3, h, w] float32, crop_to_image [P, 2, 3]


class InputSizeChanged(RuntimeError):
    """The crops were cut for another input size than the model now served (a promotion changed it).

    The ingress re-reads the model info and cuts the crops again.
    """

    def __init__(self, expected: tuple[int, int], got: tuple[int, int]) -> None:
        super().__init__(f"model input size is now {expected[0]}x{expected[1]}, crops are {got[0]}x{got[1]}")
        self.expected = expected
        self.got = got

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray with its two arguments
        return InputSizeChanged, (self.expected, self.got)


def count_crops(chunks: list[CropChunk]) -> int:
    """The `@serve.batch` size of a list of calls: the number of crops they carry."""
    return sum(len(chunk[0]) for chunk in chunks)


def select_dtype(requested: str, device_type: str) -> str:
    """"auto" -> "bf16" where it is native (vitpose_core.inference.resolve_precision), else "fp32".

    bf16 serving casts the weights once (no per-call autocast casts): 2.5x the fp32 throughput of
    vitpose-tiny on an AVX512-BF16 CPU. Autocast, by contrast, re-casts every weight per call and
    was slower than fp32 for the tiny model there.
    """
    from vitpose_core.inference import resolve_precision

    return resolve_precision(requested, device_type)


@dataclass(frozen=True)
class LoadedModel:
    """One model version ready to serve; never mutated, replaced whole on promotion."""

    model: Any  # torch.nn.Module
    dtype_name: str
    dtype: Any  # torch.dtype | None
    keypoint_set: Any  # vitpose_core.keypoints.KeypointSet
    input_size: tuple[int, int]  # (w, h)
    codec: Any  # UDPHeatmapCodec
    name: str
    version: str
    source: str

    def identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


@serve.deployment(name="PoseModel")
class PoseModel:
    """Loads the configured model and serves `predict` (batched), `info`, `reconfigure` and health checks."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from pipelines.serve.config import ServeConfig

        self.config = ServeConfig.model_validate(config)
        if self.config.resources.torch_threads:
            torch.set_num_threads(self.config.resources.torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        batching = self.config.batching
        self._infer.set_max_batch_size(batching.max_batch_size)
        self._infer.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._swap_lock = threading.Lock()  # one load at a time (reconfigure and the watch may race)
        # the model is loaded by `reconfigure`, which Serve calls with the user_config before the
        # replica takes traffic; loading here as well would load the args' source and then the
        # user_config's whenever an operator's `deployments[].user_config` overrides it
        self._source: Any = None
        self._loaded: LoadedModel | None = None
        self.promotion_error: str | None = None
        self.last_alias_check: float | None = None
        self._failed_version: str | None = None
        self._stop_watch = threading.Event()
        self._watch_thread: threading.Thread | None = None

    # ---- loading and swapping -------------------------------------------------------------------

    def _load(self, uri: str, tracking_uri: str | None) -> LoadedModel:
        """Resolve `uri`, build the model, warm it up; the serving model is untouched meanwhile."""
        import torch

        from pipelines.registry import resolve_model
        from vitpose_core.checkpoint import load_model
        from vitpose_core.codec import UDPHeatmapCodec
        from vitpose_core.inference import model_input_size, optimize_for_inference

        download_dir = tempfile.mkdtemp(prefix="vitpose-serve-")
        try:
            resolved = resolve_model(uri, tracking_uri, dst_dir=download_dir)
            model = load_model(resolved.path).to(self.device)
        finally:
            # the weights are in memory now; a downloaded copy per promotion would fill the disk
            shutil.rmtree(download_dir, ignore_errors=True)
        dtype_name = select_dtype(self.config.dtype, self.device.type)
        dtype = torch.bfloat16 if dtype_name == "bf16" else None
        if dtype is not None:
            model = model.to(dtype)  # cast once; run_model feeds crops in this dtype
        if self.config.compile:
            model = optimize_for_inference(model, dtype=None, compile=True)
        input_size = model_input_size(model)
        loaded = LoadedModel(model=model, dtype_name=dtype_name, dtype=dtype,
                             keypoint_set=model.config.keypoint_set_data, input_size=input_size,
                             codec=UDPHeatmapCodec(input_size), name=resolved.name, version=resolved.version,
                             source=resolved.source)
        self._warm_up(loaded)
        logger.info("PoseModel loaded %s v%s (%s) on %s, dtype %s, batch <= %d crops", loaded.name, loaded.version,
                    resolved.path, self.device, dtype_name, self.config.batching.max_batch_size)
        return loaded

    def _warm_up(self, loaded: LoadedModel) -> None:
        """One full-size batch now, so the first requests do not pay for allocator and kernel warm-up.

        A compiled model also runs a 1-crop batch: torch.compile specialises batch size 1 even with
        dynamic shapes, and that compilation should happen here, not on a user's request.
        """
        width, height = loaded.input_size
        sizes = [self.config.batching.max_batch_size] + ([1] if self.config.compile else [])
        for size in dict.fromkeys(sizes):
            crops = np.zeros((size, 3, height, width), np.float32)
            self._run(loaded, [(crops, np.tile(np.eye(2, 3), (len(crops), 1, 1)))])

    def _swap_to(self, uri: str, source: Any) -> None:
        with self._swap_lock:
            loaded = self._load(uri, source.tracking_uri)
            previous, self._loaded, self._source = self._loaded, loaded, source  # the atomic swap
        if previous is not None:
            logger.info("PoseModel now serves %s v%s (was v%s)", loaded.name, loaded.version, previous.version)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's in-place update: `user_config` is `{"model": <ModelSourceConfig keys>}`.

        Serve calls it after `__init__` (the first load) and whenever the deployment's user_config
        changes. An unchanged source is a no-op; a changed one is loaded beside the serving model and
        swapped in. A bad source raises: Serve reports the deployment update as failed and a running
        replica keeps its current model.
        """
        from pipelines.serve.config import ModelSourceConfig

        unknown = set(user_config) - {"model"}
        if unknown:
            raise ValueError(f"PoseModel user_config: unknown keys {sorted(unknown)}; expected only 'model'")
        source = ModelSourceConfig.model_validate(user_config.get("model", {}))
        if self._loaded is not None and source == self._source:
            return
        self._stop_watch.set()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=60)
        self._swap_to(source.uri, source)
        self.promotion_error, self._failed_version = None, None
        self._start_watch()

    # ---- the alias watch ------------------------------------------------------------------------

    def _start_watch(self) -> None:
        source = self._source
        if not source.watches_alias:
            self._watch_thread = None
            return
        self._stop_watch = threading.Event()
        self._watch_thread = threading.Thread(target=self._watch, args=(source, self._stop_watch),
                                              name="alias-watch", daemon=True)
        self._watch_thread.start()

    def _watch(self, source: Any, stop: threading.Event) -> None:
        """Poll `registered_model@alias`; load and swap in the version it points at when that changes."""
        from pipelines.registry import get_alias

        while not stop.wait(source.watch_interval_s):
            try:
                version = get_alias(source.registered_model, source.alias, source.tracking_uri)
            except Exception as error:  # registry unreachable: keep serving, try again next period
                logger.warning("alias watch: cannot read %s@%s: %s", source.registered_model, source.alias, error)
                continue
            self.last_alias_check = time.time()
            loaded = self._loaded
            if version is None or loaded is None or version == loaded.version or version == self._failed_version:
                continue
            try:
                # pin the version read just now: the alias may move again while this one loads
                self._swap_to(f"models:/{source.registered_model}/{version}", source)
                self.promotion_error, self._failed_version = None, None
            except Exception as error:
                self._failed_version = version
                self.promotion_error = f"version {version} of {source.registered_model} failed to load: {error}"
                logger.exception("alias watch: %s", self.promotion_error)

    # ---- serving ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the ingress needs to crop, and what `/v1/model` reports."""
        loaded, source = self._loaded, self._source
        if loaded is None:
            raise RuntimeError("no model loaded yet")
        return {
            "name": loaded.name, "version": loaded.version, "source": loaded.source,
            "variant": loaded.model.config.variant, "keypoint_set": loaded.keypoint_set.name,
            "keypoint_names": list(loaded.keypoint_set.names), "input_size": loaded.input_size,
            "dtype": loaded.dtype_name, "flip_test": self.config.flip_test,
            "max_batch_size": self.config.batching.max_batch_size,
            "watching": f"models:/{source.registered_model}@{source.alias}" if source.watches_alias else None,
            "watch_interval_s": source.watch_interval_s if source.watches_alias else None,
            "last_alias_check": self.last_alias_check, "promotion_error": self.promotion_error,
        }

    async def predict(self, crops: np.ndarray, crop_to_image: np.ndarray) -> dict[str, Any]:
        """{"keypoints": [P, K, 3] (x, y, score) in image pixels, "name", "version"} for one request's crops.

        Raises `InputSizeChanged` when the crops no longer fit the served model (a promotion changed
        its input size between the ingress reading it and this batch running).
        """
        result = await self._infer((crops, crop_to_image))
        if isinstance(result, InputSizeChanged):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=count_crops)
    async def _infer(self, chunks: list[CropChunk]) -> list[Any]:
        # sizes are set from the config in __init__ (set_max_batch_size), the decorator's are placeholders
        loaded = self._loaded  # read once: the whole batch runs on one version
        return await asyncio.to_thread(self._infer_sync, loaded, chunks)

    def _infer_sync(self, loaded: LoadedModel, chunks: list[CropChunk]) -> list[Any]:
        width, height = loaded.input_size
        fits = [chunk[0].shape[2:] == (height, width) for chunk in chunks]
        keypoints = iter(self._run(loaded, [chunk for chunk, ok in zip(chunks, fits, strict=True) if ok]))
        return [{"keypoints": next(keypoints), **loaded.identity()} if ok
                else InputSizeChanged((width, height), (chunk[0].shape[3], chunk[0].shape[2]))
                for chunk, ok in zip(chunks, fits, strict=True)]

    def _run(self, loaded: LoadedModel, chunks: list[CropChunk]) -> list[np.ndarray]:
        import torch

        from vitpose_core.inference import decode_to_image, run_model

        if not chunks:
            return []
        crops = torch.from_numpy(np.concatenate([chunk[0] for chunk in chunks]))  # (sum P, 3, h, w)
        heatmaps = run_model(loaded.model, crops, self.config.flip_test, loaded.keypoint_set.flip_index,
                             loaded.dtype)
        keypoints, start = [], 0
        for chunk_crops, crop_to_image in chunks:
            stop = start + len(chunk_crops)
            keypoints.append(decode_to_image(heatmaps[start:stop], crop_to_image, loaded.codec))
            start = stop
        return keypoints

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; a model must be loaded."""
        if getattr(self, "_loaded", None) is None:
            raise RuntimeError("model not loaded")

    def __del__(self) -> None:
        stop = getattr(self, "_stop_watch", None)
        if stop is not None:
            stop.set()
