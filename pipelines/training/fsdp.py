"""Data-parallel wrapping of a training model: DDP through Ray or FSDP2 (``fully_shard``), and their full state.

FSDP2 as torchtitan applies it, from outside to a finished model: each transformer block is one unit
(its parameters all-gathered in one collective before its forward, its gradients reduce-scattered in one
after its backward), then the root takes the rest (embeddings, final norm, decoders). The parameters
become DTensors sharded on dim 0 under their plain names, so layer-wise lr decay, the optimiser and
the checkpoint keys see the plain model. Ray's own FSDP path (FSDP1) refuses to run without CUDA and
is not used; ``fully_shard`` also runs on CPU over gloo, which is how the test suite exercises the
sharded path (checkpoint gather, resume, validation).
"""

from __future__ import annotations

import torch
from torch import nn

from pipelines.training.sections import FSDPSection, ScalingSection
from vitpose_core.checkpoint import unwrap_model
from vitpose_core.models.vit import Block


def wrap_model(model: nn.Module, scaling: ScalingSection, device: torch.device) -> nn.Module:
    """DDP through Ray's ``prepare_model``, or FSDP2 applied here (``shard_model``)."""
    import ray.train.torch

    if scaling.strategy != "fsdp":
        return ray.train.torch.prepare_model(model, parallel_strategy=scaling.strategy)
    from vitpose_core.inference import resolve_precision

    return shard_model(model.to(device), scaling.fsdp, resolve_precision(scaling.precision, device), device)


def shard_model(model: nn.Module, options: FSDPSection, precision: str, device: torch.device) -> nn.Module:
    """``fully_shard`` over all ranks of the default process group: every ``Block``, then the root (in place).

    bf16: the units compute with bf16 copies of the parameters and reduce gradients in fp32; the sharded
    parameters the optimiser steps stay fp32. BatchNorm (the heatmap decoders) keeps fp32 parameters, next
    to its fp32 running statistics, as FSDP1's ``MixedPrecision`` did by default.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)  # fully_shard places shards on the current device of the mesh's type
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    offload = CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy()
    full = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    mixed = full if precision != "bf16" else MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                  reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            fully_shard(module, mesh=mesh, mp_policy=full, offload_policy=offload,
                        reshard_after_forward=options.reshard_after_forward)
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for index, block in enumerate(blocks):
        # the last block (in forward order) is the first one backward needs: resharding it would only
        # make backward gather it again at once
        reshard = options.reshard_after_forward and index < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mixed, offload_policy=offload, reshard_after_forward=reshard)
    # the root is left gathered after forward (FSDP2's default for it): the loss may read head parameters
    fully_shard(model, mesh=mesh, mp_policy=mixed, offload_policy=offload)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimiser state on CPU.

    Under FSDP every rank must call this (it all-gathers the DTensor shards); rank 0 receives the full
    state and the other ranks empty dicts. Model keys are the plain model's names, optimiser state is keyed
    by them too (DDP's is torch's index-keyed ``state_dict``).
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap_model(model).state_dict(), optimizer.state_dict()


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optim_state: dict) -> None:
    """Restore what ``full_state`` saved into the wrapped model and its optimiser; every rank passes it whole.

    Under FSDP each rank keeps only its shard of both (``set_state_dict`` distributes the full tensors
    as DTensors like the parameters'); under DDP the replicas load it whole.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        # a copy of the mapping: set_state_dict puts this rank's DTensor shards into the dict it is given
        set_state_dict(model, optimizer, model_state_dict=dict(model_state), optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
    else:
        unwrap_model(model).load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
