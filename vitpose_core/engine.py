"""One training engine for every stage: a train step, an eval step and an epoch loop over batches.

Pretraining, fine-tuning and distillation differ only in the model they build and the loss
they compute; the loss lives in a small ``Task`` object:

* ``FinetuneTask``: ViTPose heatmaps vs. UDP Gaussian targets (weighted joints-MSE);
* ``PretrainTask``: the MAE wrapper's own per-patch normalised pixel loss;
* a ``DistillTask`` only needs to implement ``Task.loss`` as well.

Batches are plain mappings of tensors (``image`` (B, 3, H, W) normalised, ``target`` (B, K, h, w),
``target_weight`` (B, K), ...), so the engine runs over a list in a unit test, a torch DataLoader
or a Ray Data shard alike. Parallelism (DDP/FSDP2) is applied to the model from outside; the engine
only calls ``model(...)``, ``backward`` and the optimiser. Nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from vitpose_core.codec import UDPHeatmapCodec, keypoint_mse_loss
from vitpose_core.evaluation import PersonPrediction, evaluate_keypoints, rescore_and_nms
from vitpose_core.inference import decode_to_image, resolve_precision, run_model
from vitpose_core.keypoints import KeypointSet

Batch = Mapping[str, Any]
Precision = Literal["auto", "bf16", "fp32"]


class Task(Protocol):
    """What a stage trains for: ``loss(model, batch) -> (scalar loss, {name: detached scalar})``."""

    name: str

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class FinetuneTask:
    """Heatmap regression: ViTPose(image) vs. ``target`` heatmaps, weighted by ``target_weight``."""

    name: str = "finetune"

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        heatmaps = model(batch["image"])
        loss = keypoint_mse_loss(heatmaps, batch["target"], batch.get("target_weight"))
        return loss, {"heatmap_loss": loss.detach()}


@dataclass(frozen=True)
class PretrainTask:
    """MAE: the wrapper masks, reconstructs and returns its own loss (see ``vitpose_core.mae``)."""

    name: str = "pretrain"

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, _, _ = model(batch["image"])
        return loss, {"reconstruction_loss": loss.detach()}


@dataclass(frozen=True)
class EngineConfig:
    """How steps run: device, autocast precision and gradient clipping (None = no clipping).

    ``precision="auto"`` is bf16 where the device computes it natively, else fp32 (``resolved_precision``):
    bf16 autocast on a CPU without AVX512-BF16/AMX is emulated and many times slower than fp32.
    """

    device: str = "cpu"
    precision: Precision = "auto"
    max_grad_norm: float | None = 1.0

    @property
    def resolved_precision(self) -> str:
        return resolve_precision(self.precision, self.device)


@dataclass(frozen=True)
class StepResult:
    """What one optimiser step did; ``step`` counts steps completed, starting at 1."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    num_samples: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.num_samples / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class EpochResult:
    """Summary of ``run_epoch``: the global step after it, and means over its steps."""

    step: int
    num_steps: int
    num_samples: int
    mean_loss: float
    seconds: float


