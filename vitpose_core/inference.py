"""Top-down inference in three batchable steps: crop, run the model, decode to image pixels.

The steps are separate so a server can `prepare_crops` per request, concatenate crops from many
requests into one `run_model` call, and `decode_to_image` each request's slice:

    crops, crop_to_image = prepare_crops(image, boxes, input_size)  # [P, 3, h, w], [P, 2, 3]
    heatmaps = run_model(model, crops, flip_test=True, flip_index=keypoint_set.flip_index)
    keypoints = decode_to_image(heatmaps, crop_to_image, codec)  # [P, K, 3] (x, y, score)

`input_size` is (w, h) here, as in every config, the codec and the model config's `input_size`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .codec import UDPHeatmapCodec, flip_heatmaps
from .geometry import (
    DEFAULT_PADDING,
    box_xywh_to_center_scale,
    invert_affine,
    transform_points,
    udp_warp_matrix,
    warp_image,
)
from .keypoints import KeypointSet

logger = logging.getLogger(__name__)

# ImageNet statistics on RGB in [0, 255], the normalisation every ViTPose checkpoint was trained with
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255


def normalize_images(images: np.ndarray, channel_order: str = "rgb") -> np.ndarray:
    """uint8 images [N, H, W, 3] -> ImageNet-normalised RGB float32 [N, 3, H, W], contiguous.

    ``channel_order`` is the input's ("bgr" for cv2-decoded crops). One pass per channel from the uint8
    batch into the channel-first output: normalising each image in HWC float and stacking the transposed
    views cost ~8x as much (1.58 vs 0.20 CPU ms per 256x192 crop), a third of the training transform.
    """
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
    if channel_order not in ("rgb", "bgr"):
        raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
    count, height, width, _ = images.shape
    out = np.empty((count, 3, height, width), np.float32)
    for rgb_channel in range(3):
        source = images[..., rgb_channel if channel_order == "rgb" else 2 - rgb_channel]
        np.subtract(source, IMAGENET_MEAN[rgb_channel], out=out[:, rgb_channel], dtype=np.float32)
        out[:, rgb_channel] *= np.float32(1.0 / IMAGENET_STD[rgb_channel])
    return out


def whole_image_box(image: np.ndarray) -> np.ndarray:
    """The box [1, 4] (x, y, w, h) covering the whole image: the default person box."""
    return np.array([[0.0, 0.0, float(image.shape[1]), float(image.shape[0])]])


def prepare_crops(image_rgb_uint8: np.ndarray, boxes_xywh: np.ndarray, input_size: Sequence[int],
                  padding: float = DEFAULT_PADDING) -> tuple[torch.Tensor, np.ndarray]:
    """Cut and normalise one crop per box.

    Args:
        image_rgb_uint8: [H, W, 3] uint8 RGB image.
        boxes_xywh: [P, 4] person boxes (x, y, w, h) in image pixels.
        input_size: (w, h) of the model input.
        padding: box enlargement for context (1.25 as in ViTPose).

    Returns:
        crops: float32 tensor [P, 3, h, w], ImageNet-normalised RGB.
        crop_to_image: float64 [P, 2, 3] affines from crop pixels back to image pixels.
    """
    image = np.asarray(image_rgb_uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an RGB uint8 array [H, W, 3], got {image.dtype} {image.shape}")
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4) if len(boxes_xywh) else np.zeros((0, 4))
    width, height = int(input_size[0]), int(input_size[1])
    if len(boxes) == 0:
        return torch.zeros(0, 3, height, width), np.zeros((0, 2, 3))
    centers, scales = box_xywh_to_center_scale(boxes, width / height, padding)
    crops = np.empty((len(boxes), height, width, 3), dtype=np.uint8)
    crop_to_image = np.empty((len(boxes), 2, 3))
    for i, (center, scale) in enumerate(zip(centers, scales, strict=True)):
        image_to_crop = udp_warp_matrix(center, scale, 0.0, (width, height))
        crops[i] = warp_image(image, image_to_crop, (width, height))
        crop_to_image[i] = invert_affine(image_to_crop)
    return torch.from_numpy(normalize_images(crops)), crop_to_image


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16), so bf16 beats fp32.

    Measured on an AMD EPYC with AVX512-BF16 (no AMX): bf16 weights run vitpose-tiny 2.5x and ViTPose-B
    2.7x faster than fp32 at batch 16 on one thread. On an AVX2-only EPYC (Zen 3) bf16 is emulated: a
    vitpose-tiny training step under bf16 autocast took 22x as long as in fp32 (16.3 s vs 0.74 s, batch 32).
    On an Intel Xeon with AMX the same step (96x128, 2 threads) took 0.185 s in bf16 vs 0.268 s in fp32.
    """
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return True
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """"auto" -> "bf16" where bf16 is native (a CUDA GPU that supports it, or a CPU with AMX/AVX512-BF16),
    else "fp32"; "bf16" and "fp32" are kept as asked. The one rule for training, eval, inference and serving."""
    if precision != "auto":
        return precision
    device_type = torch.device(device).type
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device_type == "cpu" and cpu_has_native_bf16() else "fp32"


