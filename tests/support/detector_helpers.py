"""A person detector trained on synthetic images, shared by the detection and serve tests.

Training costs ~2.5 minutes of CPU (far more wall time on a loaded box), so it is done once per pytest
session: the detector directory lives under the session's base temp dir and a later module finds it
there. The tests that need it are marked `slow`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitpose_core.synthetic import SyntheticConfig, render_image

# the default recipe of DetectorTrainConfig (400 images x 12 epochs, ~150 CPU s); 240 x 10 was too
# little: the one box it found in separated_scene() scored 0.51, the other two people below 0.5
TRAIN_IMAGES = 400


def write_synthetic(root: Path, num_images: int, seed: int, split: str) -> tuple[Path, Path]:
    """Synthetic COCO images + annotations under `root`; returns (annotation file, image dir)."""
    from vitpose_core.synthetic import coco_json, iter_dataset

    config = SyntheticConfig(num_images=num_images, seed=seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for entry, jpeg, people in iter_dataset(config):
        (root / "images" / entry["file_name"]).write_bytes(jpeg)
        entries.append(entry)
        annotations.extend(people)
    annotation_file = root / "annotations" / f"person_keypoints_{split}.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_bytes(coco_json(entries, annotations, config))
    return annotation_file, root / "images"


def trained_detector(base: Path) -> Path:
    """The directory of a detector trained on `TRAIN_IMAGES` synthetic images (trained on first use)."""
    import torch

    from vitpose_core.detection import (
        DetectorConfig,
        DetectorTrainConfig,
        build_detector,
        read_person_boxes,
        save_detector,
        train_detector,
    )

    directory = base / "trained-detector"
    if (directory / "detector.json").is_file():
        return directory
    annotations, images = write_synthetic(base / "detector-train", TRAIN_IMAGES, seed=0, split="train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, 1 thread is faster than 2 (OpenMP barriers under load)
    try:
        config = DetectorConfig()
        torch.manual_seed(0)  # the same detector as bench/bench_detector.py trains (same images, seed, threads)
        model = build_detector(config)
        history = train_detector(model, read_person_boxes(annotations, images), DetectorTrainConfig())
    finally:
        torch.set_num_threads(threads)
    save_detector(model, config, directory, metadata={"history": history})
    return directory


def separated_scene(seed: int = 7, people: int = 3, max_iou: float = 0.05) -> tuple[np.ndarray, list[list[float]]]:
    """An RGB synthetic image with exactly `people` persons whose boxes barely overlap, and their boxes.

    Searches image indices of the (seeded, deterministic) generator; a detector that finds people
    should then find each of them once.
    """
    import torch
    from torchvision.ops import box_iou

    config = SyntheticConfig(width=320, height=240, min_people=people, max_people=people, seed=seed,
                             min_person_height=0.55, occluder_prob=0.0)
    for index in range(500):
        image_bgr, annotations = render_image(index, config)
        boxes = [a["bbox"] for a in annotations]
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes])
        iou = box_iou(xyxy, xyxy).fill_diagonal_(0)
        large = all(w >= 30 and h >= 100 for _, _, w, h in boxes)  # no person mostly outside the image
        if iou.max() <= max_iou and large:
            return np.ascontiguousarray(image_bgr[..., ::-1]), boxes
    raise RuntimeError(f"no synthetic image with {people} separated people in seed {seed}")


def briefly_trained_detector(root: Path) -> Path:
    """A detector trained for 8 steps (seconds): useless at finding people, but it answers with real,
    non-degenerate boxes at score threshold 0, which is what the serving plumbing tests need."""
    import torch

    from vitpose_core.detection import (
        DetectorConfig,
        DetectorTrainConfig,
        build_detector,
        read_person_boxes,
        save_detector,
        train_detector,
    )

    annotations, images = write_synthetic(root / "data", 16, seed=0, split="train")
    config = DetectorConfig(score_threshold=0.0)
    torch.manual_seed(0)
    model = build_detector(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see trained_detector: 2 threads on 2 loaded cores took > 5 min for 8 steps
    try:
        train_detector(model, read_person_boxes(annotations, images),
                       DetectorTrainConfig(epochs=2, batch_size=4, lr=2e-3, warmup_steps=2))
    finally:
        torch.set_num_threads(threads)
    return save_detector(model, config, root / "detector")
