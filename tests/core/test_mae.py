"""MAE: masking, patchify round trip, loss on masked patches, encoder export into ViTPose."""

from __future__ import annotations

import pytest
import torch

from vitpose_core.engine import EngineConfig, PretrainTask, train_step
from vitpose_core.mae import (
    build_mae,
    load_pretrained_encoder,
    patchify,
    random_masking,
    save_pretrained_encoder,
    unpatchify,
)
from vitpose_core.models import build_model, variant_config
from vitpose_core.optim import build_adamw


def test_patchify_round_trip_and_layout():
    images = torch.randn(2, 3, 64, 48)
    patches = patchify(images, 16)
    assert patches.shape == (2, 12, 16 * 16 * 3)
    # patch 1 is the block at row 0, column 1; its first pixel is (0, 16), channel-last
    assert torch.equal(patches[0, 1, :3], images[0, :, 0, 16])
    assert torch.equal(unpatchify(patches, 16, (4, 3)), images)


def test_random_masking_keeps_quarter_and_restores_order():
    torch.manual_seed(0)
    tokens = torch.arange(2 * 48, dtype=torch.float32).reshape(2, 48, 1)
    visible, mask, ids_restore = random_masking(tokens, 0.75)
    assert visible.shape == (2, 12, 1)
    assert mask.sum(dim=1).tolist() == [36.0, 36.0]
    for b in range(2):
        kept = tokens[b, mask[b] == 0, 0]
        assert sorted(visible[b, :, 0].tolist()) == sorted(kept.tolist())
    # unshuffling [visible, placeholders] puts visible tokens back where mask == 0
    padded = torch.cat([visible, torch.full((2, 36, 1), -1.0)], dim=1)
    restored = torch.gather(padded, 1, ids_restore.unsqueeze(-1))
    assert torch.equal(restored[mask == 0], tokens[mask == 0])
    assert bool((restored[mask == 1] == -1).all())


def test_mae_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    mae = build_mae(variant_config("vitpose-tiny", img_size=(64, 48)), decoder_dim=64, decoder_depth=1,
                    norm_pix_loss=False)
    # smooth images: a masked patch is predictable from its visible neighbours (white noise is not)
    images = torch.nn.functional.interpolate(torch.randn(4, 3, 4, 3), size=(64, 48), mode="bilinear")
    optimizer = build_adamw(mae, lr=1e-3, weight_decay=0.05)
    config = EngineConfig(precision="fp32")
    losses = [train_step(mae, PretrainTask(), {"image": images}, optimizer, None, config, step=i).loss
              for i in range(30)]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


def test_mae_rejects_window_attention_and_bad_sizes():
    with pytest.raises(ValueError, match="full-attention"):
        from vitpose_core.mae import MaskedAutoencoder
        MaskedAutoencoder(build_model("vitpose-tiny", img_size=(64, 48), attention="window").backbone)
    mae = build_mae(variant_config("vitpose-tiny", img_size=(64, 48)))
    with pytest.raises(ValueError, match="divisible"):
        mae(torch.randn(1, 3, 72, 48))


def test_encoder_export_initialises_vitpose_at_another_resolution(tmp_path):
    mae = build_mae(variant_config("vitpose-tiny", img_size=(64, 48)))
    save_pretrained_encoder(mae, tmp_path / "enc", metadata={"steps": 3})
    model = build_model("vitpose-tiny", img_size=(128, 96))
    record = load_pretrained_encoder(model, tmp_path / "enc")
    assert record["metadata"] == {"steps": 3}
    assert torch.equal(model.backbone.blocks[2].attn.qkv.weight, mae.backbone.blocks[2].attn.qkv.weight)
    assert model.backbone.pos_embed.shape == (1, 8 * 6 + 1, 192)

    wrong = build_model("vitpose-s", img_size=(64, 48))
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        load_pretrained_encoder(wrong, tmp_path / "enc")
