"""`vitpose eval` / `vitpose predict` end to end, and the batchable inference steps with a stand-in model."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pipelines.cli import main
from vitpose_core.codec import UDPHeatmapCodec
from vitpose_core.inference import IMAGENET_MEAN, IMAGENET_STD, decode_to_image, prepare_crops, run_model
from vitpose_core.keypoints import COCO


def _eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from vitpose_core import build_model, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(build_model("vitpose-tiny"), tmp_path_factory.mktemp("ckpt") / "tiny")


def test_eval_predictions_file_scores_published_ap(shared_data, capsys):
    coco = shared_data / "coco"
    metrics = _eval(capsys, "--annotations", coco / "test_coco.json", "--predictions", coco / "example_coco_preds.json")
    assert metrics["AP"] == pytest.approx(0.8609, abs=5e-4)
    assert metrics["AR"] == pytest.approx(0.8750, abs=5e-4)


@pytest.mark.parametrize("name", ["coco/test_coco.json", "aic/test_aic.json", "crowdpose/test_crowdpose.json"])
def test_eval_ground_truth_as_predictions_is_perfect(shared_data, capsys, tmp_path, name):
    data = json.loads((shared_data / name).read_text())
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in data["annotations"] if a["num_keypoints"] > 0]
    (tmp_path / "gt_results.json").write_text(json.dumps(results))
    metrics = _eval(capsys, "--annotations", shared_data / name, "--predictions", tmp_path / "gt_results.json")
    assert metrics["AP"] == pytest.approx(1.0)


def test_eval_user_errors_return_2_with_a_message(shared_data, capsys, tmp_path):
    gt = shared_data / "coco" / "test_coco.json"
    assert main(["eval", "--annotations", str(gt), "--predictions", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["eval", "--annotations", str(gt), "--checkpoint", str(tmp_path / "none")]) == 2
    assert "--images" in capsys.readouterr().err


def test_eval_checkpoint_with_flip_test_on_ground_truth_boxes(shared_data, capsys, tmp_path, tiny_checkpoint):
    coco = shared_data / "coco"
    metrics = _eval(capsys, "--checkpoint", tiny_checkpoint, "--annotations", coco / "test_coco.json",
                    "--images", coco, "--flip-test", "--output", tmp_path / "eval.json")
    assert set(metrics) >= {"AP", "AP50", "AP75", "APm", "APl", "AR"}
    assert 0.0 <= metrics["AP"] <= 1.0  # a random model: the path runs, the value means nothing
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["metrics"] == metrics
    assert 1 <= len(record["results"]) <= 12  # 12 annotated persons, OKS-NMS may merge some
    assert all(len(r["keypoints"]) == 51 and r["score"] >= 0 for r in record["results"])


def test_eval_checkpoint_with_detections(shared_data, capsys, tmp_path, tiny_checkpoint):
    crowdpose_ckpt_mismatch = ["--checkpoint", tiny_checkpoint, "--annotations",
                               shared_data / "crowdpose" / "test_crowdpose.json", "--images", shared_data / "crowdpose"]
    assert main(["eval", *map(str, crowdpose_ckpt_mismatch)]) == 2  # 17-keypoint model vs 14-keypoint set
    assert "keypoints" in capsys.readouterr().err
    coco = shared_data / "coco"
    metrics = _eval(capsys, "--checkpoint", tiny_checkpoint, "--annotations", coco / "test_coco.json",
                    "--images", coco, "--detections", coco / "test_coco_det_AP_H_56.json", "--det-score-thr", "0.9")
    assert 0.0 <= metrics["AP"] <= 1.0


def test_predict_writes_json_and_png(shared_data, tmp_path, tiny_checkpoint, capsys):
    image_path = shared_data / "coco" / "000000197388.jpg"
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(image_path),
            "--boxes", "139.4,102.3,222.4,241.6", "287.2,61.5,74.9,165.6", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    record = json.loads((tmp_path / "000000197388.pose.json").read_text())
    assert record["keypoint_set"] == "coco" and len(record["persons"]) == 2
    for person in record["persons"]:
        keypoints = np.array(person["keypoints"])
        assert keypoints.shape == (17, 3)
        x, y, w, h = person["box"]
        # decoded keypoints lie in the padded, aspect-fixed crop around the box
        assert np.all(np.abs(keypoints[:, 0] - (x + w / 2)) <= 1.25 * max(w, h * 0.75) / 2 + 1)
        assert np.all(np.abs(keypoints[:, 1] - (y + h / 2)) <= 1.25 * max(h, w / 0.75) / 2 + 1)
    drawn = cv2.imread(str(tmp_path / "000000197388.pose.png"))
    original = cv2.imread(str(image_path))
    assert drawn.shape == original.shape and np.abs(drawn.astype(int) - original).sum() > 0
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--image", str(image_path), "--boxes", "1,2,3"]) == 2


class RedChannelHeatmaps(nn.Module):
    """Stand-in model: every keypoint's heatmap is the crop's red channel resampled UDP-style.

    `align_corners=True` maps first/last pixel centres onto each other, which is exactly UDP's
    input->heatmap mapping, so the decoded keypoint must land on the brightest image spot.
    """

    def __init__(self, num_keypoints: int = 17) -> None:
        super().__init__()
        self.num_keypoints = num_keypoints
        self.anchor = nn.Parameter(torch.zeros(()))  # gives run_model a device to read

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        red = crops[:, :1] * float(IMAGENET_STD[0]) / 255 + float(IMAGENET_MEAN[0]) / 255  # (N, 1, h, w) in [0, 1]
        size = (crops.shape[2] // 4, crops.shape[3] // 4)
        return F.interpolate(red, size=size, mode="bilinear", align_corners=True).repeat(1, self.num_keypoints, 1, 1)


@pytest.mark.parametrize("flip_test", [False, True])
def test_inference_steps_find_a_bright_spot_in_image_pixels(flip_test):
    height, width = 300, 400
    spot = np.array([231.3, 142.7])
    ys, xs = np.mgrid[0:height, 0:width]
    blob = np.exp(-((xs - spot[0]) ** 2 + (ys - spot[1]) ** 2) / (2 * 12.0**2))
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.round(255 * blob).astype(np.uint8)
    boxes = np.array([[150.0, 60.0, 160.0, 200.0], [200.0, 100.0, 90.0, 120.0]])
    crops, crop_to_image = prepare_crops(image, boxes, (192, 256))
    assert crops.shape == (2, 3, 256, 192) and crop_to_image.shape == (2, 2, 3)
    heatmaps = run_model(RedChannelHeatmaps(), crops, flip_test, COCO.flip_index)
    assert heatmaps.shape == (2, 17, 64, 48)
    keypoints = decode_to_image(heatmaps, crop_to_image, UDPHeatmapCodec((192, 256)))
    assert keypoints.shape == (2, 17, 3)
    np.testing.assert_allclose(keypoints[..., :2], np.broadcast_to(spot, (2, 17, 2)), atol=1.0)
    assert np.all(keypoints[..., 2] > 0.9)


def test_prepare_crops_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="RGB uint8"):
        prepare_crops(np.zeros((10, 10), np.uint8), np.array([[0, 0, 5, 5]]), (192, 256))
    with pytest.raises(ValueError, match="flip_index"):
        run_model(RedChannelHeatmaps(), torch.zeros(1, 3, 256, 192), flip_test=True)
