"""Multi-dataset training (ViTPose+): ratio schedule, padded targets, the mixed-batch task, per-dataset views."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitpose_core.codec import UDPHeatmapCodec
from vitpose_core.engine import EngineConfig, eval_step, evaluate_coco_ap, train_step
from vitpose_core.evaluation import load_ground_truth
from vitpose_core.geometry import (
    box_xywh_to_center_scale,
    invert_affine,
    transform_points,
    udp_warp_matrix,
    warp_image,
)
from vitpose_core.inference import IMAGENET_MEAN, IMAGENET_STD
from vitpose_core.keypoints import AIC, COCO
from vitpose_core.models import build_model
from vitpose_core.multi_dataset import (
    MultiDatasetFinetuneTask,
    dataset_schedule,
    dataset_view,
    pad_keypoint_targets,
)
from vitpose_core.optim import build_adamw
from vitpose_core.synthetic import SyntheticConfig, coco_json, iter_dataset, render_image


def test_schedule_follows_the_ratios_in_every_prefix():
    schedule = dataset_schedule([3, 1, 0])
    picks = [next(schedule) for _ in range(400)]
    assert picks[:8] == [0, 0, 1, 0, 0, 0, 1, 0] or picks[:4].count(0) == 3
    for n in range(1, 400):
        assert abs(picks[:n].count(0) - 0.75 * n) <= 1 and abs(picks[:n].count(1) - 0.25 * n) <= 1
    assert 2 not in picks
    with pytest.raises(ValueError, match="ratios"):
        next(dataset_schedule([0, 0]))


def test_padded_targets_carry_zero_weight():
    target, weight = pad_keypoint_targets(np.ones((14, 4, 3), np.float32), np.ones(14, np.float32), 17)
    assert target.shape == (17, 4, 3) and target[14:].sum() == 0 and weight.tolist() == [1.0] * 14 + [0.0] * 3
    with pytest.raises(ValueError, match="do not fit"):
        pad_keypoint_targets(np.ones((17, 4, 3)), np.ones(17), 14)


INPUT_WH = (96, 128)  # (W, H) crops: an 8x6 token grid, 32x24 heatmaps


def _synthetic_crops(layout: str, dataset_index: int, num_images: int, seed: int, k_max: int = 17):
    """Person crops of synthetic people in ``layout`` -> (samples, COCO ground truth, codec)."""
    config = SyntheticConfig(num_images=num_images, seed=seed, width=160, height=120, max_people=2, layout=layout)
    codec = UDPHeatmapCodec(INPUT_WH)
    samples, images, annotations = [], [], []
    for entry, _, anns in iter_dataset(config):
        image = render_image(entry["id"] - 1, config)[0][..., ::-1]  # BGR -> RGB
        images.append(entry)
        annotations += anns
        for ann in anns:
            if not ann["num_keypoints"] or min(ann["bbox"][2:]) <= 1:
                continue
            keypoints = np.asarray(ann["keypoints"]).reshape(-1, 3)
            center, scale = box_xywh_to_center_scale(np.asarray(ann["bbox"]), INPUT_WH[0] / INPUT_WH[1])
            matrix = udp_warp_matrix(center, scale, 0.0, INPUT_WH)
            crop = (warp_image(image, matrix, INPUT_WH).astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
            target, weight = codec.encode(transform_points(keypoints[:, :2], matrix), keypoints[:, 2])
            target, weight = pad_keypoint_targets(target, weight, k_max)
            samples.append({"image": crop.transpose(2, 0, 1), "target": target, "target_weight": weight,
                            "dataset_index": dataset_index, "input_to_image": invert_affine(matrix),
                            "image_id": entry["id"]})
    return samples, json.loads(coco_json(images, annotations, config)), codec


def _stack(samples):
    return {key: torch.as_tensor(np.stack([s[key] for s in samples])) for key in samples[0]}


def test_multi_dataset_training_trains_both_decoders_and_reports_per_dataset_ap():
    """COCO-layout and AIC-layout synthetic people, mixed 1:1 by dataset_schedule, one backbone with
    a decoder (and MoE expert) each: both datasets' losses fall and each gets its own AP."""
    torch.manual_seed(0)
    train = [_synthetic_crops("coco", 0, 24, seed=1)[0], _synthetic_crops("aic", 1, 24, seed=2)[0]]
    model = build_model("vitpose-tiny", img_size=(INPUT_WH[1], INPUT_WH[0]), depth=3, decoder_channels=64,
                        datasets=[("coco", COCO), ("aic", AIC)], num_experts=2, part_features=48)
    task = MultiDatasetFinetuneTask(("coco", "aic"))
    optimizer = build_adamw(model, lr=2e-3)
    config = EngineConfig(precision="fp32")
    probe = [_stack(train[0][:8]), _stack(train[1][:8])]
    before = [eval_step(model, task, batch, config)[f"heatmap_loss/{name}"] for batch, name in zip(probe, ("coco", "aic"), strict=True)]
    schedule, cursors = dataset_schedule([1, 1]), [0, 0]
    for step in range(25):
        chosen = [next(schedule) for _ in range(8)]
        assert chosen.count(0) == chosen.count(1) == 4  # 1:1 inside every batch
        batch = []
        for dataset in chosen:
            batch.append(train[dataset][cursors[dataset] % len(train[dataset])])
            cursors[dataset] += 1
        result = train_step(model, task, _stack(batch), optimizer, None, config, step)
        assert set(result.metrics) == {"heatmap_loss", "heatmap_loss/coco", "heatmap_loss/aic"}
    after = [eval_step(model, task, batch, config)[f"heatmap_loss/{name}"] for batch, name in zip(probe, ("coco", "aic"), strict=True)]
    assert after[0] < 0.9 * before[0] and after[1] < 0.9 * before[1], (before, after)
    for dataset, (layout, keypoint_set) in enumerate((("coco", COCO), ("aic", AIC))):
        val, document, codec = _synthetic_crops(layout, dataset, 4, seed=10 + dataset)
        view = dataset_view(model, dataset)
        assert view.config.keypoint_set == keypoint_set.name and view.config.num_experts == 0
        stats, results = evaluate_coco_ap(view, [_stack(val)], codec, load_ground_truth(document), keypoint_set,
                                          config)
        assert 0.0 <= stats["AP"] <= 1.0 and len(results[0]["keypoints"]) == 3 * keypoint_set.num_keypoints