def autocast(config: EngineConfig) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or CUDA (no GradScaler needed: bf16 has fp32's exponent range)."""
    if config.resolved_precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(config.device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def to_device(batch: Batch, device: str | torch.device) -> dict[str, Any]:
    """Tensors of ``batch`` moved to ``device``; other values (ids, strings) passed through."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_size_of(batch: Batch) -> int:
    return int(batch["image"].shape[0])


def clip_gradients(model: nn.Module, max_grad_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm; returns the norm before clipping (inf if not clipped)."""
    if max_grad_norm is None:
        return torch.tensor(float("inf"))
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = nn.utils.get_total_norm([p.grad for p in parameters])
    # FSDP2's gradients are DTensor shards: their norm is a partial one, and full_tensor() all-reduces it
    # into the global norm every rank clips with (as torchtitan does)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    nn.utils.clip_grads_with_norm_(parameters, max_grad_norm, norm)
    return norm


def train_step(
    model: nn.Module,
    task: Task,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    config: EngineConfig,
    step: int = 0,
) -> StepResult:
    """Forward under autocast, backward, clip, optimiser and scheduler step. ``step`` = steps done before."""
    start = time.perf_counter()
    model.train()
    batch = to_device(batch, config.device)
    with autocast(config):
        loss, metrics = task.loss(model, batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{task.name} loss is {loss.item()} at step {step + 1}; lower the lr or check data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_gradients(model, config.max_grad_norm)
    lr = optimizer.param_groups[-1]["lr"]  # the last group is the head: the un-decayed base lr
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepResult(
        step=step + 1, loss=float(loss.detach()), lr=float(lr), grad_norm=float(grad_norm),
        num_samples=batch_size_of(batch), seconds=time.perf_counter() - start,
        metrics={k: float(v) for k, v in metrics.items()},
    )


@torch.no_grad()
def eval_step(model: nn.Module, task: Task, batch: Batch, config: EngineConfig) -> dict[str, float]:
    """The task's loss on one batch without gradients, in eval mode (no dropout / drop path)."""
    model.eval()
    batch = to_device(batch, config.device)
    with autocast(config):
        loss, metrics = task.loss(model, batch)
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}, "num_samples": batch_size_of(batch)}


def run_epoch(
    model: nn.Module,
    task: Task,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    config: EngineConfig,
    step: int = 0,
    skip_batches: int = 0,
    max_steps: int | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> EpochResult:
    """Train over ``batches`` once.

    Args:
        step: global steps completed before this epoch (continues the count after a resume).
        skip_batches: batches of this epoch already trained on before a mid-epoch checkpoint;
            they are read and dropped so the data position matches the restored optimiser.
        max_steps: stop once the global step reaches it (the run's step budget).
        on_step: called after every step, e.g. to log or checkpoint; it may raise to stop.
    """
    start = time.perf_counter()
    losses: list[float] = []
    num_samples = 0
    for batch in islice(batches, skip_batches, None):
        if max_steps is not None and step >= max_steps:
            break
        result = train_step(model, task, batch, optimizer, scheduler, config, step)
        step = result.step
        losses.append(result.loss)
        num_samples += result.num_samples
        if on_step is not None:
            on_step(result)
    return EpochResult(step=step, num_steps=len(losses), num_samples=num_samples,
                       mean_loss=float(np.mean(losses)) if losses else float("nan"),
                       seconds=time.perf_counter() - start)


@torch.no_grad()
def predict_keypoints(
    model: nn.Module,
    batches: Iterable[Batch],
    codec: UDPHeatmapCodec,
    config: EngineConfig,
    flip_index: Sequence[int] | None = None,
    passthrough: Sequence[str] = ("image_id", "ann_id", "bbox", "area"),
) -> Iterator[dict[str, np.ndarray]]:
    """Per batch: ``keypoints`` (B, K, 2) in original image pixels and ``scores`` (B, K).

    The one inference path of the project (``vitpose_core.inference``): ``run_model`` (flip test in the same
    forward pass) and ``decode_to_image`` through the batch's ``input_to_image`` (B, 2, 3) affine (the
    inverse input warp composed with the shard's ``crop_to_image``), exactly as ``vitpose eval``, ``predict``
    and serving decode. Fields named in ``passthrough`` are copied to the output, so an evaluator can match
    predictions to annotations; ``input_area`` (B,) is the input crop's area in image pixels (what OKS-NMS uses).
    """
    dtype = torch.bfloat16 if config.resolved_precision == "bf16" else None
    model.eval()  # train_step switches back to train mode
    for batch in batches:
        heatmaps = run_model(model, batch["image"], flip_test=flip_index is not None, flip_index=flip_index,
                             dtype=dtype)
        input_to_image = np.asarray(_as_numpy(batch["input_to_image"]), dtype=np.float64)
        decoded = decode_to_image(heatmaps, input_to_image, codec)  # (B, K, 3): x, y, score
        width, height = codec.input_size
        scale = np.abs(np.linalg.det(input_to_image[:, :, :2]))  # image px^2 per input px^2
        out = {"keypoints": decoded[..., :2], "scores": decoded[..., 2], "input_area": scale * width * height}
        for name in passthrough:
            if name in batch:
                out[name] = _as_numpy(batch[name])
        yield out


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def evaluate_coco_ap(
    model: nn.Module,
    batches: Iterable[Batch],
    codec: UDPHeatmapCodec,
    ground_truth: Any,
    keypoint_set: KeypointSet,
    config: EngineConfig,
    flip_test: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO keypoint AP of ``model`` on ground-truth person crops, as the official top-down evaluation.

    Args:
        batches: evaluation batches (no augmentation) carrying ``image``, ``input_to_image`` and
            ``image_id``.
        ground_truth: a pycocotools ``COCO`` of the same images (``evaluation.load_ground_truth``).
        flip_test: average with the mirrored crop's heatmaps (ViTPose's default test setting).

    Returns:
        The COCO stats (``AP``, ``AP50``, ... ``ARl``) and the COCO results list that produced them.
    """
    predictions = []
    flip_index = keypoint_set.flip_index if flip_test else None
    for out in predict_keypoints(model, batches, codec, config, flip_index):
        for i, image_id in enumerate(out["image_id"]):
            keypoints = np.concatenate([out["keypoints"][i], out["scores"][i][:, None]], axis=1)  # (K, 3)
            predictions.append(PersonPrediction(image_id=int(image_id), keypoints=keypoints,
                                                area=float(out["input_area"][i])))
    results = rescore_and_nms(predictions, keypoint_set.sigmas_array())
    return evaluate_keypoints(ground_truth, results, keypoint_set.sigmas_array()), results
