"""Reading images and checking person boxes from the command line, with the server's limits.

An image's pixel count is read from its header before anything is decoded, so a small file that
claims 30000 x 30000 pixels (a "decompression bomb": 107 KB of PNG, 11 GB decoded) is refused at
once. The limits equal the serving defaults (`pipelines/serve/config.py` `LimitsConfig`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInputError

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_SIDE = 16384  # OpenCV's warps need sides < 32767
# Images of a dataset (the shard and detect stages) may be high-resolution photos: a larger limit than a
# request's, still far below what a hostile header claims; one image at a time is 192 MB as BGR
DATASET_MAX_IMAGE_PIXELS = 8192 * 8192


class ImageTooLargeError(InvalidInputError):
    """An image whose header claims more pixels (or a longer side) than the limits allow."""


def image_size_from_header(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS,
                           max_side: int = MAX_IMAGE_SIDE) -> tuple[int, int]:
    """(width, height) of an image file from its header only; InvalidInputError naming the file if it is
    not an image PIL can identify or exceeds the limits."""

    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"image {path} is a directory, expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return _checked_header_size(path, str(path), max_pixels, max_side)


def read_image_rgb(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an image file, size-checked from the header before decoding.

    Decoded by OpenCV (EXIF orientation applied), as training and evaluation always have been, so the
    pixels are those the models were measured on.
    """
    image_size_from_header(path, max_pixels, max_side)
    import cv2

    image_bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image_bgr is None:
        raise InvalidInputError(f"cannot read image {path}: the decoder failed (truncated or corrupt?)")
    return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)


def image_size_from_bytes(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS,
                          max_side: int = MAX_IMAGE_SIDE) -> tuple[int, int]:
    """(width, height) of an encoded image (bytes read from a file or S3) from its header only, checked as
    `image_size_from_header` checks a file. Errors are InvalidInputErrors naming `name`."""
    import io

    return _checked_header_size(io.BytesIO(data), name, max_pixels, max_side)


def _checked_header_size(source: Any, name: str, max_pixels: int, max_side: int) -> tuple[int, int]:
    """(width, height) from the header of ``source`` (a path or a file object), checked against the limits;
    errors name the image as ``name``."""
    from PIL import Image

    try:
        with Image.open(source) as header:  # lazy: reads the header, decodes nothing
            width, height = header.size
    except Image.DecompressionBombError as error:  # PIL's own header check, at twice its MAX_IMAGE_PIXELS
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        pixels = claimed.group(1) if claimed else f"more than {max_pixels}"
        raise ImageTooLargeError(f"image {name} has {pixels} pixels; the limit is {max_pixels}") from None
    except Exception:  # UnidentifiedImageError, SyntaxError, struct.error ... on junk headers
        raise InvalidInputError(f"cannot read image {name}: not a decodable image (JPEG, PNG, WebP, BMP ...)") from None
    if width < 1 or height < 1:
        raise InvalidInputError(f"image {name} has no pixels ({width}x{height})")
    if width * height > max_pixels or max(width, height) > max_side:
        raise ImageTooLargeError(f"image {name} is {width}x{height} = {width * height} pixels; the limit is "
                                 f"{max_pixels} pixels and {max_side} per side")
    return width, height


def decode_image_rgb(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS,
                     max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """RGB uint8 [H, W, 3] of an encoded image (bytes read from a file or S3), checked as `read_image_rgb`
    checks a file: size from the header first, then OpenCV's decoder. Errors are InvalidInputErrors naming `name`."""
    image_size_from_bytes(data, name, max_pixels, max_side)
    import cv2

    image_bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image_bgr is None:
        raise InvalidInputError(f"cannot read image {name}: the decoder failed (truncated or corrupt?)")
    return cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)


def boxes_overlapping_image(boxes_xywh: np.ndarray, width: int, height: int) -> np.ndarray:
    """Mask [P] of the boxes (x, y, w, h) that are finite, non-empty and overlap the width x height image."""
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    x, y, w, h = boxes.T
    with np.errstate(invalid="ignore"):
        return (np.all(np.isfinite(boxes), axis=1) & (w > 0) & (h > 0)
                & (x < width) & (y < height) & (x + w > 0) & (y + h > 0))


def check_boxes_in_image(boxes_xywh: np.ndarray, width: int, height: int, source: str) -> None:
    """InvalidInputError naming the first box (of `source`) that lies wholly outside the image: its crop would
    be empty padding, and its keypoints land far outside the image."""
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    inside = boxes_overlapping_image(boxes, width, height)
    if not inside.all():
        index = int(np.flatnonzero(~inside)[0])
        raise InvalidInputError(f"box {index} {boxes[index].tolist()} of {source} does not overlap the "
                                f"{width}x{height} image")