def optimize_for_inference(model: nn.Module, dtype: torch.dtype | None = torch.bfloat16,
                           compile: bool = True) -> nn.Module:
    """The fastest way found to run a model for inference: weights cast once, then compiled.

    Casting the weights once (rather than autocast, which re-casts every weight on every call) and
    compiling with inductor's *freezing* (weights become constants, so oneDNN linears use prepacked
    weights and bias/GELU/LayerNorm/residual adds fuse into neighbouring kernels) is what makes our
    ViTPose-B faster than transformers' best setting (bench/results/model_throughput.md).
    `dynamic=True` compiles once for any batch size (a serving batch varies from 1 to max): the
    first call takes ~1 minute for ViTPose-B on 2 cores, later batch sizes reuse the kernels.
    Freezing applies only with autograd off, which `run_model` guarantees.
    """
    model = model.eval()
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    if compile:
        model = torch.compile(model, dynamic=True, options={"freezing": True})
    return model


@torch.inference_mode()
def run_model(model: nn.Module, crops: torch.Tensor, flip_test: bool = False,
              flip_index: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Heatmaps [P, K, h/4, w/4] (float32, on the CPU) of crops [P, 3, h, w].

    With `flip_test`, the mirrored crops run in the same forward pass (batch 2P) and their heatmaps,
    mirrored back with left/right channels swapped, are averaged in. `dtype` (bf16/fp16): if the
    model's weights are already in that dtype (cast once, the fast path for serving) the crops are
    cast to it; otherwise the model runs under autocast on its device.
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be [P, 3, h, w], got {tuple(crops.shape)}")
    if flip_test and flip_index is None:
        raise ValueError("flip_test needs the keypoint set's flip_index")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    weight_dtype = parameter.dtype if parameter is not None else torch.float32
    count = crops.shape[0]
    batch = torch.cat([crops, crops.flip(-1)]) if flip_test else crops
    batch = batch.to(device)
    if weight_dtype != torch.float32:
        heatmaps = model(batch.to(weight_dtype))
    elif dtype is not None and dtype != torch.float32:
        with torch.autocast(device_type=device.type, dtype=dtype):
            heatmaps = model(batch)
    else:
        heatmaps = model(batch)
    heatmaps = heatmaps.float().cpu()
    if flip_test:
        heatmaps = (heatmaps[:count] + flip_heatmaps(heatmaps[count:], flip_index)) / 2
    return heatmaps


def decode_to_image(heatmaps: torch.Tensor | np.ndarray, crop_to_image: np.ndarray,
                    codec: UDPHeatmapCodec) -> np.ndarray:
    """Heatmaps [P, K, H, W] + crop->image affines [P, 2, 3] -> keypoints [P, K, 3] (x, y, score) in image pixels."""
    crop_to_image = np.asarray(crop_to_image, dtype=np.float64)
    if len(heatmaps) != len(crop_to_image):
        raise ValueError(f"{len(heatmaps)} heatmaps but {len(crop_to_image)} crop_to_image affines")
    if len(heatmaps) == 0:
        return np.zeros((0, 0, 3))
    keypoints, scores = codec.decode(heatmaps)
    keypoints = transform_points(keypoints, crop_to_image)
    return np.concatenate([keypoints, scores[..., None].astype(np.float64)], axis=-1)


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(w, h) of a ViTPose model's input (its `config.input_size`)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "input_size"):
        raise ValueError("model has no config.input_size; pass input_size explicitly")
    width, height = config.input_size
    return int(width), int(height)


class TopDownPredictor:
    """Keypoints for person boxes in one image, with a model that returns heatmaps.

    Args:
        model: returns heatmaps [N, K, h/4, w/4] for normalised crops [N, 3, h, w].
        keypoint_set: defaults to the model's `config.keypoint_set`.
        input_size: (w, h); defaults to the model's `config.input_size`.
        flip_test: average with the mirrored crop's heatmaps.
        dtype: autocast dtype (e.g. torch.bfloat16), None for float32.
        batch_size: crops per forward pass.
    """

    def __init__(self, model: nn.Module, keypoint_set: KeypointSet | None = None,
                 input_size: Sequence[int] | None = None, flip_test: bool = False,
                 dtype: torch.dtype | None = None, batch_size: int = 32, padding: float = DEFAULT_PADDING) -> None:
        if keypoint_set is None:
            # the set the checkpoint records (custom sets included), not a lookup of its name
            keypoint_set = getattr(getattr(model, "config", None), "keypoint_set_data", None)
            if not isinstance(keypoint_set, KeypointSet):
                raise ValueError("model has no config.keypoint_set_data; pass keypoint_set")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.keypoint_set = keypoint_set
        self.input_size = tuple(input_size) if input_size is not None else model_input_size(model)
        self.codec = UDPHeatmapCodec(self.input_size)
        self.flip_test = flip_test
        self.dtype = dtype
        self.batch_size = batch_size
        self.padding = padding

    def predict(self, image_rgb_uint8: np.ndarray, boxes_xywh: np.ndarray | None = None) -> np.ndarray:
        """Keypoints [P, K, 3] (x, y, score) in image pixels; no boxes means one box over the whole image."""
        boxes = whole_image_box(image_rgb_uint8) if boxes_xywh is None else np.asarray(boxes_xywh, np.float64)
        crops, crop_to_image = prepare_crops(image_rgb_uint8, boxes, self.input_size, self.padding)
        if len(crops) == 0:
            return np.zeros((0, self.keypoint_set.num_keypoints, 3))
        outputs = []
        for start in range(0, len(crops), self.batch_size):
            heatmaps = run_model(self.model, crops[start:start + self.batch_size], self.flip_test,
                                 self.keypoint_set.flip_index, self.dtype)
            outputs.append(decode_to_image(heatmaps, crop_to_image[start:start + self.batch_size], self.codec))
        return np.concatenate(outputs)

    def crop_areas(self, boxes_xywh: np.ndarray) -> np.ndarray:
        """Padded crop areas sw * sh [P] of boxes [P, 4], the instance areas OKS-NMS uses."""
        _, scales = box_xywh_to_center_scale(np.asarray(boxes_xywh, np.float64).reshape(-1, 4),
                                             self.input_size[0] / self.input_size[1], self.padding)
        return scales.prod(axis=1)


def predict_dataset(predictor: TopDownPredictor, image_paths: dict[int, str],
                    boxes_by_image: dict[int, list[tuple[list[float], float]]]) -> list:
    """Run `predictor` over images: image_id -> path, image_id -> [(box xywh, box score)].

    Returns `evaluation.PersonPrediction`s ready for `evaluation.rescore_and_nms`. Images are size-checked
    from their headers (`image_io` limits); boxes that do not overlap their image are skipped, counted
    and reported in one warning.
    """
    from .evaluation import PersonPrediction
    from .image_io import boxes_overlapping_image, read_image_rgb

    predictions = []
    outside = 0
    for image_id, items in boxes_by_image.items():
        if not items:
            continue
        image = read_image_rgb(image_paths[image_id])
        inside = boxes_overlapping_image(np.array([box for box, _ in items]), image.shape[1], image.shape[0])
        outside += int((~inside).sum())
        items = [item for item, keep in zip(items, inside, strict=True) if keep]
        if not items:
            continue
        boxes = np.array([box for box, _ in items], dtype=np.float64)
        keypoints = predictor.predict(image, boxes)
        for person, area, (_, box_score) in zip(keypoints, predictor.crop_areas(boxes), items, strict=True):
            predictions.append(PersonPrediction(int(image_id), person, float(box_score), float(area)))
    if outside:
        logger.warning("skipped %d person boxes that do not overlap their image", outside)
    return predictions


def resolve_device(name: str) -> torch.device:
    """A torch device from a user's string, or InvalidInputError naming it (unknown or not available here)."""
    from .errors import InvalidInputError

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidInputError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise InvalidInputError(f"device {name!r} is not available here ({count} CUDA devices)")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)  # torch.mps, torch.xpu ...
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise InvalidInputError(f"device {name!r} is not available here")
    return device
