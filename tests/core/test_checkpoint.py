"""Checkpoint I/O: official key lists from ../shared/reference, strict errors, own format round trip."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from paths import SHARED_ROOT

from vitpose_core import CheckpointError, build_model, load_checkpoint, load_model, save_checkpoint
from vitpose_core.checkpoint import infer_official_config, load_state_dict_into

REFERENCE = SHARED_ROOT / "reference"
KEY_LISTS = {
    "vitpose_s_official_keys.tsv": ("vitpose-s", "classic"),
    "vitpose_s_simple_official_keys.tsv": ("vitpose-s", "simple"),
    "vitpose_b_official_keys.tsv": ("vitpose-b", "classic"),
    "vitpose_b_simple_official_keys.tsv": ("vitpose-b", "simple"),
    "vitpose_l_official_keys.tsv": ("vitpose-l", "classic"),
    "vitpose_l_simple_official_keys.tsv": ("vitpose-l", "simple"),
    "vitpose_h_official_keys.tsv": ("vitpose-h", "classic"),
    "vitpose_h_simple_official_keys.tsv": ("vitpose-h", "simple"),
}
SMALL = {"vitpose-s", "vitpose-b"}  # real random tensors and a real .pth file; L/H use meta tensors


def read_key_list(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            shapes[key] = tuple(json.loads(shape))
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], device: str = "cpu") -> dict[str, torch.Tensor]:
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, device=device)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, device=device) + 0.5
        else:
            state[key] = torch.randn(shape, device=device) * 0.02
    return state


@pytest.mark.parametrize("list_name", sorted(KEY_LISTS))
def test_model_keys_and_shapes_equal_official_list(list_name):
    variant, decoder = KEY_LISTS[list_name]
    with torch.device("meta"):
        model = build_model(variant, decoder=decoder)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == read_key_list(list_name)


@pytest.mark.parametrize("list_name", sorted(KEY_LISTS))
def test_random_official_checkpoint_loads(list_name, tmp_path):
    variant, decoder = KEY_LISTS[list_name]
    shapes = read_key_list(list_name)
    if variant in SMALL:
        path = tmp_path / "official.pth"
        torch.save({"meta": {"epoch": 210}, "state_dict": random_state(shapes)}, path)
        model = load_model(path)  # variant, decoder and keypoints inferred from the file
        assert (model.config.variant, model.config.decoder) == (variant, decoder)
        state = torch.load(path, weights_only=True)["state_dict"]
        torch.testing.assert_close(model.state_dict()["backbone.blocks.3.attn.qkv.weight"],
                                   state["backbone.blocks.3.attn.qkv.weight"])
        with torch.no_grad():
            assert torch.isfinite(model(torch.randn(1, 3, 256, 192))).all()
    else:  # L/H: same key/shape checking on meta tensors (GBs of real weights would be slow here)
        state = random_state(shapes, device="meta")
        config = infer_official_config(state)
        assert (config.variant, config.decoder) == (variant, decoder)
        with torch.device("meta"):
            model = build_model(variant, decoder=decoder)
        load_state_dict_into(model, state, source=list_name)


@pytest.fixture(scope="module")
def official_b_state() -> dict[str, torch.Tensor]:
    return random_state(read_key_list("vitpose_b_official_keys.tsv"))


def test_wrong_shape_is_named(official_b_state):
    state = dict(official_b_state)
    state["backbone.blocks.5.mlp.fc1.weight"] = torch.zeros(3000, 768)
    with pytest.raises(CheckpointError, match=r"backbone\.blocks\.5\.mlp\.fc1\.weight \(checkpoint \(3000, 768\)"):
        load_state_dict_into(build_model("vitpose-b"), state)


def test_extra_and_missing_keys_are_named(official_b_state):
    state = dict(official_b_state)
    state["backbone.blocks.12.norm1.weight"] = torch.ones(768)
    del state["keypoint_head.final_layer.bias"]
    with pytest.raises(CheckpointError) as error:
        load_state_dict_into(build_model("vitpose-b"), state)
    assert "unexpected keys: backbone.blocks.12.norm1.weight" in str(error.value)
    assert "missing keys: keypoint_head.final_layer.bias" in str(error.value)


def test_multi_dataset_extras_are_skipped_with_warning(official_b_state, caplog):
    state = dict(official_b_state)
    state["backbone.cls_token"] = torch.zeros(1, 1, 768)
    state["associate_keypoint_heads.0.final_layer.weight"] = torch.zeros(14, 256, 1, 1)
    with caplog.at_level(logging.WARNING):
        load_state_dict_into(build_model("vitpose-b"), state)
    assert "associate_keypoint_heads.0.final_layer.weight" in caplog.text
    assert "backbone.cls_token" in caplog.text


def test_official_checkpoint_at_another_resolution(official_b_state, tmp_path):
    path = tmp_path / "b.pth"
    torch.save({"state_dict": official_b_state}, path)
    model = load_model(path, img_size=(384, 288))
    assert model.backbone.pos_embed.shape == (1, 24 * 18 + 1, 768)
    # slot 0 is carried over unchanged; the patch grid is interpolated, corners included
    torch.testing.assert_close(model.backbone.pos_embed[0, 0], official_b_state["backbone.pos_embed"][0, 0])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 288)).shape == (1, 17, 96, 72)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(bad)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_model(tmp_path / "missing.pth")


def test_own_format_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_model("vitpose-tiny", attention="pooling_window", window_size=4, keypoint_set="aic").eval()
    out = save_checkpoint(model, tmp_path / "ckpt", metadata={"run_id": "abc", "val_AP": 0.5})
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    restored = load_model(out)
    assert restored.config == model.config
    x = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x), atol=0, rtol=0)
    assert json.loads((out / "config.json").read_text())["metadata"]["val_AP"] == 0.5
    # the weights file alone rebuilds the model from its embedded config
    (out / "config.json").unlink()
    assert load_model(out / "model.safetensors").config == model.config


def test_own_checkpoint_into_mismatched_model_fails(tmp_path):
    save_checkpoint(build_model("vitpose-tiny"), tmp_path / "tiny")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(build_model("vitpose-s"), tmp_path / "tiny")
