"""A small torchvision person detector, trained on the pipeline's own images, for top-down pose.

ViTPose is top-down: it estimates the pose inside a person box. Without a detector a multi-person
image is one whole-image box. This module builds a torchvision detection model with *random*
weights (`weights=None, weights_backbone=None`: nothing downloads), trains it on COCO-format
images whose person boxes are known (the synthetic people of `vitpose_core.synthetic`), saves it
in the project's style (`detector.safetensors` + `detector.json`) and detects people:

    samples = read_person_boxes("train/annotations/person_keypoints_train.json", "train/images")
    model = build_detector(DetectorConfig())
    history = train_detector(model, samples, DetectorTrainConfig())  # 600 steps, ~150 CPU s
    save_detector(model, DetectorConfig(), "runs/detector")
    detector = load_detector("runs/detector")
    boxes = detector.detect(image_rgb)             # [N, 5] (x, y, w, h, score), image pixels

Boxes are COCO's [x, y, w, h] with (x, y) the top-left corner, clipped to the image, highest score
first. `detect_dataset` writes a COCO detection-results list that `evaluation.load_detections`
reads, and `evaluate_boxes` gives its COCO bbox AP.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

DETECTOR_WEIGHTS_NAME = "detector.safetensors"
DETECTOR_CONFIG_NAME = "detector.json"
DETECTOR_FORMAT_VERSION = 1
FCOS_CHANNELS = 64  # FPN and head width of the small FCOS
MAX_ASPECT = 8.0  # images more elongated than this are padded before detection (see pad_to_aspect)
PERSON_LABEL = 1  # torchvision detectors reserve label 0 for the background

Architecture = Literal["fcos_mobilenet_v3_small_fpn", "ssdlite320_mobilenet_v3_large",
                       "fasterrcnn_mobilenet_v3_large_320_fpn"]


class DetectorConfig(BaseModel):
    """What rebuilds a detector: the torchvision architecture and its post-processing.

    `score_threshold` filters what `detect` returns (serving); evaluation passes its own, lower one
    (the pose AP rescoring weighs every box by its score, as ViTPose's detected-box evaluation does).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture = "fcos_mobilenet_v3_small_fpn"
    # the detector resizes the shorter image side to min_size, capping the longer at max_size. Half of
    # the synthetic 320x240: its people are 45-95% of the image height, and 4x fewer pixels than full
    # size let the detector learn them in ~2.5 CPU minutes (bench/results/detector.md)
    min_size: int = Field(120, ge=32, le=2048)
    max_size: int = Field(160, ge=32, le=4096)
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    max_detections: int = Field(32, ge=1, le=1000)
    min_box_side: float = Field(2.0, ge=0.0)  # pixels; thinner boxes are dropped (no pose in a sliver)


class DetectorTrainConfig(BaseModel):
    """Training of `train_detector`: AdamW with linear warm-up and cosine decay, stopped by steps or time.

    The defaults are the measured recipe: 400 synthetic images x 12 epochs = 600 steps, ~150 CPU s
    for the default FCOS (bench/results/detector.md).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(12, ge=1)
    max_seconds: float | None = Field(None, gt=0)  # stop early after this much training time
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(10.0, gt=0)
    seed: int = 0


@dataclass
class DetectionSample:
    """One training image: its file and its person boxes [N, 4] (x1, y1, x2, y2) in pixels."""

    image_id: int
    path: Path
    boxes_xyxy: np.ndarray


def build_detector(config: DetectorConfig) -> nn.Module:
    """The torchvision detector `config.architecture`, person + background classes, random weights.

    `weights=None, weights_backbone=None`: nothing is downloaded, so this runs without internet and
    every weight comes from our own training (or a saved detector).
    """
    from torchvision.models import detection

    if config.architecture == "ssdlite320_mobilenet_v3_large":
        model = detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=2, detections_per_img=config.max_detections,
            nms_thresh=config.nms_iou, score_thresh=0.001)
        # SSD resizes every image to one fixed square; its default boxes are relative, so any size works
        side = config.max_size
        model.transform.min_size, model.transform.max_size, model.transform.fixed_size = (side,), side, (side, side)
        return model
    if config.architecture == "fasterrcnn_mobilenet_v3_large_320_fpn":
        return detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, num_classes=2, min_size=config.min_size, max_size=config.max_size,
            box_nms_thresh=config.nms_iou, box_score_thresh=0.001, box_detections_per_img=config.max_detections)
    return _fcos_mobilenet_v3_small_fpn(config)


def _fcos_mobilenet_v3_small_fpn(config: DetectorConfig) -> nn.Module:
    """FCOS (anchor-free, one box per feature location) on a MobileNetV3-Small FPN with 64 channels.

    torchvision ships FCOS only on ResNet-50 (32M parameters); trained from random weights on two
    CPUs, this small one learns the synthetic people in minutes (bench/results/detector.md).
    Strides 8 to 64 cover people from a few pixels to the whole image.
    """
    from torchvision.models import mobilenet_v3_small
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOSHead

    features = mobilenet_v3_small(weights=None).features
    # outputs of blocks 3, 8, 11: the last block at stride 8, 16 and 32 (24, 48, 96 channels)
    backbone = BackboneWithFPN(features, return_layers={"3": "p3", "8": "p4", "11": "p5"},
                               in_channels_list=[24, 48, 96], out_channels=FCOS_CHANNELS)
    # the FPN adds a max-pooled stride-64 level. FCOS reads each level's box-size range from these
    # sizes: level i regresses boxes whose longest distance to an edge is 4 * size_i .. 8 * size_i
    anchor_generator = AnchorGenerator(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((1.0,),) * 4)
    head = FCOSHead(FCOS_CHANNELS, num_anchors=1, num_classes=2, num_convs=2)
    return FCOS(backbone, num_classes=2, min_size=config.min_size, max_size=config.max_size,
                anchor_generator=anchor_generator, head=head, score_thresh=0.001, nms_thresh=config.nms_iou,
                detections_per_img=config.max_detections, topk_candidates=200)


# ---------------------------------------------------------------------------------------------- data


def read_person_boxes(annotations: str | Path | dict, images_dir: str | Path, category_id: int = 1,
                      min_box_side: float = 1.0) -> list[DetectionSample]:
    """Training samples from a COCO annotation file: every image with its non-crowd person boxes.

    Images without a person stay in (as negatives). A box thinner than `min_box_side` pixels (a
    person almost entirely outside the image) is left out.
    """
    if isinstance(annotations, dict):
        document, source = annotations, "annotations"
    else:
        path = Path(annotations)
        if not path.is_file():
            raise FileNotFoundError(f"annotation file not found: {path}")
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"annotation file {path} is not valid JSON: {error}") from None
        source = str(path)
    if not isinstance(document, dict) or not {"images", "annotations"} <= document.keys():
        raise ValueError(f"{source} is not a COCO document with 'images' and 'annotations'")
    images_dir = Path(images_dir)
    boxes: dict[int, list[list[float]]] = {int(image["id"]): [] for image in document["images"]}
    for ann in document["annotations"]:
        if ann.get("category_id", category_id) != category_id or ann.get("iscrowd", 0):
            continue
        if ann.get("image_id") not in boxes or len(ann.get("bbox", ())) != 4:
            raise ValueError(f"{source}: annotation {ann.get('id')} has no valid image_id/bbox")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w >= min_box_side and h >= min_box_side:
            boxes[int(ann["image_id"])].append([x, y, x + w, y + h])
    samples = []
    for image in document["images"]:
        image_boxes = np.asarray(boxes[int(image["id"])], np.float32).reshape(-1, 4)
        samples.append(DetectionSample(int(image["id"]), images_dir / image["file_name"], image_boxes))
    return samples


def read_image_rgb(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file; a FileNotFoundError naming it when unreadable, an
    ImageTooLargeError naming it, before decoding, when its header claims more than a dataset image's limit."""
    import cv2

    from .image_io import DATASET_MAX_IMAGE_PIXELS, ImageTooLargeError, image_size_from_header

    try:
        image_size_from_header(path, DATASET_MAX_IMAGE_PIXELS)
    except ImageTooLargeError:
        raise
    except (ValueError, OSError):  # not readable by PIL: cv2 below decides, as it always has
        pass
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_tensor(image_rgb_uint8: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> float [3, H, W] in [0, 1], what torchvision detectors take."""
    image = np.asarray(image_rgb_uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an RGB uint8 array [H, W, 3], got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)  # (H, W, 3) -> (3, H, W)


def pad_to_aspect(image: torch.Tensor, max_aspect: float = MAX_ASPECT) -> torch.Tensor:
    """Zero-pad [3, H, W] at the bottom or right so that neither side is over `max_aspect` x the other.

    The detectors resize the longer side to `max_size`: a 4096x1 image would shrink to a zero-pixel
    side and fail. Padding after the image keeps every box in the original pixel coordinates.
    """
    height, width = image.shape[-2:]
    min_side = math.ceil(max(height, width) / max_aspect)
    pad_bottom, pad_right = max(0, min_side - height), max(0, min_side - width)
    if pad_bottom or pad_right:
        image = torch.nn.functional.pad(image, (0, pad_right, 0, pad_bottom))  # (left, right, top, bottom)
    return image


# ------------------------------------------------------------------------------------------ training


def _lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_detector(model: nn.Module, samples: Sequence[DetectionSample], config: DetectorTrainConfig,
                   log: Callable[[dict[str, Any]], None] | None = None, log_every: int = 10) -> list[dict[str, Any]]:
    """Train `model` on `samples` (images decoded once, kept as uint8); returns the logged points.

    Each point: `step`, `epoch`, `seconds` (training wall time so far), `cpu_seconds` (this process's
    CPU time: the figure that stays comparable on a shared machine), `loss` (sum of the detector's
    losses, averaged over the last `log_every` steps) and `lr`. Stops after `config.epochs` or
    `config.max_seconds`, whichever comes first; the cosine schedule spans the epochs.
    """
    if not samples:
        raise ValueError("train_detector needs at least one sample")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    images = [torch.from_numpy(read_image_rgb(sample.path)).permute(2, 0, 1).contiguous() for sample in samples]
    targets = [torch.from_numpy(sample.boxes_xyxy) for sample in samples]
    steps_per_epoch = math.ceil(len(samples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, total_steps, config.warmup_steps))
    device = next(model.parameters()).device  # a model moved to a GPU trains there; images stay uint8 on the CPU
    model.train()
    history: list[dict[str, Any]] = []
    recent: list[float] = []
    seconds, cpu_seconds, step = 0.0, 0.0, 0
    for epoch in range(config.epochs):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            began, began_cpu = time.perf_counter(), time.process_time()
            batch_images, batch_targets = [], []
            for index in order[start:start + config.batch_size]:
                image, boxes = images[index].float().div(255), targets[index].clone()
                if torch.rand((), generator=generator) < config.hflip_prob:
                    width = image.shape[-1]
                    image = image.flip(-1)
                    boxes[:, [0, 2]] = width - boxes[:, [2, 0]]  # x1' = W - x2, x2' = W - x1
                batch_images.append(image.to(device))
                batch_targets.append({"boxes": boxes.to(device),
                                      "labels": torch.full((len(boxes),), PERSON_LABEL, device=device)})
            losses = model(batch_images, batch_targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detector loss is {loss.item()} at step {step}: "
                                         f"{ {k: round(v.item(), 4) for k, v in losses.items()} }")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            seconds += time.perf_counter() - began
            cpu_seconds += time.process_time() - began_cpu
            recent.append(loss.item())
            out_of_time = config.max_seconds is not None and seconds >= config.max_seconds
            if step % log_every == 0 or step == total_steps or out_of_time:  # the last step is always logged
                point = {"step": step, "epoch": epoch, "seconds": round(seconds, 1),
                         "cpu_seconds": round(cpu_seconds, 1),
                         "loss": round(float(np.mean(recent)), 4), "lr": optimizer.param_groups[0]["lr"]}
                recent = []
                history.append(point)
                if log is not None:
                    log(point)
            if out_of_time:
                model.eval()
                return history
    model.eval()
    return history


# ------------------------------------------------------------------------------- initial weights


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a torchvision `.pth` (loaded with `weights_only=True`) or a `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a training checkpoint {model: ...}
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


def load_matching_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy the tensors of `state` whose name and shape match `model`'s; returns the names loaded.

    Two kinds of torchvision weights fit: a COCO detector of the same architecture (e.g.
    `fasterrcnn_mobilenet_v3_large_320_fpn`), whose 91-class heads do not match the person + background
    heads and keep their random init, and ImageNet MobileNetV3 weights (`features.*`), which land in the
    detector's backbone (`backbone.body.*`). A file that matches nothing is an error, not a silent
    random init.
    """
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for name in (key, "backbone.body." + key.removeprefix("features.") if key.startswith("features.") else None):
            if name in own and own[name].shape == value.shape:
                loaded[name] = value
                break
    if not loaded:
        raise ValueError(f"none of the {len(state)} tensors of the weights fit the detector "
                         f"({type(model).__name__}); pass weights of the same architecture or its backbone")
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded)


# ------------------------------------------------------------------------------------- save / load


def save_detector(model: nn.Module, config: DetectorConfig, directory: str | Path,
                  metadata: dict[str, Any] | None = None) -> Path:
    """Write `detector.safetensors` (weights) and `detector.json` (config + metadata) into `directory`."""
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(state, str(out_dir / DETECTOR_WEIGHTS_NAME), metadata={"format_version": str(DETECTOR_FORMAT_VERSION)})
    record = {"format_version": DETECTOR_FORMAT_VERSION, "detector": config.model_dump(mode="json"),
              "metadata": metadata or {}}
    (out_dir / DETECTOR_CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
    return out_dir


def read_detector_config(directory: str | Path) -> tuple[DetectorConfig, dict[str, Any]]:
    """The `DetectorConfig` and metadata saved in a detector directory."""
    path = Path(directory) / DETECTOR_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no detector at {directory}: {DETECTOR_CONFIG_NAME} not found")
    try:
        record = json.loads(path.read_text())
        return DetectorConfig.model_validate(record["detector"]), record.get("metadata", {})
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a detector config: {error!r}") from None


def load_detector(directory: str | Path, **overrides: Any) -> PersonDetector:
    """A `PersonDetector` from a directory written by `save_detector`.

    `overrides` change post-processing fields of the saved config (e.g. `score_threshold=0.3`).
    """
    config, _ = read_detector_config(directory)
    if overrides:
        config = DetectorConfig.model_validate({**config.model_dump(), **overrides})
    weights = Path(directory) / DETECTOR_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no detector weights at {weights}")
    model = build_detector(config)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit {config.architecture}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return PersonDetector(model, config)


# ------------------------------------------------------------------------------------------ detect


class PersonDetector:
    """A trained detector and its post-processing: images in, person boxes (x, y, w, h, score) out."""

    def __init__(self, model: nn.Module, config: DetectorConfig) -> None:
        self.model = model.eval()
        self.config = config

    @torch.inference_mode()
    def detect_batch(self, images: Sequence[np.ndarray], score_threshold: float | None = None) -> list[np.ndarray]:
        """One float64 [N, 5] (x, y, w, h, score) array per RGB uint8 image, highest score first.

        Boxes are clipped to the image and those thinner than `config.min_box_side` dropped, so every
        box is a valid crop for the pose model.
        """
        threshold = self.config.score_threshold if score_threshold is None else score_threshold
        if not images:
            return []
        device = next(self.model.parameters()).device
        outputs = self.model([pad_to_aspect(to_tensor(image)).to(device) for image in images])
        results = []
        for image, output in zip(images, outputs, strict=True):
            height, width = image.shape[:2]
            keep = (output["labels"] == PERSON_LABEL) & (output["scores"] >= threshold)
            boxes = output["boxes"][keep].float().cpu().numpy().astype(np.float64)
            scores = output["scores"][keep].float().cpu().numpy().astype(np.float64)
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2], scores[:, None]], axis=1)
            xywh = xywh[(xywh[:, 2] >= self.config.min_box_side) & (xywh[:, 3] >= self.config.min_box_side)]
            results.append(xywh[np.argsort(-xywh[:, 4], kind="stable")].reshape(-1, 5))
        return results

    def detect(self, image: np.ndarray, score_threshold: float | None = None) -> np.ndarray:
        """Person boxes [N, 5] (x, y, w, h, score) of one RGB uint8 image [H, W, 3]."""
        return self.detect_batch([image], score_threshold)[0]


