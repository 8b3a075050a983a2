"""Checkpoint formats: own (with keypoint sets), official ViTPose+ MoE and its model_split files,
Hugging Face VitPose directories in both directions, and the unknown-format error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from paths import SHARED_ROOT

from vitpose_core import CheckpointError, build_model, load_model, save_checkpoint
from vitpose_core.checkpoint import read_checkpoint_keypoint_sets
from vitpose_core.interop import save_hf_directory
from vitpose_core.keypoints import AIC, AP10K, KeypointSet, keypoint_set_from_category
from vitpose_core.models import split_dataset_model

REFERENCE = SHARED_ROOT / "reference"
X = torch.randn(2, 3, 256, 192, generator=torch.Generator().manual_seed(3))


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial decoders: the default init gives near-zero heatmaps that would hide mistakes."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "head" in name or "experts" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


# ------------------------------------------------------------------------------------------- own format

def test_own_checkpoint_records_a_custom_keypoint_set(tmp_path):
    category = {"name": "hand", "keypoints": ["wrist", "left_tip", "right_tip"], "skeleton": [[1, 2], [1, 3]]}
    hand = keypoint_set_from_category(category, name="hand3", sigmas=[0.05, 0.02, 0.02])
    model = build_model("vitpose-tiny", keypoint_set=hand).eval()
    out = save_checkpoint(model, tmp_path / "hand")
    record = json.loads((out / "config.json").read_text())
    assert record["keypoint_sets"] == [hand.to_dict()]
    assert record["keypoint_sets"][0]["flip_pairs"] == [[1, 2]] and record["keypoint_sets"][0]["skeleton"] == [[0, 1], [0, 2]]
    restored = load_model(out)
    assert restored.config.keypoint_set_data == hand
    assert read_checkpoint_keypoint_sets(out) == {"hand3": hand}
    with torch.no_grad():
        assert torch.equal(restored(X), model(X))


def test_a_17_keypoint_set_cannot_pass_for_coco(tmp_path):
    out = save_checkpoint(build_model("vitpose-tiny", keypoint_set=AP10K), tmp_path / "animals")
    assert load_model(out).config.keypoint_set_data == AP10K
    record = json.loads((out / "config.json").read_text())
    record["model"]["keypoint_set"] = "coco"  # a record claiming the COCO name with AP-10K's keypoints
    record["model"]["keypoints"] = {**AP10K.to_dict(), "name": "coco"}
    (out / "config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="differs from the built-in set"):
        load_model(out)


def test_multi_dataset_moe_round_trip_and_split(tmp_path):
    torch.manual_seed(0)
    model = _randomise(build_model("vitpose-tiny", datasets=[("coco", "coco"), ("aic", AIC), ("zoo", AP10K)],
                                   num_experts=3, part_features=48))
    out = save_checkpoint(model, tmp_path / "multi")
    record = json.loads((out / "config.json").read_text())
    assert record["datasets"] == ["coco", "aic", "zoo"]
    assert [s["name"] for s in record["keypoint_sets"]] == ["coco", "aic", "ap10k"]
    restored = load_model(out)
    with torch.no_grad():
        for index in range(3):
            torch.testing.assert_close(restored(X, dataset_index=index), model(X, dataset_index=index), atol=0, rtol=0)
        aic_only = load_model(out, dataset="aic")
        assert aic_only.config.num_experts == 0 and aic_only.config.keypoint_set == "aic"
        torch.testing.assert_close(aic_only(X), model(X, dataset_index=1), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- official ViTPose+ (MoE) files

OFFICIAL_PLUS_KEYPOINTS = (17, 14, 16, 17, 17, 133)  # coco, aic, mpii, ap10k, apt36k, wholebody


def _official_plus_state(part_features: int = 96, num_experts: int = 6) -> dict[str, torch.Tensor]:
    """An official ViTPose+-S state dict built from the official ViTPose-S key list: every
    ``mlp.fc2`` loses ``part_features`` output rows to ``mlp.experts.0..5``, and decoders
    ``associate_keypoint_heads.0..4`` repeat ``keypoint_head`` with their datasets' keypoint counts."""
    generator = torch.Generator().manual_seed(5)
    shapes = {}
    for line in (REFERENCE / "vitpose_s_official_keys.tsv").read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            shapes[key] = tuple(json.loads(shape))
    state: dict[str, torch.Tensor] = {}

    def add(key: str, shape: tuple[int, ...]) -> None:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(3)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.05

    for key, shape in shapes.items():
        if ".mlp.fc2." in key:
            add(key, (shape[0] - part_features,) + shape[1:])
            for expert in range(num_experts):
                add(key.replace(".fc2.", f".experts.{expert}."), (part_features,) + shape[1:])
        elif key.startswith("keypoint_head."):
            for head, count in enumerate(OFFICIAL_PLUS_KEYPOINTS):
                target = key if head == 0 else key.replace("keypoint_head.", f"associate_keypoint_heads.{head - 1}.")
                add(target, (count,) + shape[1:] if "final_layer" in key else shape)
        else:
            add(key, shape)
    state["backbone.cls_token"] = torch.zeros(1, 1, shapes["backbone.pos_embed"][2])  # some official files have it
    return state


