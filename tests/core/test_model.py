"""The ViTPose model family: official architecture, parameter counts, resolutions, HF parity."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paths import REPO_ROOT

from vitpose_core import build_model, count_parameters
from vitpose_core.models import VARIANTS, ViTPoseConfig

# Parameter counts of the official models with the classic decoder (ViTPose paper / model zoo).
OFFICIAL_PARAMS_M = {"vitpose-s": 24.29, "vitpose-b": 89.99, "vitpose-l": 308.54, "vitpose-h": 637.21}


@pytest.mark.parametrize("variant", sorted(OFFICIAL_PARAMS_M))
def test_parameter_counts_match_official(variant):
    with torch.device("meta"):  # no memory, no init cost: only shapes matter here
        model = build_model(variant)
    millions = count_parameters(model) / 1e6
    assert abs(millions - OFFICIAL_PARAMS_M[variant]) / OFFICIAL_PARAMS_M[variant] < 0.005, millions


def test_vitpose_g_is_about_one_billion_parameters():
    with torch.device("meta"):
        model = build_model("vitpose-g")
    assert 0.95e9 < count_parameters(model) < 1.05e9


def test_official_token_grid_and_output_shape():
    model = build_model("vitpose-tiny").eval()
    assert model.backbone.grid_size == (16, 12)  # 256x192 with the padded 16x16 patch conv
    assert tuple(model.backbone.pos_embed.shape) == (1, 16 * 12 + 1, 192)
    with torch.no_grad():
        heatmaps = model(torch.randn(2, 3, 256, 192))
    assert heatmaps.shape == (2, 17, 64, 48)
    assert model.config.heatmap_size == (64, 48)


def test_first_pos_embed_slot_is_added_to_every_patch():
    """Changing only slot 0 shifts every patch token by the same vector (there is no cls token)."""
    model = build_model("vitpose-tiny").eval()
    x = torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        tokens_before, _ = model.backbone.embed(x)
        delta = torch.randn(192)
        model.backbone.pos_embed[0, 0] += delta
        tokens_after, _ = model.backbone.embed(x)
    torch.testing.assert_close(tokens_after - tokens_before, delta.expand_as(tokens_before), atol=1e-5, rtol=0)


def test_stochastic_depth_rises_linearly():
    model = build_model("vitpose-tiny", drop_path_rate=0.5)
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in model.backbone.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)
    assert all(b > a for a, b in zip(rates, rates[1:], strict=False))


@pytest.mark.parametrize("img_size", [(256, 192), (384, 288), (576, 432)])
def test_any_resolution_runs(img_size):
    model = build_model("vitpose-tiny", img_size=img_size).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *img_size))
    assert out.shape[-2:] == (img_size[0] // 4, img_size[1] // 4)


def test_input_at_other_resolution_resizes_pos_embed_on_the_fly():
    model = build_model("vitpose-tiny").eval()  # built for 256x192
    with torch.no_grad():
        out = model(torch.randn(1, 3, 384, 288))
    assert out.shape == (1, 17, 96, 72)


def test_simple_decoder_and_aic_keypoints():
    model = build_model("vitpose-tiny", decoder="simple", keypoint_set="aic").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 192))
    assert out.shape == (1, 14, 64, 48)


def test_config_is_strict():
    with pytest.raises(ValueError, match="attention"):
        build_model("vitpose-tiny", attention="sparse")
    with pytest.raises(ValueError, match="num_keypoints"):
        build_model("vitpose-tiny", num_keypoints=14)  # coco set has 17
    with pytest.raises(ValueError, match="extra"):
        ViTPoseConfig(varient="vitpose-b")
    with pytest.raises(ValueError, match="unknown variant"):
        build_model("vitpose-xl")


@pytest.mark.parametrize("decoder", ["classic", "simple"])
def test_heatmaps_equal_transformers_implementation(decoder):
    """transformers' VitPoseForPoseEstimation is an independent port of the official network."""
    pytest.importorskip("transformers")
    from vitpose_core.interop import build_hf_model

    torch.manual_seed(0)
    ours = build_model("vitpose-s", decoder=decoder).eval()
    with torch.no_grad():  # random BN statistics so the decoder's BN is exercised
        for module in ours.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for param in ours.keypoint_head.parameters():
            param.normal_(0, 0.02)
    theirs = build_hf_model(ours.config, ours.state_dict())
    x = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        expected = theirs(pixel_values=x).heatmaps
        actual = ours(x)
    assert expected.abs().max() > 1e-2  # non-trivial heatmaps
    assert (actual - expected).abs().max().item() <= 1e-4


def test_all_variants_have_official_layer_decay():
    assert VARIANTS["vitpose-s"].layer_decay == 0.8
    assert VARIANTS["vitpose-b"].layer_decay == 0.75
    assert VARIANTS["vitpose-l"].layer_decay == 0.8
    assert VARIANTS["vitpose-h"].layer_decay == 0.85


