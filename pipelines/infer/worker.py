"""The Ray Data actor of `vitpose infer`: one pose model (and detector) per actor, one part per call.

Each call gets one part (a JSON row, see `inputs.Part.task`): the actor reads and decodes its images
(or seeks to its first frame and decodes its frames), finds the person boxes (the given ones, the
detector's, or one whole-image box), and poses them through the project's one inference path
(`vitpose_core.inference.prepare_crops` -> `run_model` -> `decode_to_image`, as `vitpose predict`, eval
and serving do), with the crops of all the part's images batched into forward passes. With `render`,
image inputs are drawn (`vitpose_core.visualize.draw_poses`) and written under `<out>/rendered/`.

An image that cannot be read or decoded becomes an `error` entry (counted as skipped by the driver);
anything else (a model that will not load, non-finite keypoints, storage outages) fails the run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RENDERED_DIR = "rendered"


class PoseWorker:
    """Loads the model (and detector) once; `__call__` poses a batch of parts (Ray Data's `batch_size=1`)."""

    def __init__(self, model: dict[str, Any], detector: dict[str, Any] | None, detector_score_threshold: float | None,
                 device: str, dtype: str, flip_test: bool, torch_threads: int, crops_per_forward: int,
                 render: bool, draw_score_threshold: float, out: str, input_fs: Any, out_fs: Any) -> None:
        import torch

        from pipelines.registry import resolve_model
        from vitpose_core.checkpoint import load_model
        from vitpose_core.inference import TopDownPredictor

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if device == "cuda" else "cpu")
        download_dir = tempfile.mkdtemp(prefix="vitpose-infer-")
        try:
            resolved = resolve_model(model["uri"], model.get("tracking_uri"), dst_dir=download_dir)
            pose_model = load_model(resolved.path).to(self.device)
            self.detector = None
            if detector is not None:
                self.detector = _load_detector(detector, detector_score_threshold, download_dir, self.device)
        finally:
            shutil.rmtree(download_dir, ignore_errors=True)  # the weights are in memory now
        from vitpose_core.inference import resolve_precision

        dtype = resolve_precision(dtype, self.device)  # "auto": bf16 where it is native here, else fp32
        weights_dtype = torch.bfloat16 if dtype == "bf16" else None
        if weights_dtype is not None:
            pose_model = pose_model.to(weights_dtype)  # cast once, as serving does; run_model feeds crops in it
        self.predictor = TopDownPredictor(pose_model, flip_test=flip_test, dtype=weights_dtype,
                                          batch_size=crops_per_forward)
        self.keypoint_set = self.predictor.keypoint_set
        self.model_info = {"variant": pose_model.config.variant, "input_size": list(self.predictor.input_size),
                           "keypoint_set": self.keypoint_set.to_dict(), "dtype": dtype}
        self.render, self.draw_score_threshold = render, draw_score_threshold
        self.out, self.input_fs, self.out_fs = out, input_fs, out_fs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        """{"task": [part JSON, ...]} -> {"key": [...], "result": [part result JSON, ...]}."""
        keys, results = [], []
        for task_json in batch["task"]:
            task = json.loads(str(task_json))
            keys.append(task["key"])
            results.append(json.dumps(self.run_part(task), allow_nan=False))
        return {"key": keys, "result": results}

    def run_part(self, task: dict[str, Any]) -> dict[str, Any]:
        """The results of one part: per image its size and persons, or the error that skipped it."""
        started = time.perf_counter()
        items = task["items"]
        images = _read_video_frames(items) if items and items[0][3] is not None else self._read_images(items)
        entries: list[dict[str, Any]] = []
        decoded: list[tuple[dict[str, Any], np.ndarray]] = []
        for (image_id, file_name, _, _), image in zip(items, images, strict=True):
            entry: dict[str, Any] = {"image_id": image_id, "file_name": file_name}
            if isinstance(image, str):
                entry["error"] = image
            else:
                entry.update(width=int(image.shape[1]), height=int(image.shape[0]))
                decoded.append((entry, image))
            entries.append(entry)
        boxes = self._boxes([image for _, image in decoded], [entry["image_id"] for entry, _ in decoded],
                            task["boxes"])
        keypoints = self._pose([image for _, image in decoded], [found[0] for found in boxes])
        for (entry, image), (image_boxes, scores, outside), people in zip(decoded, boxes, keypoints, strict=True):
            if not np.all(np.isfinite(people)):
                raise ValueError(f"the model produced non-finite keypoints for {entry['file_name']} "
                                 "(NaN or Inf weights?)")
            areas = self.predictor.crop_areas(image_boxes) if len(image_boxes) else []
            entry["persons"] = [{"box": box.tolist(), "box_score": float(score), "area": float(area),
                                 "keypoints": person.tolist()}
                                for box, score, area, person in zip(image_boxes, scores, areas, people, strict=True)]
            entry["boxes_outside"] = outside
            if self.render and items[0][3] is None:
                self._render(entry["file_name"], image, people, image_boxes)
        return {"key": task["key"], "index": task["index"], "images": entries, "model": self.model_info,
                "rendered": self.render and items[0][3] is None, "seconds": time.perf_counter() - started}

    # ---- reading -----------------------------------------------------------------------------------

    def _read_images(self, items: list[list[Any]]) -> list[np.ndarray | str]:
        """Decoded RGB images, or for an unreadable one the reason (a missing file is an error too)."""
        from pipelines import storage
        from vitpose_core.errors import InvalidInputError
        from vitpose_core.image_io import decode_image_rgb

        images: list[np.ndarray | str] = []
        for _, _, uri, _ in items:
            try:
                data = storage.read_bytes(uri, self.input_fs if storage.is_s3(uri) else None)
                images.append(decode_image_rgb(data, uri))
            except (InvalidInputError, FileNotFoundError) as error:
                images.append(str(error))
        return images

    # ---- people and poses --------------------------------------------------------------------------

    def _boxes(self, images: list[np.ndarray], image_ids: list[int], given: dict[str, list] | None
               ) -> list[tuple[np.ndarray, list[float], int]]:
        """Per image: boxes [P, 4] (x, y, w, h) overlapping it, their scores, and how many given boxes lay
        wholly outside it (dropped and counted, as eval does)."""
        from vitpose_core.image_io import boxes_overlapping_image
        from vitpose_core.inference import whole_image_box

        if given is not None:
            found = []
            for image, image_id in zip(images, image_ids, strict=True):
                pairs = given.get(str(image_id), [])
                boxes = np.array([box for box, _ in pairs], np.float64).reshape(-1, 4)
                scores = np.array([score for _, score in pairs], np.float64)
                inside = boxes_overlapping_image(boxes, image.shape[1], image.shape[0])
                found.append((boxes[inside], scores[inside].tolist(), int((~inside).sum())))
            return found
        if self.detector is not None:
            detections = self.detector.detect_batch(images) if images else []
            return [(d[:, :4].reshape(-1, 4), d[:, 4].tolist(), 0) for d in detections]
        return [(whole_image_box(image), [1.0], 0) for image in images]

    def _pose(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """Keypoints [P, K, 3] per image: every crop of the part cut once, batched `crops_per_forward` at a
        time through `run_model`, and each image's heatmaps decoded to its pixels by `decode_to_image`."""
        import torch

        from vitpose_core.inference import decode_to_image, prepare_crops, run_model

        predictor = self.predictor
        crops, affines, counts = [], [], []
        for image, image_boxes in zip(images, boxes, strict=True):
            image_crops, crop_to_image = prepare_crops(image, image_boxes, predictor.input_size, predictor.padding)
            crops.append(image_crops)
            affines.append(crop_to_image)
            counts.append(len(image_boxes))
        if not sum(counts):
            return [np.zeros((0, self.keypoint_set.num_keypoints, 3)) for _ in images]
        all_crops = torch.cat(crops)  # (sum P, 3, h, w)
        heatmaps = torch.cat([run_model(predictor.model, all_crops[start:start + predictor.batch_size],
                                        predictor.flip_test, self.keypoint_set.flip_index, predictor.dtype)
                              for start in range(0, len(all_crops), predictor.batch_size)])
        keypoints, start = [], 0
        for count, crop_to_image in zip(counts, affines, strict=True):
            if count == 0:
                keypoints.append(np.zeros((0, self.keypoint_set.num_keypoints, 3)))
            else:
                keypoints.append(decode_to_image(heatmaps[start:start + count], crop_to_image, predictor.codec))
            start += count
        return keypoints

    def _render(self, file_name: str, image: np.ndarray, keypoints: np.ndarray, boxes: np.ndarray) -> None:
        import posixpath

        import cv2

        from pipelines import storage
        from vitpose_core.visualize import draw_poses

        drawn = draw_poses(image, keypoints, self.keypoint_set, self.draw_score_threshold, boxes_xywh=boxes)
        suffix = posixpath.splitext(file_name)[1].lower() or ".jpg"
        ok, encoded = cv2.imencode(".png" if suffix == ".png" else ".jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"OpenCV could not encode the drawing of {file_name}")
        uri = storage.join(self.out, RENDERED_DIR, file_name)
        storage.write_bytes(uri, encoded.tobytes(), self.out_fs if storage.is_s3(uri) else None)


def _load_detector(detector: dict[str, Any], score_threshold: float | None, download_dir: str, device: Any) -> Any:
    """The person detector of `detector["uri"]`: a `save_detector` folder (local on every node), an s3://
    copy of one, or a registered one (`models:/<name>/<version>`), fetched as the serving detector fetches it."""
    from pathlib import Path

    from vitpose_core.detection import DETECTOR_CONFIG_NAME, load_detector

    path = detector["uri"]
    if str(path).startswith(("models:/", "runs:/", "s3://")):
        from pipelines.registry import resolve_directory

        path = str(resolve_directory(path, DETECTOR_CONFIG_NAME, detector.get("tracking_uri"),
                                     Path(download_dir) / "detector"))
    overrides = {} if score_threshold is None else {"score_threshold": score_threshold}
    loaded = load_detector(path, **overrides)
    loaded.model.to(device)
    return loaded


def _read_video_frames(items: list[list[Any]]) -> list[np.ndarray | str]:
    """The frames of a part (ascending indices of one video), decoded from the first one on.

    The capture seeks to the part's first frame; when the backend cannot land there exactly, it reads
    from the start instead, so a frame's pixels never depend on how the video was cut into parts.
    """
    import cv2

    uri = items[0][2]
    wanted = [int(item[3]) for item in items]
    capture = cv2.VideoCapture(uri)
    try:
        if not capture.isOpened():
            return [f"cannot open video {uri}"] * len(items)
        position = 0
        if wanted[0] > 0 and capture.set(cv2.CAP_PROP_POS_FRAMES, wanted[0]) \
                and int(capture.get(cv2.CAP_PROP_POS_FRAMES)) == wanted[0]:
            position = wanted[0]
        elif wanted[0] > 0:
            capture.release()
            capture = cv2.VideoCapture(uri)
        frames: dict[int, np.ndarray] = {}
        last = wanted[-1]
        targets = set(wanted)
        while position <= last:
            if position in targets:
                ok, frame = capture.read()
                if not ok:
                    break
                frames[position] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            elif not capture.grab():
                break
            position += 1
    finally:
        capture.release()
    return [frames.get(index, f"frame {index} of {uri} could not be decoded") for index in wanted]