def _model_split(state: dict[str, torch.Tensor], dataset: int) -> dict[str, torch.Tensor]:
    """What the official tools/model_split.py writes for one dataset: fc2 + that expert's rows, that
    dataset's decoder as keypoint_head, no experts and no other decoders."""
    out = {}
    head_prefix = "keypoint_head." if dataset == 0 else f"associate_keypoint_heads.{dataset - 1}."
    for key, value in state.items():
        if ".mlp.fc2." in key:
            out[key] = torch.cat([value, state[key.replace(".fc2.", f".experts.{dataset}.")]], dim=0)
        elif key.startswith(head_prefix):
            out["keypoint_head." + key[len(head_prefix):]] = value
        elif not (".experts." in key or key.startswith(("keypoint_head.", "associate_keypoint_heads."))):
            out[key] = value
    return out


@pytest.fixture(scope="module")
def official_plus(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _official_plus_state()
    path = tmp_path_factory.mktemp("official") / "vitpose+_small.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": state}, path)
    return path, state


def test_official_vitpose_plus_moe_loads_with_every_head(official_plus, caplog):
    path, state = official_plus
    with caplog.at_level(logging.WARNING):
        model = load_model(path)
    assert "backbone.cls_token" in caplog.text  # skipped, said so
    config = model.config
    assert config.dataset_names == ["coco", "aic", "mpii", "ap10k", "apt36k", "wholebody"]
    assert [s.name for s in config.dataset_keypoint_sets()] == ["coco", "aic", "mpii", "ap10k", "ap10k",
                                                                 "coco_wholebody"]
    assert (config.num_experts, config.part_features, config.variant) == (6, 96, "vitpose-s")
    torch.testing.assert_close(model.state_dict()["associate_keypoint_heads.4.final_layer.weight"],
                               state["associate_keypoint_heads.4.final_layer.weight"])
    torch.testing.assert_close(model.state_dict()["backbone.blocks.7.mlp.experts.5.weight"],
                               state["backbone.blocks.7.mlp.experts.5.weight"])
    x = X[:1]
    with torch.no_grad():
        outputs = model.forward_datasets(torch.cat([x] * 6), torch.arange(6))
        assert [o.shape[1] for o in outputs] == list(OFFICIAL_PLUS_KEYPOINTS)
        # the expert matters: another dataset's expert gives other features
        features = [model.backbone(x, expert_index=index) for index in (0, 1)]
        assert (features[1] - features[0]).abs().max() > 1e-2


@pytest.mark.parametrize("dataset, file_name, expected_set", [
    (1, "aic.pth", "aic"), (3, "ap10k.pth", "ap10k"), (5, "wholebody.pth", "coco_wholebody"),
])
def test_official_model_split_files_load_as_that_dataset(official_plus, tmp_path, dataset, file_name, expected_set):
    path, state = official_plus
    split_path = tmp_path / file_name
    torch.save({"state_dict": _model_split(state, dataset)}, split_path)
    single = load_model(split_path)
    assert single.config.keypoint_set == expected_set  # from the file name: an AP-10K file is not COCO
    assert single.config.num_experts == 0 and single.config.num_datasets == 1
    full = load_model(path)
    with torch.no_grad():
        expected = full(X[:1], dataset_index=dataset)
        torch.testing.assert_close(single(X[:1]), expected, atol=1e-5, rtol=0)
        # our own export of the same dataset equals the official tool's file
        torch.testing.assert_close(split_dataset_model(full, dataset)(X[:1]), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_model(path, dataset=dataset)(X[:1]), expected, atol=1e-5, rtol=0)


def test_unnamed_17_keypoint_official_file_warns_before_assuming_coco(official_plus, tmp_path, caplog):
    _, state = official_plus
    split_path = tmp_path / "model.pth"
    torch.save({"state_dict": _model_split(state, 3)}, split_path)
    with caplog.at_level(logging.WARNING):
        assert load_model(split_path).config.keypoint_set == "coco"
    assert "assuming the 'coco' set" in caplog.text
    assert load_model(split_path, keypoint_set="ap10k").config.keypoint_set_data == AP10K


# ------------------------------------------------------------------------------- Hugging Face directories

