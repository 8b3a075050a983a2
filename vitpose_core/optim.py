"""AdamW with layer-wise learning-rate decay, and warm-up + step/cosine learning-rate schedules.

Layer-wise lr decay (BEiT, Bao et al. 2021; used by ViTPose's official configs): a ViT with L blocks
gets L + 2 "layers" -- 0 is the patch and position embedding, i is block i - 1, L + 1 is everything
after the backbone (final norm, keypoint head) -- and layer i trains at ``lr * decay ** (L + 1 - i)``.
Early layers hold generic features from pretraining, so they move less than the new head.

Following the official ViTPose ``LayerDecayOptimizerConstructor``: no weight decay on 1-D
parameters (biases, norm scales) and on ``pos_embed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

ScheduleKind = Literal["cosine", "step", "constant"]

_EMBED_NAMES = ("patch_embed", "pos_embed", "mask_token")


def layer_id(name: str, num_layers: int, backbone_prefix: str = "backbone.") -> int:
    """The lr-decay layer of parameter ``name`` for a backbone with ``num_layers`` blocks.

    Returns 0 for embeddings, ``i + 1`` for ``<backbone_prefix>blocks.i.*`` and ``num_layers + 1``
    for everything else (final norm, decoder, keypoint head), as in ViTPose's
    ``get_num_layer_for_vit``.
    """
    if not name.startswith(backbone_prefix):
        return num_layers + 1
    local = name[len(backbone_prefix):]
    if local.startswith(_EMBED_NAMES):
        return 0
    if local.startswith("blocks."):
        return int(local.split(".")[1]) + 1
    return num_layers + 1


def clean_parameter_name(name: str) -> str:
    """The plain model's name of a parameter seen through DDP / activation-checkpoint / compile wrappers.

    FSDP2 (``fully_shard``) keeps the plain names: it shards parameters in place, wrapping no module.
    """
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def skips_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights (1-D) and position embeddings / mask tokens get no weight decay."""
    return param.ndim <= 1 or name.endswith(("pos_embed", "mask_token"))


def layer_decay_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    num_layers: int | None = None,
    backbone_prefix: str = "backbone.",
) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (layer, decay / no-decay), each with its own ``lr``.

    Args:
        model: the model, plain, wrapped by DDP or sharded by FSDP2 (``fully_shard``); wrapper
            prefixes are removed from names before layers are assigned.
        lr: base learning rate (the rate of the last layer, i.e. the head).
        weight_decay: applied to matrices and conv kernels only.
        layer_decay: per-layer multiplier; 1.0 disables layer-wise decay.
        num_layers: number of transformer blocks; found from ``<backbone_prefix>blocks`` if None.
        backbone_prefix: name prefix of the ViT backbone (``"backbone."`` for ViTPose, ``"encoder."``
            for the MAE wrapper).

    Returns:
        Groups with keys ``params``, ``lr``, ``weight_decay``, ``lr_scale`` and ``layer_id``; the
        schedule multiplies each group's initial ``lr``, so the decay survives the schedule.
    """
    named = [(clean_parameter_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    if num_layers is None:
        blocks = {layer_id(n, 10**9, backbone_prefix) for n, _ in named} - {0, 10**9 + 1}
        num_layers = max(blocks) if blocks else 0
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        layer = layer_id(name, num_layers, backbone_prefix)
        no_decay = skips_weight_decay(name, param)
        scale = layer_decay ** (num_layers + 1 - layer)
        group = groups.setdefault((layer, no_decay), {
            "params": [], "param_names": [], "lr": lr * scale, "lr_scale": scale, "layer_id": layer,
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    layer_decay: float = 1.0,
    betas: Sequence[float] = (0.9, 0.999),
    backbone_prefix: str = "backbone.",
) -> torch.optim.AdamW:
    """AdamW over ``layer_decay_param_groups`` (ViTPose: lr 5e-4, wd 0.1, betas (0.9, 0.999))."""
    groups = layer_decay_param_groups(model, lr, weight_decay, layer_decay, backbone_prefix=backbone_prefix)
    for group in groups:
        group.pop("param_names")  # torch would keep them in the state dict; names are not needed there
    # fused AdamW runs on CPU and CUDA in torch >= 2.4 and is several times faster than the for-loop
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.001,
    kind: ScheduleKind = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_ratio: float = 0.0,
) -> float:
    """Factor applied to each group's initial lr at optimiser ``step`` (0-based).

    Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_steps`` (mmcv's ``warmup='linear'``),
    then ``cosine`` annealing to ``min_ratio`` at ``total_steps``, or ``step`` decay by ``gamma`` at
    each of ``milestones`` (ViTPose: epochs 170 and 200 of 210, converted to steps), or ``constant``.
    """
    if step < warmup_steps:
        return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "step":
        return gamma ** sum(step >= m for m in milestones)
    if kind == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule kind {kind!r}; expected 'cosine', 'step' or 'constant'")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.001,
    kind: ScheduleKind = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` over ``lr_multiplier``; its ``state_dict`` is just the step count."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    milestones = tuple(milestones)

    def multiplier(step: int) -> float:
        return lr_multiplier(step, total_steps, warmup_steps, warmup_ratio, kind, milestones, gamma, min_ratio)

    multiplier(warmup_steps)  # fail now, not at step N, on a bad kind
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