def test_core_never_imports_ray_or_mlflow():
    forbidden = {"ray", "mlflow", "pipelines"}
    offenders = []
    for path in sorted((REPO_ROOT / "vitpose_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden]
    assert not offenders, offenders
    # and at run time: importing every core module pulls in neither
    modules = [p.relative_to(REPO_ROOT).with_suffix("").as_posix().replace("/", ".")
               for p in Path(REPO_ROOT / "vitpose_core").rglob("*.py")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_optimized_model_matches_eager_for_any_batch_size():
    """bf16 weights + torch.compile (freezing, dynamic batch): heatmaps as eager bf16, no recompile per batch."""
    from vitpose_core.inference import optimize_for_inference, run_model

    torch.manual_seed(0)
    model = build_model("vitpose-tiny", img_size=(64, 48), depth=2).eval()  # 2 blocks: compiles in less time
    eager = copy.deepcopy(model).to(torch.bfloat16)
    compiled = optimize_for_inference(model, torch.bfloat16, compile=True)
    assert compiled.config.img_size == (64, 48)  # attribute access still reaches the model
    for batch in (3, 1):
        crops = torch.randn(batch, 3, 64, 48)
        expected = run_model(eager, crops)
        actual = run_model(compiled, crops)
        assert actual.dtype == torch.float32 and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=2e-2 * float(expected.abs().max()), rtol=0.05)


def _multi_dataset_model(num_experts: int = 3):
    from vitpose_core.keypoints import AIC, MPII

    torch.manual_seed(0)
    return build_model("vitpose-tiny", datasets=[("coco", "coco"), ("aic", AIC), ("mpii", MPII)],
                       num_experts=num_experts, part_features=48 if num_experts else 0)


def test_multi_dataset_model_has_one_decoder_per_dataset():
    model = _multi_dataset_model().eval()
    assert [head.final_layer.out_channels for head in model.heads] == [17, 14, 16]
    x = torch.randn(4, 3, 256, 192)
    index = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        outputs = model.forward_datasets(x, index)
        assert [o.shape[:2] for o in outputs] == [(1, 17), (1, 14), (2, 16)]
        # one backbone pass over the mixed batch equals per-dataset passes (expert per sample)
        torch.testing.assert_close(outputs[2], model(x[index == 2], dataset_index=2), atol=1e-5, rtol=0)
        torch.testing.assert_close(outputs[1], model(x[index == 1], dataset_index=torch.tensor([1])), atol=1e-5,
                                   rtol=0)
    with pytest.raises(ValueError, match="forward_datasets"):
        model(x, dataset_index=index)
    with pytest.raises(ValueError, match="dataset index 3"):
        model(x, dataset_index=3)
    assert model.config.dataset_index("mpii") == 2


def test_moe_expert_is_per_dataset_in_training_and_inference():
    """Training masks every expert to its samples (all take part, as DDP needs); inference runs only
    the chosen one: both give the same function, and only the chosen expert gets gradients."""
    model = _multi_dataset_model()
    x = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        for expert in model.backbone.blocks[0].mlp.experts:  # make the experts differ visibly
            expert.weight.normal_(0, 0.5)
    model.train()
    features_train = model.backbone(x, expert_index=1)
    model.eval()
    with torch.no_grad():
        features_eval = model.backbone(x, expert_index=1)
        other_expert = model.backbone(x, expert_index=2)
    torch.testing.assert_close(features_train.detach(), features_eval, atol=1e-5, rtol=0)
    assert (other_expert - features_eval).abs().max() > 1e-2
    model.train()
    model.forward_datasets(x, torch.tensor([1, 1]))[1].square().mean().backward()
    mlp = model.backbone.blocks[0].mlp
    assert mlp.experts[1].weight.grad.abs().sum() > 0 and mlp.fc2.weight.grad.abs().sum() > 0
    assert mlp.experts[0].weight.grad.abs().sum() == 0 and mlp.experts[2].weight.grad.abs().sum() == 0
    assert model.keypoint_head.final_layer.weight.grad is None  # the COCO decoder saw no sample


def test_multi_dataset_config_is_strict():
    from vitpose_core.keypoints import AIC

    with pytest.raises(ValueError, match="at least as many experts"):
        build_model("vitpose-tiny", datasets=[("coco", "coco"), ("aic", AIC)], num_experts=1, part_features=48)
    with pytest.raises(ValueError, match="part_features"):
        build_model("vitpose-tiny", num_experts=2)
    with pytest.raises(ValueError, match="unique"):
        build_model("vitpose-tiny", datasets=[("coco", "coco"), ("coco", AIC)])
