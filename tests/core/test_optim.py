"""Layer-wise lr decay groups and warm-up + step/cosine schedules."""

from __future__ import annotations

import math

import pytest
import torch

from vitpose_core.models import build_model
from vitpose_core.optim import build_adamw, build_scheduler, layer_decay_param_groups, layer_id, lr_multiplier


def test_layer_id_follows_official_numbering():
    assert layer_id("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id("backbone.pos_embed", 12) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("backbone.blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("backbone.last_norm.weight", 12) == 13
    assert layer_id("keypoint_head.final_layer.weight", 12) == 13


def test_param_groups_decay_lr_and_skip_weight_decay_on_1d_and_pos_embed():
    model = build_model("vitpose-tiny", img_size=(64, 48))
    depth = model.config.depth
    groups = layer_decay_param_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.8)
    by_name = {name: group for group in groups for name in group["param_names"]}
    assert len(by_name) == sum(1 for _ in model.parameters())  # every parameter exactly once
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.1
    assert by_name["keypoint_head.final_layer.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(1e-3 * 0.8**depth)
    assert by_name["backbone.patch_embed.proj.weight"]["lr"] == pytest.approx(1e-3 * 0.8 ** (depth + 1))


def test_warmup_then_cosine_and_step():
    assert lr_multiplier(0, 100, warmup_steps=10, warmup_ratio=0.001) == pytest.approx(0.001)
    assert lr_multiplier(5, 100, warmup_steps=10, warmup_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, warmup_steps=10) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, warmup_steps=10, min_ratio=0.01) == pytest.approx(0.01)
    assert lr_multiplier(79, 100, kind="step", milestones=(80, 95)) == 1.0
    assert lr_multiplier(80, 100, kind="step", milestones=(80, 95)) == pytest.approx(0.1)
    assert lr_multiplier(99, 100, kind="step", milestones=(80, 95)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown schedule kind 'linear'"):
        lr_multiplier(50, 100, kind="linear")  # type: ignore[arg-type]


def test_scheduler_keeps_layer_decay_ratio_and_resumes_from_state_dict():
    model = build_model("vitpose-tiny", img_size=(64, 48))
    optimizer = build_adamw(model, lr=1e-3, layer_decay=0.5)
    scheduler = build_scheduler(optimizer, total_steps=20, warmup_steps=4, kind="cosine")
    ratios = [g["lr"] / optimizer.param_groups[-1]["lr"] for g in optimizer.param_groups]
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] / optimizer.param_groups[-1]["lr"] for g in optimizer.param_groups] == pytest.approx(ratios)
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 16))
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(expected)

    fresh_optimizer = build_adamw(model, lr=1e-3, layer_decay=0.5)
    fresh = build_scheduler(fresh_optimizer, total_steps=20, warmup_steps=4, kind="cosine")
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(scheduler.state_dict())
    fresh_optimizer.step()
    fresh.step()
    optimizer.step()
    scheduler.step()
    assert fresh_optimizer.param_groups[-1]["lr"] == pytest.approx(optimizer.param_groups[-1]["lr"])


def test_build_scheduler_rejects_bad_warmup():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(optimizer, total_steps=10, warmup_steps=11)


def test_wrapper_prefixes_do_not_change_the_groups():
    model = build_model("vitpose-tiny", img_size=(64, 48))

    class Wrapper(torch.nn.Module):  # stands in for DDP's `module.` prefix
        def __init__(self, module):
            super().__init__()
            self.module = module

    plain = layer_decay_param_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.8)
    wrapped = layer_decay_param_groups(Wrapper(model), lr=1e-3, weight_decay=0.1, layer_decay=0.8)
    assert [g["param_names"] for g in plain] == [g["param_names"] for g in wrapped]
    assert [g["lr"] for g in plain] == [g["lr"] for g in wrapped]
