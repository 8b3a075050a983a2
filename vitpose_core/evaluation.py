"""COCO keypoint evaluation (pycocotools) with ViTPose's top-down rescoring and OKS-NMS.

Top-down evaluation as in the official ViTPose / mmpose `TopDownCocoDataset.evaluate`:

1. every person box (ground truth, or a detector's above a score threshold) gets K keypoints
   (x, y, s) in image pixels;
2. rescoring: instance score = box score x mean of its keypoint scores s > 0.2 (0 if none);
3. OKS-NMS per image at OKS 0.9, with each instance's area = its padded crop area (sw * sh);
4. COCOeval(iouType="keypoints") with the OKS sigmas of the keypoint set.

Annotation files that lack `area` or `iscrowd` (AIC, CrowdPose conversions) get area = box w * h and
iscrowd = 0, so pycocotools can evaluate them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .errors import InvalidInputError, read_json_file
from .keypoints import KeypointSet, keypoint_set_from_coco, resolve_keypoint_set

logger = logging.getLogger(__name__)

STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
KEYPOINT_SCORE_THRESHOLD = 0.2
OKS_NMS_THRESHOLD = 0.9


@dataclass
class PersonPrediction:
    """One top-down prediction: keypoints [K, 3] (x, y, score) in image pixels for one person box."""

    image_id: int
    keypoints: np.ndarray
    box_score: float = 1.0
    area: float = 0.0  # crop area sw * sh, used by OKS-NMS
    category_id: int = 1


def _read_json(source: str | Path | dict | list, what: str) -> dict | list:
    if isinstance(source, dict | list):
        return copy.deepcopy(source)
    return read_json_file(source, what)


def _source_name(source: object, what: str) -> str:
    """How messages name an input: its path, or e.g. 'predictions (in memory)'."""
    return str(source) if isinstance(source, str | Path) else f"{what} (in memory)"


def _finite_numbers(values: object, count: int | None = None) -> np.ndarray | None:
    """`values` as a float64 vector if it is a list of `count` finite real numbers, else None."""
    if not isinstance(values, list | tuple) or (count is not None and len(values) != count):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None
    array = np.asarray(values, dtype=np.float64)
    return array if np.all(np.isfinite(array)) else None


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_ground_truth(annotations: str | Path | dict) -> COCO:
    """A pycocotools COCO index of a keypoint annotation file, with missing `area`/`iscrowd`/`num_keypoints` filled.

    pycocotools silently ignores annotations whose image is not in `images` or whose category is not
    in `categories`, which changes AP without a word; those are errors here, naming the annotation.
    """
    data = _read_json(annotations, "annotations")
    name = _source_name(annotations, "annotations")
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise InvalidInputError(f"annotations {name} must be a COCO dict with 'images', 'annotations' and "
                                "'categories'")
    if not all(isinstance(data[k], list) and all(isinstance(item, dict) for item in data[k])
               for k in ("images", "annotations", "categories")):
        raise InvalidInputError(f"annotations {name}: 'images', 'annotations' and 'categories' must be lists "
                                "of objects")
    image_ids = {image.get("id") for image in data["images"]}
    category_ids = {category.get("id") for category in data["categories"]}
    for ann in data["annotations"]:
        if "bbox" not in ann or "keypoints" not in ann:
            raise InvalidInputError(f"annotations {name}: annotation {ann.get('id')} lacks 'bbox' or 'keypoints'")
        if _finite_numbers(ann["bbox"], 4) is None:
            raise InvalidInputError(f"annotations {name}: annotation {ann.get('id')} has bbox {ann['bbox']!r}, "
                                    "expected 4 finite numbers")
        keypoints = _finite_numbers(ann["keypoints"])
        if keypoints is None or len(keypoints) % 3:
            raise InvalidInputError(f"annotations {name}: annotation {ann.get('id')} has keypoints that are not "
                                    "a list of finite (x, y, v) numbers")
        if ann.get("image_id") not in image_ids:
            raise InvalidInputError(f"annotations {name}: annotation {ann.get('id')} refers to image_id "
                                    f"{ann.get('image_id')!r}, which is not in 'images' (pycocotools would drop it)")
        if ann.get("category_id") not in category_ids:
            raise InvalidInputError(f"annotations {name}: annotation {ann.get('id')} has category_id "
                                    f"{ann.get('category_id')!r}, which is not in 'categories' "
                                    f"{sorted(category_ids, key=str)} (pycocotools would drop it)")
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
        ann.setdefault("num_keypoints", int(np.count_nonzero(np.asarray(ann["keypoints"])[2::3] > 0)))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def infer_keypoint_set(coco: COCO, name: str | KeypointSet | None = None) -> KeypointSet:
    """The keypoint set to evaluate with: `name` if given (a built-in set, or a COCO json / keypoint-set
    YAML path), else the one the file's category describes (a built-in set when the names match one,
    otherwise a custom set with default sigmas and a warning; see `vitpose_core.keypoints`)."""
    if name is not None:
        return resolve_keypoint_set(name)
    return keypoint_set_from_coco(coco.dataset, source="annotations")


def ground_truth_boxes(coco: COCO) -> dict[int, list[tuple[list[float], float]]]:
    """image_id -> [(box xywh, score 1.0)] for annotated persons, boxes clipped to the image (mmpose 1.x)."""
    boxes: dict[int, list[tuple[list[float], float]]] = {image_id: [] for image_id in coco.getImgIds()}
    for ann in coco.dataset["annotations"]:
        if max(ann["keypoints"]) <= 0:
            continue  # nothing to evaluate on this person (official pipeline skips it too)
        info = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        x1, x2 = np.clip([x, x + w], 0, info["width"] - 1)
        y1, y2 = np.clip([y, y + h], 0, info["height"] - 1)
        if x2 > x1 and y2 > y1:
            boxes[ann["image_id"]].append(([float(x1), float(y1), float(x2 - x1), float(y2 - y1)], 1.0))
    return boxes


def load_detections(detections: str | Path | list, score_threshold: float = 0.0, category_id: int = 1,
                    image_ids: Iterable[int] | None = None) -> dict[int, list[tuple[list[float], float]]]:
    """A COCO detection-results file -> image_id -> [(box xywh, score)] above `score_threshold`."""
    records = _read_json(detections, "detections")
    name = _source_name(detections, "detections")
    if not isinstance(records, list):
        raise InvalidInputError(f"detections {name} must be a COCO results list of "
                                "{image_id, category_id, bbox, score}")
    wanted = None if image_ids is None else set(image_ids)
    boxes: dict[int, list[tuple[list[float], float]]] = defaultdict(list)
    unknown_images = empty_boxes = 0
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidInputError(f"detections {name}: record {index} is not an object")
        missing = {"image_id", "bbox", "score"} - record.keys()
        if missing:
            raise InvalidInputError(f"detections {name}: record {index} lacks {sorted(missing)}")
        box = _finite_numbers(record["bbox"], 4)
        if box is None or not _finite_number(record["score"]):
            raise InvalidInputError(f"detections {name}: record {index} (image {record['image_id']!r}) needs a "
                                    f"bbox of 4 finite numbers and a finite score, got {record['bbox']!r}, "
                                    f"{record['score']!r}")
        if record.get("category_id", category_id) != category_id or record["score"] < score_threshold:
            continue  # other classes of a multi-class detector, and low scores: dropped by design
        if wanted is not None and record["image_id"] not in wanted:
            unknown_images += 1
            continue
        x, y, w, h = (float(v) for v in box)
        if w > 0 and h > 0:
            boxes[record["image_id"]].append(([x, y, w, h], float(record["score"])))
        else:
            empty_boxes += 1
    if unknown_images or empty_boxes:
        logger.warning("detections %s: ignored %d boxes of images the annotations do not contain and %d boxes "
                       "with zero width or height", name, unknown_images, empty_boxes)
    return dict(boxes)


def oks_iou(keypoints: np.ndarray, others: np.ndarray, area: float, other_areas: np.ndarray,
            sigmas: np.ndarray) -> np.ndarray:
    """OKS between keypoints [K, 3] and others [M, K, 3] (mmpose `oks_iou`, all keypoints counted)."""
    variances = (2 * sigmas) ** 2
    squared = ((others[..., :2] - keypoints[None, :, :2]) ** 2).sum(-1)  # (M, K)
    scale = (area + other_areas)[:, None] / 2 + np.spacing(1)
    return np.exp(-squared / variances / scale / 2).mean(axis=1)


def oks_nms(keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, sigmas: np.ndarray,
            threshold: float = OKS_NMS_THRESHOLD) -> list[int]:
    """Greedy NMS on keypoints [N, K, 3]: drop instances whose OKS with a better one exceeds `threshold`."""
    order = list(np.argsort(-np.asarray(scores), kind="stable"))
    keep: list[int] = []
    while order:
        best, rest = order[0], np.array(order[1:], dtype=np.int64)
        keep.append(int(best))
        if len(rest) == 0:
            break
        overlap = oks_iou(keypoints[best], keypoints[rest], areas[best], areas[rest], sigmas)
        order = list(rest[overlap <= threshold])
    return keep


def instance_score(keypoint_scores: np.ndarray, box_score: float = 1.0,
                   keypoint_score_threshold: float = KEYPOINT_SCORE_THRESHOLD) -> float:
    """A person's score as mmpose's top-down rescoring computes it: box score x the mean of the keypoint
    scores above `keypoint_score_threshold` (0 when none is)."""
    keypoint_scores = np.asarray(keypoint_scores, np.float64)
    confident = keypoint_scores[keypoint_scores > keypoint_score_threshold]
    return float(box_score) * (float(confident.mean()) if len(confident) else 0.0)


def rescore_and_nms(predictions: Sequence[PersonPrediction], sigmas: np.ndarray,
                    keypoint_score_threshold: float = KEYPOINT_SCORE_THRESHOLD,
                    nms_threshold: float | None = OKS_NMS_THRESHOLD) -> list[dict]:
    """Official top-down post-processing -> COCO results dicts {image_id, category_id, keypoints, score}."""
    by_image: dict[int, list[tuple[PersonPrediction, float]]] = defaultdict(list)
    for prediction in predictions:
        score = instance_score(prediction.keypoints[:, 2], prediction.box_score, keypoint_score_threshold)
        by_image[prediction.image_id].append((prediction, score))
    results = []
    for image_id, items in by_image.items():
        scores = np.array([score for _, score in items])
        keep = range(len(items))
        if nms_threshold is not None:
            keypoints = np.stack([p.keypoints for p, _ in items])
            areas = np.array([p.area for p, _ in items], dtype=np.float64)
            keep = oks_nms(keypoints, scores, areas, sigmas, nms_threshold)
        for index in keep:
            prediction, score = items[index]
            results.append({"image_id": int(image_id), "category_id": prediction.category_id,
                            "keypoints": np.asarray(prediction.keypoints, np.float64).reshape(-1).tolist(),
                            "score": float(score)})
    return results


def evaluate_keypoints(ground_truth: COCO, results: str | Path | list[dict], sigmas: np.ndarray,
                       verbose: bool = False) -> dict[str, float]:
    """COCO keypoint metrics (AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl) of `results`.

    Every record is checked first, because pycocotools accepts what it should not: a NaN keypoint
    makes a NaN OKS that counts as a match (all-NaN predictions score AP 1.0), and records of an
    unknown category or image are dropped silently. Such records are errors naming the record.
    """
    records = _read_json(results, "predictions")
    name = _source_name(results, "predictions")
    if not isinstance(records, list):
        raise InvalidInputError(f"predictions {name} must be a COCO results list of "
                                "{image_id, category_id, keypoints, score}")
    num_keypoints = len(sigmas)
    known_images = set(ground_truth.getImgIds())
    known_categories = set(ground_truth.getCatIds())
    for ann in ground_truth.dataset["annotations"]:
        if len(ann["keypoints"]) != 3 * num_keypoints:
            raise InvalidInputError(f"annotation {ann.get('id')} has {len(ann['keypoints'])} keypoint values, "
                                    f"expected {3 * num_keypoints} ({num_keypoints} keypoints x 3)")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidInputError(f"predictions {name}: record {index} is not an object")
        where = f"predictions {name}: record {index} (image {record.get('image_id')!r})"
        missing = {"image_id", "keypoints", "score"} - record.keys()
        if missing:
            raise InvalidInputError(f"{where} lacks {sorted(missing)}")
        keypoints = record["keypoints"]
        if not isinstance(keypoints, list | tuple) or len(keypoints) != 3 * num_keypoints:
            count = len(keypoints) if isinstance(keypoints, list | tuple) else type(keypoints).__name__
            raise InvalidInputError(f"{where} has {count} keypoint values, expected {3 * num_keypoints} "
                                    f"({num_keypoints} keypoints x 3)")
        if _finite_numbers(keypoints) is None:
            raise InvalidInputError(f"{where}: keypoints must be finite numbers (NaN/Inf found or a non-number)")
        if not _finite_number(record["score"]):
            raise InvalidInputError(f"{where}: score {record['score']!r} is not a finite number")
        if record["image_id"] not in known_images:
            raise InvalidInputError(f"{where}: the annotations do not contain image {record['image_id']!r}")
        record.setdefault("category_id", 1)
        if record["category_id"] not in known_categories:
            raise InvalidInputError(f"{where}: category_id {record['category_id']!r} is not among the annotations' "
                                    f"categories {sorted(known_categories, key=str)}")
    if not records:
        return dict.fromkeys(STAT_NAMES, 0.0)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        detections = ground_truth.loadRes(records)
        coco_eval = COCOeval(ground_truth, detections, "keypoints")
        coco_eval.params.useSegm = None
        coco_eval.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    if verbose:
        print(output.getvalue())
    # pycocotools reports -1 where a bucket is empty (e.g. no medium persons); keep it, it is not 0 AP
    return {name: float(value) for name, value in zip(STAT_NAMES, coco_eval.stats, strict=True)}


def evaluate_prediction_file(annotations: str | Path | dict, predictions: str | Path | list[dict],
                             keypoint_set: str | None = None) -> dict[str, float]:
    """Evaluate a finished COCO keypoint results file (scores used as they are; no rescoring or NMS)."""
    ground_truth = load_ground_truth(annotations)
    return evaluate_keypoints(ground_truth, predictions, infer_keypoint_set(ground_truth, keypoint_set).sigmas_array())