def detect_dataset(detector: PersonDetector, image_paths: dict[int, str | Path], score_threshold: float = 0.05,
                   batch_size: int = 8) -> tuple[list[dict[str, Any]], float]:
    """COCO detection results {image_id, category_id, bbox, score} for every image, and seconds per image.

    The results feed `evaluation.load_detections` (pose AP with detected boxes) and `evaluate_boxes`.
    The time counts the detector only (not reading the files).
    """
    results: list[dict[str, Any]] = []
    seconds = 0.0
    items = list(image_paths.items())
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = [read_image_rgb(path) for _, path in chunk]
        began = time.perf_counter()
        boxes = detector.detect_batch(images, score_threshold)
        seconds += time.perf_counter() - began
        for (image_id, _), image_boxes in zip(chunk, boxes, strict=True):
            results.extend({"image_id": int(image_id), "category_id": 1,
                            "bbox": [round(float(v), 2) for v in box[:4]], "score": round(float(box[4]), 5)}
                           for box in image_boxes)
    return results, seconds / max(1, len(items))


def evaluate_boxes(ground_truth: Any, results: list[dict[str, Any]]) -> dict[str, float]:
    """COCO bbox metrics (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) of detections.

    `ground_truth` is a pycocotools COCO (e.g. `evaluation.load_ground_truth`).
    """
    from pycocotools.cocoeval import COCOeval

    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    if not results:
        return dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco_eval = COCOeval(ground_truth, ground_truth.loadRes(list(results)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(value) for name, value in zip(names, coco_eval.stats, strict=True)}
