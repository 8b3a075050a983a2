"""DDP and FSDP2 trained on the same data in a process group of their own: spawned ranks, no Ray, gloo or nccl.

``spawn_ranks(world_size, device_type, spec, out_dir)`` starts one process per rank; each builds the same
model (same seed), takes its slice of one fixed global batch and trains ``spec.steps`` steps under each
strategy of ``spec.strategies``:

* ``ddp``: torch's ``DistributedDataParallel``, the reference;
* ``fsdp``: ``pipelines.training.fsdp.shard_model`` (FSDP2), straight through;
* ``fsdp_resumed``: the same, but at step ``spec.resume_at`` the full state is gathered, written by rank 0,
  read back by every rank (as the Ray Train loop's checkpoint is) and loaded into a freshly built sharded
  model with other initial weights and a new optimiser, which train on.

Rank 0's result per strategy: the global (all-rank mean) loss and the clipped-before gradient norm of every
step, the full model state at the end, and for ``fsdp_resumed`` the largest difference between the state it
saved and the state gathered again right after loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from square_batches import square_batch

from pipelines.training.fsdp import full_state, load_full_state, shard_model
from pipelines.training.sections import FSDPSection
from vitpose_core.engine import EngineConfig, FinetuneTask, train_step
from vitpose_core.models import build_model
from vitpose_core.optim import build_adamw

STRATEGIES = ("ddp", "fsdp", "fsdp_resumed")


@dataclass(frozen=True)
class RunSpec:
    variant: str = "vitpose-tiny"
    img_size: tuple[int, int] = (64, 48)  # (H, W), as build_model takes it
    precision: str = "fp32"
    batch_per_rank: int = 4
    steps: int = 6
    resume_at: int = 3
    lr: float = 1e-3
    layer_decay: float = 0.9  # the per-layer groups see the sharded model's parameter names
    max_grad_norm: float = 1.0
    reshard_after_forward: bool = True
    grad_checkpointing: bool = False
    strategies: tuple[str, ...] = STRATEGIES
    keep_state: bool = True  # return rank 0's final full model state (off for ViTPose-H: 2.5 GB)


def global_batch(spec: RunSpec, world_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images with a bright square where keypoint 0's Gaussian target is: learnable in a few steps."""
    return square_batch(spec.batch_per_rank * world_size, spec.img_size, np.random.default_rng(seed))


def spawn_ranks(world_size: int, device_type: str, spec: RunSpec, out_dir: Path) -> dict[str, Any]:
    """Run ``train_ranks`` on ``world_size`` spawned processes; rank 0's results by strategy."""
    out_dir.mkdir(parents=True, exist_ok=True)
    init_file = out_dir / "pg_init"  # file:// rendezvous: no port to pick, nothing left listening
    mp.spawn(train_ranks, args=(world_size, device_type, spec, str(out_dir), str(init_file)), nprocs=world_size,
             join=True)
    return torch.load(out_dir / "result.pt", weights_only=False)


def train_ranks(rank: int, world_size: int, device_type: str, spec: RunSpec, out_dir: str, init_file: str) -> None:
    if device_type == "cpu":
        torch.set_num_threads(1)  # the ranks share the machine's cores
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            device_id=device if device.type == "cuda" else None)
    try:
        start = rank * spec.batch_per_rank
        batch = {k: v[start:start + spec.batch_per_rank] for k, v in global_batch(spec, world_size).items()}
        results = {strategy: _train(strategy, spec, batch, device, rank, Path(out_dir))
                   for strategy in spec.strategies}
        if rank == 0:
            torch.save(results, Path(out_dir) / "result.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _build(strategy: str, spec: RunSpec, device: torch.device, seed: int):
    torch.manual_seed(seed)
    model = build_model(spec.variant, img_size=spec.img_size, drop_path_rate=0.0,
                        grad_checkpointing=spec.grad_checkpointing).to(device)
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    else:
        shard_model(model, FSDPSection(reshard_after_forward=spec.reshard_after_forward), spec.precision, device)
    return model, build_adamw(model, spec.lr, layer_decay=spec.layer_decay)


def _train(strategy: str, spec: RunSpec, batch: dict, device: torch.device, rank: int, out_dir: Path) -> dict:
    engine = EngineConfig(device=str(device), precision=spec.precision, max_grad_norm=spec.max_grad_norm)
    model, optimizer = _build(strategy, spec, device, seed=0)
    losses, grad_norms, round_trip = [], [], None
    for step in range(spec.steps):
        if strategy == "fsdp_resumed" and step == spec.resume_at:
            path = _save_full_state(model, optimizer, rank, out_dir)
            del model, optimizer  # (ViTPose-H: free the first model's GPU memory before building the second)
            model, optimizer, round_trip = _load_into_fresh_model(path, spec, device, rank)
        result = train_step(model, FinetuneTask(), batch, optimizer, None, engine, step)
        loss = torch.tensor([result.loss], dtype=torch.float64, device=device)
        dist.all_reduce(loss)
        losses.append(loss.item() / dist.get_world_size())
        grad_norms.append(result.grad_norm)
    model_state = {}
    if spec.keep_state:
        gathered, _ = full_state(model, optimizer)
        model_state = {k: v.detach().float().cpu() for k, v in gathered.items()} if rank == 0 else {}
    return {"losses": losses, "grad_norms": grad_norms, "round_trip_max_diff": round_trip, "model_state": model_state}


def _save_full_state(model, optimizer, rank: int, out_dir: Path) -> Path:
    """Gather (every rank), rank 0 writes: the Ray Train loop's checkpoint, without Ray."""
    model_state, optim_state = full_state(model, optimizer)
    path = out_dir / "checkpoint.pt"
    if rank == 0:
        torch.save({"model": model_state, "optimizer": optim_state}, path)
    dist.barrier()
    return path


def _load_into_fresh_model(path: Path, spec: RunSpec, device: torch.device, rank: int):
    """Every rank reads the full state and loads it into a freshly built, sharded model and a new optimiser."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model, optimizer = _build("fsdp", spec, device, seed=1)  # other initial weights: the load must replace them
    load_full_state(model, optimizer, state["model"], state["optimizer"])
    again, _ = full_state(model, optimizer)
    round_trip = None
    if rank == 0:
        assert set(again) == set(state["model"])
        round_trip = max(float((again[k].float() - v.float()).abs().max()) for k, v in state["model"].items())
    return model, optimizer, round_trip
