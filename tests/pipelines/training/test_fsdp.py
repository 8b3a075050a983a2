"""FSDP2 (``fully_shard``) on CPU over gloo, without Ray: the units it makes, parity with DDP, and resume.

The Ray Train path (2 FSDP workers, rank-0 validation, export, resume) is in test_train_ray.py; the GPU
runs (ViTPose-H over nccl, bf16) are in test_fsdp_gpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from fsdp_helpers import RunSpec, spawn_ranks

from pipelines.config import ConfigError, build_config
from pipelines.finetune.config import FinetuneConfig
from pipelines.training.fsdp import full_state, is_fsdp, shard_model
from pipelines.training.sections import FSDPSection
from vitpose_core.models import build_model
from vitpose_core.models.vit import Block


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process (fully_shard needs a group, even of one)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg_init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shard_model_makes_one_unit_per_block_keeps_names_and_batchnorm_fp32(one_rank_group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = build_model("vitpose-tiny", img_size=(64, 48))
    plain_names = [name for name, _ in model.named_parameters()]
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    shard_model(model, FSDPSection(), "bf16", torch.device("cpu"))

    assert is_fsdp(model) and not is_fsdp(build_model("vitpose-tiny", img_size=(64, 48)))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all(isinstance(block, FSDPModule) for block in blocks)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(norm, FSDPModule) for norm in norms)
    # in place, under the plain names: layer decay and checkpoint keys need no FSDP prefixes
    assert [name for name, _ in model.named_parameters()] == plain_names
    assert all(isinstance(param, DTensor) and param.dtype == torch.float32 for param in model.parameters())
    # bf16 compute copies for blocks and root; BatchNorm's stay fp32 (next to its fp32 running statistics)
    assert blocks[0]._get_fsdp_state()._mp_policy.param_dtype == torch.bfloat16
    assert norms[0]._get_fsdp_state()._mp_policy.param_dtype is None
    optimizer = torch.optim.AdamW(model.parameters())
    gathered, _ = full_state(model, optimizer)
    assert set(gathered) == set(plain_state)
    for name, tensor in plain_state.items():
        torch.testing.assert_close(gathered[name], tensor, msg=name)


# (True, True) is how vitpose_h_fsdp.yaml trains; each case spawns 2 ranks (~20 s idle, ~60 s on the loaded box)
@pytest.mark.parametrize(("reshard_after_forward", "grad_checkpointing"),
                         [(True, True), pytest.param(False, False, marks=pytest.mark.slow)])
def test_fsdp2_matches_ddp_and_resumes_from_a_full_checkpoint(tmp_path, reshard_after_forward, grad_checkpointing):
    """2 ranks over gloo, fp32, one fixed global batch, 6 AdamW steps (layer decay, clipping): FSDP2's losses,
    gradient norms and final weights are DDP's; a run gathered at step 3, written, read back and loaded into
    a freshly built sharded model (other initial weights, new optimiser) continues exactly as the run
    that never stopped."""
    spec = RunSpec(reshard_after_forward=reshard_after_forward, grad_checkpointing=grad_checkpointing,
                   max_grad_norm=0.02)
    result = spawn_ranks(2, "cpu", spec, tmp_path)
    ddp, fsdp, resumed = result["ddp"], result["fsdp"], result["fsdp_resumed"]

    assert np.isfinite(fsdp["losses"]).all() and fsdp["losses"][-1] < fsdp["losses"][0]
    np.testing.assert_allclose(fsdp["losses"], ddp["losses"], rtol=1e-4)
    np.testing.assert_allclose(fsdp["grad_norms"], ddp["grad_norms"], rtol=1e-4)
    assert min(ddp["grad_norms"]) > spec.max_grad_norm  # clipping was at work on every step
    assert set(fsdp["model_state"]) == set(ddp["model_state"])
    for name, tensor in ddp["model_state"].items():
        torch.testing.assert_close(fsdp["model_state"][name], tensor, rtol=1e-3, atol=1e-5, msg=name)

    assert resumed["round_trip_max_diff"] == 0.0
    np.testing.assert_allclose(resumed["losses"], fsdp["losses"], rtol=1e-6)
    np.testing.assert_allclose(resumed["grad_norms"], fsdp["grad_norms"], rtol=1e-6)


@pytest.mark.slow  # ~80 s on the loaded box: bf16 is emulated on an AVX2 CPU; test_fsdp_gpu.py trains bf16 on GPUs
def test_fsdp2_bf16_stays_close_to_ddp(tmp_path):
    """bf16: FSDP2 computes with bf16 parameter copies, DDP under autocast with fp32 parameters; both reduce
    gradients in fp32, so the losses agree to bf16's precision."""
    result = spawn_ranks(2, "cpu", RunSpec(precision="bf16", strategies=("ddp", "fsdp"), keep_state=False), tmp_path)
    ddp, fsdp = result["ddp"], result["fsdp"]
    assert np.isfinite(fsdp["losses"]).all() and fsdp["losses"][-1] < fsdp["losses"][0]
    np.testing.assert_allclose(fsdp["losses"], ddp["losses"], rtol=0.05)


def finetune_scaling(**scaling) -> FinetuneConfig:
    return build_config(FinetuneConfig, {"scaling": scaling})


def test_fsdp_options_load_and_are_checked():
    config = finetune_scaling(strategy="fsdp", use_gpu=True, fsdp={"reshard_after_forward": False, "cpu_offload": True})
    assert config.scaling.fsdp == FSDPSection(reshard_after_forward=False, cpu_offload=True)
    # ignored under DDP: a section derived from an FSDP one may switch the strategy (distill's student)
    assert finetune_scaling(fsdp={"reshard_after_forward": False}).scaling.strategy == "ddp"
    with pytest.raises(ConfigError, match="cpu_offload needs scaling.use_gpu"):
        finetune_scaling(strategy="fsdp", fsdp={"cpu_offload": True})
    # FSDP1's options are gone: an unknown key is an error naming it
    with pytest.raises(ConfigError, match="unknown key 'scaling.fsdp.use_orig_params'"):
        finetune_scaling(strategy="fsdp", fsdp={"use_orig_params": True})
