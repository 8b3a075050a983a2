"""Pictures a person would rather look at than numbers: a model's poses on val images, and learning curves.

`predictions_on_val` draws what a checkpoint predicts (ground-truth boxes, flip test) on the first val
images of a shard set, side by side; `learning_curves` plots val AP per epoch and the training loss of
MLflow runs. Both write a PNG and return its path; the caller logs it to MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import storage


def _val_source(shards_uri: str) -> dict[str, Any]:
    manifest = json.loads(storage.read_text(storage.join(shards_uri, "manifest.json")))
    sources = [source for source in manifest.get("inputs", []) if source.get("split") == "val"]
    if not sources:
        raise ValueError(f"{shards_uri}/manifest.json names no val input to draw on")
    return sources[0]


def predictions_on_val(checkpoint_dir: str | Path, shards_uri: str, out_png: Path, count: int = 4) -> Path:
    """The checkpoint's poses on the first `count` val images (with people) of the shard set, in one row."""
    import cv2

    from vitpose_core.checkpoint import load_model
    from vitpose_core.evaluation import ground_truth_boxes, load_ground_truth
    from vitpose_core.inference import TopDownPredictor
    from vitpose_core.visualize import draw_poses

    source = _val_source(shards_uri)
    ground_truth = load_ground_truth(json.loads(storage.read_text(source["annotations"])))
    boxes = ground_truth_boxes(ground_truth)
    model = load_model(Path(checkpoint_dir))
    predictor = TopDownPredictor(model, flip_test=True)
    tiles = []
    for image_id in sorted(boxes)[:count]:
        info = ground_truth.imgs[image_id]
        data = np.frombuffer(storage.read_bytes(storage.join(source["images"], info["file_name"])), np.uint8)
        image = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        person_boxes = np.array([box for box, _ in boxes[image_id]], dtype=np.float64)
        keypoints = predictor.predict(image, person_boxes)
        tiles.append(draw_poses(image, keypoints, predictor.keypoint_set, score_threshold=0.2))
    if not tiles:
        raise ValueError(f"no val image with people in {source['annotations']}")
    height = max(tile.shape[0] for tile in tiles)
    row = np.concatenate([np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0))) for t in tiles], axis=1)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_png), cv2.cvtColor(row, cv2.COLOR_RGB2BGR))
    return out_png


def learning_curves(client: Any, runs: dict[str, str], out_png: Path) -> Path:
    """val AP per epoch (left) and training loss per step (right) of each labelled MLflow run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ap_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_id in runs.items():
        ap = client.get_metric_history(run_id, "val_AP")
        if ap:
            ap_axis.plot([m.step for m in ap], [m.value for m in ap], marker="o", label=label)
        loss = client.get_metric_history(run_id, "train_loss")
        if loss:
            loss_axis.plot([m.step for m in loss], [m.value for m in loss], label=label)
    ap_axis.set(title="val AP (synthetic val split, flip test)", xlabel="optimiser step", ylabel="COCO AP")
    loss_axis.set(title="training loss", xlabel="optimiser step", yscale="log")
    for axis in (ap_axis, loss_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png
