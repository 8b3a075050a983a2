"""Multi-dataset training (ViTPose+): one backbone, one decoder per dataset, batches mixed by ratio.

The pieces a training stage needs, independent of where the samples come from:

* ``dataset_schedule(ratios)``: which dataset the next sample is drawn from, so that every prefix
  of the stream follows the ratios as closely as whole samples allow (deterministic, no RNG);
* ``pad_keypoint_targets``: targets of datasets with fewer keypoints padded to the batch's widest
  set (weight 0 on the padding), so a mixed batch stacks into one ``target`` (B, Kmax, h, w);
* ``MultiDatasetFinetuneTask``: the engine ``Task`` whose loss runs one backbone pass over the mixed
  batch and each sample through its own dataset's decoder (and MoE expert);
* ``dataset_view(model, dataset)``: a single-dataset face of the model (forward picks the dataset,
  ``config`` is that dataset's), for per-dataset evaluation with ``engine.evaluate_coco_ap`` and
  ``inference.TopDownPredictor`` without copying weights.

Batches carry ``dataset_index`` (B,) int64 next to the usual ``image``, ``target``, ``target_weight``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vitpose_core.codec import keypoint_mse_loss
from vitpose_core.models.vitpose import ViTPose, ViTPoseConfig, dataset_config


def dataset_schedule(ratios: Sequence[float]) -> Iterator[int]:
    """Endless dataset indices in proportion to ``ratios`` (smooth weighted round robin).

    After n samples dataset d has been chosen within one sample of n * r_d / sum(r), and the
    sequence interleaves datasets as evenly as possible (ratios 3:1 -> 0, 0, 1, 0, 0, 0, 1, 0 ...).
    """
    weights = np.asarray(ratios, dtype=np.float64)
    if weights.ndim != 1 or not len(weights) or not np.all(np.isfinite(weights)) or np.any(weights < 0) \
            or weights.sum() <= 0:
        raise ValueError(f"ratios must be non-negative numbers with a positive sum, got {list(ratios)}")
    weights = weights / weights.sum()
    credit = np.zeros_like(weights)
    while True:
        credit += weights
        chosen = int(np.argmax(credit))  # ties go to the lower index: deterministic
        credit[chosen] -= 1.0
        yield chosen


def pad_keypoint_targets(target: np.ndarray, target_weight: np.ndarray, num_keypoints: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """One sample's heatmaps [K, h, w] and weights [K] zero-padded to ``num_keypoints`` rows."""
    count = target.shape[0]
    if count > num_keypoints:
        raise ValueError(f"{count} keypoints do not fit in {num_keypoints}")
    padded = np.zeros((num_keypoints, *target.shape[1:]), dtype=target.dtype)
    padded[:count] = target
    weights = np.zeros((num_keypoints,), dtype=np.asarray(target_weight).dtype)
    weights[:count] = np.asarray(target_weight).reshape(-1)
    return padded, weights


@dataclass(frozen=True)
class MultiDatasetFinetuneTask:
    """Heatmap regression over a mixed batch; each sample through its dataset's decoder.

    Loss = sum over datasets d of ``loss_weights[d]`` x (n_d / B) x joints-MSE of dataset d's
    samples against their first K_d target rows: with equal weights, the mean over samples. Decoders
    with no sample in the batch join the graph with a zero term, so DDP needs no
    ``find_unused_parameters`` (with MoE FFNs every expert already takes part, see ``MoEMlp``).
    Metrics: ``heatmap_loss/<dataset name>`` for the datasets present.
    """

    dataset_names: tuple[str, ...]
    loss_weights: tuple[float, ...] | None = None
    name: str = "finetune_multi"

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = torch.as_tensor(batch["dataset_index"], device=batch["image"].device).long()
        outputs = model(batch["image"], dataset_index=index, per_dataset=True)
        if len(outputs) != len(self.dataset_names):
            raise ValueError(f"the model has {len(outputs)} decoders but the task names {len(self.dataset_names)} "
                             f"datasets {list(self.dataset_names)}")
        weights = self.loss_weights or (1.0,) * len(outputs)
        batch_size = index.shape[0]
        total = batch["image"].new_zeros((), dtype=torch.float32)
        metrics: dict[str, torch.Tensor] = {}
        target, target_weight = batch["target"], batch.get("target_weight")
        for dataset, heatmaps in enumerate(outputs):
            if heatmaps is None:
                continue
            selected = index == dataset
            count = heatmaps.shape[1]
            weight = None if target_weight is None else target_weight[selected][:, :count]
            dataset_loss = keypoint_mse_loss(heatmaps, target[selected][:, :count], weight)
            total = total + weights[dataset] * dataset_loss * (heatmaps.shape[0] / batch_size)
            metrics[f"heatmap_loss/{self.dataset_names[dataset]}"] = dataset_loss.detach()
        unused = [p for d, out in enumerate(outputs) if out is None for p in _heads(model)[d].parameters()]
        if unused:
            total = total + 0.0 * sum(p.sum() for p in unused)
        metrics["heatmap_loss"] = total.detach()
        return total, metrics


def _heads(model: nn.Module) -> list[nn.Module]:
    from vitpose_core.checkpoint import unwrap_model

    return unwrap_model(model).heads


class DatasetView(nn.Module):
    """A multi-dataset model seen as dataset ``index``'s single-dataset model (weights shared)."""

    def __init__(self, model: ViTPose, dataset: int | str) -> None:
        super().__init__()
        self.model = model
        self.index = model.config.dataset_index(dataset)
        self.config: ViTPoseConfig = dataset_config(model.config, self.index)

    def forward(self, images: torch.Tensor, extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(images, extra_tokens, dataset_index=self.index)


def dataset_view(model: ViTPose, dataset: int | str) -> DatasetView:
    return DatasetView(model, dataset)