def _hf_model(num_experts: int, simple: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(num_experts * 2 + simple)
    backbone = transformers.VitPoseBackboneConfig(
        image_size=[256, 192], patch_size=[16, 16], hidden_size=96, num_hidden_layers=2, num_attention_heads=3,
        mlp_ratio=4, num_experts=num_experts, part_features=24, layer_norm_eps=1e-6, out_indices=[2])
    config = transformers.VitPoseConfig(backbone_config=backbone, use_simple_decoder=simple, num_labels=17)
    return _randomise(transformers.VitPoseForPoseEstimation(config))


@pytest.mark.parametrize("num_experts, simple", [(1, True), (1, False), (3, True)])
def test_transformers_directory_to_ours_gives_equal_heatmaps(tmp_path, num_experts, simple):
    theirs = _hf_model(num_experts, simple)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config.num_experts == (num_experts if num_experts > 1 else 0)
    assert ours.config.decoder == ("simple" if simple else "classic")
    with torch.no_grad():
        for index in range(num_experts):
            kwargs = {"dataset_index": torch.full((2,), index)} if num_experts > 1 else {}
            expected = theirs(pixel_values=X, **kwargs).heatmaps
            actual = ours(X, dataset_index=index if num_experts > 1 else None)
            assert expected.abs().max() > 1e-2
            assert (actual - expected).abs().max().item() <= 1e-4
        if num_experts > 1:  # one expert per sample
            mixed = torch.tensor([0, 2])
            difference = ours(X, dataset_index=mixed) - theirs(pixel_values=X, dataset_index=mixed).heatmaps
            assert difference.abs().max().item() <= 1e-4


@pytest.mark.parametrize("moe", [False, True])
def test_ours_to_transformers_directory_loads_and_matches(tmp_path, moe):
    transformers = pytest.importorskip("transformers")
    hand = KeypointSet("hand3", ("wrist", "left_tip", "right_tip"), ((1, 2),), ((0, 1), (0, 2)), (0.05, 0.02, 0.02), ())
    fields = dict(embed_dim=96, depth=2, num_heads=3, mlp_hidden_dim=384, decoder_channels=256)
    if moe:
        fields.update(datasets=[("coco", "coco"), ("hands", hand)], num_experts=2, part_features=24)
    else:
        fields.update(keypoint_set=hand)
    ours = _randomise(build_model("vitpose-tiny", **fields))
    dataset = 1 if moe else 0
    save_hf_directory(ours, tmp_path / "hf", dataset=dataset)
    theirs = transformers.VitPoseForPoseEstimation.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.id2label[1] == "left_tip"
    with torch.no_grad():
        kwargs = {"dataset_index": torch.full((2,), dataset)} if moe else {}
        expected = ours(X, dataset_index=dataset if moe else None)
        assert (theirs(pixel_values=X, **kwargs).heatmaps - expected).abs().max().item() <= 1e-4
    back = load_model(tmp_path / "hf")  # and the directory reads back with its keypoint set
    assert back.config.keypoint_set_data == hand
    with torch.no_grad():
        assert (back(X, dataset_index=dataset if moe else None) - expected).abs().max().item() <= 1e-5


# -------------------------------------------------------------------------------------------- bad input

def test_unknown_formats_say_what_was_expected_and_found(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 8)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    message = str(error.value)
    assert str(folder) in message and "Hugging Face VitPoseForPoseEstimation" in message and "official" in message
    assert "pytorch_model.bin" in message and "'bert'" in message
    other = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match=r"resnet\.pth: unknown checkpoint format.*conv1\.weight"):
        load_model(other)


def test_official_multi_task_file_without_experts_loads_every_decoder(official_plus, tmp_path):
    """ViTPose's COCO+AIC+MPII multi-task checkpoints: plain FFNs, three decoders."""
    _, state = official_plus
    plain = _model_split(state, 0)  # fc2 + expert 0 rows: plain FFNs
    for head in (1, 2):
        for key, value in state.items():
            if key.startswith(f"associate_keypoint_heads.{head - 1}."):
                plain[key] = value
    path = tmp_path / "vitpose_small_coco_aic_mpii.pth"
    torch.save({"state_dict": plain}, path)
    model = load_model(path)
    assert model.config.dataset_names == ["coco", "aic", "mpii"] and model.config.num_experts == 0
    with torch.no_grad():
        assert model(X[:1], dataset_index=2).shape[1] == 16


def test_hf_keypoint_names_and_refusals(tmp_path):
    from vitpose_core.interop import HFFormatError

    theirs = _hf_model(1, True)
    theirs.config.id2label = {i: name for i, name in enumerate(["x"] * 17)}  # names that say nothing
    theirs.save_pretrained(tmp_path / "plain")
    assert load_model(tmp_path / "plain", keypoint_set="posetrack18").config.keypoint_set == "posetrack18"
    with pytest.raises(HFFormatError, match="14"):
        load_model(tmp_path / "plain", keypoint_set="aic")
    windowed = build_model("vitpose-tiny", embed_dim=96, depth=2, num_heads=3, mlp_hidden_dim=384, decoder="simple",
                           attention="window", window_size=4)
    with pytest.raises(HFFormatError, match="attention 'window'"):
        save_hf_directory(windowed, tmp_path / "windowed")
