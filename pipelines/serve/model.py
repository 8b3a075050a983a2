"""The model deployment: one ViTPose per replica, crops from concurrent requests batched into one forward pass.

The ingress sends each request's crops (already cut and normalised by `prepare_crops`) as one
`predict(crops, crop_to_image)` call of at most `max_batch_size` crops. `@serve.batch` with a
`batch_size_fn` that counts *crops* packs calls from many requests into one batch of up to
`max_batch_size` crops: a 1-person request and a 12-person request fill the batch by what they cost,
not by how many calls they are. The forward pass and the heatmap decoding run in a worker thread,
so the replica's event loop keeps queueing the next batch while this one computes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from ray import serve

logger = logging.getLogger("ray.serve")

CropChunk = tuple[np.ndarray, np.ndarray]  # crops [P, 3, h, w] float32, crop_to_image [P, 2, 3]


def count_crops(chunks: list[CropChunk]) -> int:
    """The `@serve.batch` size of a list of calls: the number of crops they carry."""
    return sum(len(chunk[0]) for chunk in chunks)


def select_dtype(requested: str, device_type: str) -> str:
    """"auto" -> "bf16" on CUDA and on CPUs that compute bf16 natively (AMX or AVX512-BF16), else "fp32".

    bf16 serving casts the weights once (no per-call autocast casts): 2.5x the fp32 throughput of
    vitpose-tiny on this AVX512-BF16 CPU. Autocast, by contrast, re-casts every weight per call and
    was slower than fp32 for the tiny model here.
    """
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16"
    from vitpose_core.inference import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


@serve.deployment(name="PoseModel")
class PoseModel:
    """Loads the configured model once and serves `predict` (batched), `info` and health checks."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        from pipelines.registry import resolve_model
        from pipelines.serve.config import ServeConfig
        from vitpose_core.checkpoint import load_model
        from vitpose_core.codec import UDPHeatmapCodec
        from vitpose_core.inference import model_input_size
        from vitpose_core.keypoints import KEYPOINT_SETS

        self.config = ServeConfig.model_validate(config)
        if self.config.resources.torch_threads:
            torch.set_num_threads(self.config.resources.torch_threads)
        resolved = resolve_model(self.config.model.uri, self.config.model.tracking_uri)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(resolved.path).to(device)
        self.dtype_name = select_dtype(self.config.dtype, device.type)
        self.dtype = torch.bfloat16 if self.dtype_name == "bf16" else None
        if self.dtype is not None:
            self.model = self.model.to(self.dtype)  # cast once; run_model feeds crops in this dtype
        if self.config.compile:
            from vitpose_core.inference import optimize_for_inference

            self.model = optimize_for_inference(self.model, dtype=None, compile=True)
        self.keypoint_set = KEYPOINT_SETS[self.model.config.keypoint_set]
        self.input_size = model_input_size(self.model)  # (w, h)
        self.codec = UDPHeatmapCodec(self.input_size)
        self.identity = resolved
        batching = self.config.batching
        self._infer.set_max_batch_size(batching.max_batch_size)
        self._infer.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._warm_up()
        logger.info("PoseModel ready: %s v%s (%s) on %s, dtype %s, batch <= %d crops", resolved.name,
                    resolved.version, resolved.path, device, self.dtype_name, batching.max_batch_size)

    def _warm_up(self) -> None:
        """One full-size batch now, so the first requests do not pay for allocator and kernel warm-up.

        A compiled model also runs a 1-crop batch: torch.compile specialises batch size 1 even with
        dynamic shapes, and that compilation should happen here, not on a user's request.
        """
        width, height = self.input_size
        sizes = [self.config.batching.max_batch_size] + ([1] if self.config.compile else [])
        for size in dict.fromkeys(sizes):
            crops = np.zeros((size, 3, height, width), np.float32)
            self._infer_sync([(crops, np.tile(np.eye(2, 3), (len(crops), 1, 1)))])

    def info(self) -> dict[str, Any]:
        """What the ingress needs to crop, and what `/v1/model` reports."""
        return {
            "name": self.identity.name, "version": self.identity.version, "source": self.identity.source,
            "variant": self.model.config.variant, "keypoint_set": self.keypoint_set.name,
            "keypoint_names": list(self.keypoint_set.names), "input_size": self.input_size,
            "dtype": self.dtype_name, "flip_test": self.config.flip_test,
            "max_batch_size": self.config.batching.max_batch_size,
        }

    async def predict(self, crops: np.ndarray, crop_to_image: np.ndarray) -> np.ndarray:
        """Keypoints [P, K, 3] (x, y, score) in image pixels for one request's crops."""
        return await self._infer((crops, crop_to_image))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=count_crops)
    async def _infer(self, chunks: list[CropChunk]) -> list[np.ndarray]:
        # sizes are set from the config in __init__ (set_max_batch_size), the decorator's are placeholders
        return await asyncio.to_thread(self._infer_sync, chunks)

    def _infer_sync(self, chunks: list[CropChunk]) -> list[np.ndarray]:
        import torch

        from vitpose_core.inference import decode_to_image, run_model

        crops = torch.from_numpy(np.concatenate([chunk[0] for chunk in chunks]))  # (sum P, 3, h, w)
        heatmaps = run_model(self.model, crops, self.config.flip_test, self.keypoint_set.flip_index, self.dtype)
        keypoints, start = [], 0
        for chunk_crops, crop_to_image in chunks:
            stop = start + len(chunk_crops)
            keypoints.append(decode_to_image(heatmaps[start:stop], crop_to_image, self.codec))
            start = stop
        return keypoints

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; the model object must still be there."""
        if getattr(self, "model", None) is None:
            raise RuntimeError("model not loaded")
