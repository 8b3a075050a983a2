"""Data-parallel wrapping of a training model: DDP through Ray, or FSDP, and the state they gather.

Ray's FSDP path refuses to run without CUDA; torch's FSDP itself runs on CPU over gloo, which is how
the test suite exercises the sharded path (checkpoint gather, resume, validation) on this machine.
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.training.sections import ScalingSection
from vitpose_core.checkpoint import unwrap_model


def wrap_model(model: nn.Module, scaling: ScalingSection, device: torch.device) -> nn.Module:
    """DDP through Ray's ``prepare_model``, or FSDP (one unit per transformer block) wrapped here."""
    import ray.train.torch

    if scaling.strategy != "fsdp":
        return ray.train.torch.prepare_model(model, parallel_strategy=scaling.strategy)
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model.to(device), device_id=device, **scaling.fsdp_kwargs())


def is_fsdp(model: nn.Module) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel"


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimiser state on CPU (FSDP gathers on every rank: a collective)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # model keys are the plain model's names (no FSDP prefixes): the export and rank-0 copy load them
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap_model(model).state_dict(), optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict) -> None:
    """Restore what ``full_state`` saved: FSDP re-shards the full optimiser state onto this rank."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim_state)
