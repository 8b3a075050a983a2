"""Untrusted request input -> a decoded RGB image and validated person boxes, or a `RequestError` (4xx).

Everything here runs in the ingress before any model work, cheapest check first: body size (from
Content-Length, then while streaming), content type, JSON / multipart structure, image format and
pixel count *from the header* (so an image bomb is refused before a byte is decompressed), the
decode itself, then the boxes against the decoded image. Every failure is a `RequestError` carrying
the HTTP status and a message for the client; the ingress turns it into `{"error": "..."}`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pydantic import ValidationError

from pipelines.serve.config import LimitsConfig
from pipelines.serve.schemas import PoseRequestJSON

# formats a camera or a browser produces; GIF/TIFF/PSD & co. are refused (multi-frame, exotic decoders)
ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP"}
RAW_IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/bmp", "application/octet-stream"}
MAX_FORM_FIELD_BYTES = 64 * 1024  # the `boxes` form field; the image part is bounded by max_body_bytes


class RequestError(Exception):
    """A request that cannot be served: `status` (4xx, or 503/504) and a message that says what to do."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


async def read_body(stream: AsyncIterator[bytes], content_length: str | None, max_bytes: int) -> bytes:
    """The whole request body, refusing (413) as soon as it is known to exceed `max_bytes`.

    The declared Content-Length is checked first so an honest oversize upload is refused without
    reading it; the streamed count catches chunked bodies and lying headers.
    """
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {content_length[:40]!r}") from None
        if declared > max_bytes:
            raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(content_type: str | None) -> str:
    """`multipart/form-data; boundary=x` -> `multipart/form-data`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_boxes_json(text: str | bytes | None) -> Any:
    """The `boxes` value of a form field or query parameter (a JSON list, or empty/null for none)."""
    if text is None or not str(text).strip():
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise RequestError(400, "boxes must be a JSON list of [x, y, w, h]") from None


def parse_json_request(body: bytes) -> tuple[bytes, Any]:
    """(image bytes, raw boxes) of an `application/json` body (see `schemas.PoseRequestJSON`)."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise RequestError(400, "malformed JSON body") from None
    try:
        request = PoseRequestJSON.model_validate(document)
    except ValidationError as error:
        raise RequestError(422, "invalid request: " + format_validation_error(error)) from None
    return decode_base64(request.image), request.boxes


def decode_base64(text: str) -> bytes:
    if text.startswith("data:"):  # data URL: data:image/png;base64,....
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "image is not valid base64") from None


def format_validation_error(error: ValidationError, limit: int = 3) -> str:
    parts = [f"{'.'.join(str(p) for p in item['loc']) or 'body'}: {item['msg']}" for item in error.errors()[:limit]]
    return "; ".join(parts)


def image_header(data: bytes, limits: LimitsConfig) -> Image.Image:
    """Open `data` lazily (header only) and check format and size before anything is decompressed."""
    if not data:
        raise RequestError(422, "the image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise RequestError(413, f"image has more than {limits.max_pixels} pixels") from None
    except Exception:  # PIL raises UnidentifiedImageError, SyntaxError, struct.error ... on junk headers
        raise RequestError(422, "the body is not a decodable image (JPEG, PNG, WebP or BMP)") from None
    if image.format not in ALLOWED_FORMATS:
        raise RequestError(415, f"image format {image.format} is not accepted; send JPEG, PNG, WebP or BMP")
    width, height = image.size
    if width < 1 or height < 1:
        raise RequestError(422, f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise RequestError(413, f"image is {width}x{height} = {width * height} pixels; "
                                f"the limit is {limits.max_pixels}")
    if max(width, height) > limits.max_side:
        raise RequestError(413, f"image side {max(width, height)} exceeds the limit of {limits.max_side} pixels")
    return image


def decode_image(data: bytes, limits: LimitsConfig) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [H, W, 3], EXIF orientation applied (as cv2.imread does)."""
    image = image_header(data, limits)
    try:
        image.load()  # the actual decode: raises on truncated or corrupt data
        image = ImageOps.exif_transpose(image)
        rgb = np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError:
        raise RequestError(413, f"image has more than {limits.max_pixels} pixels") from None
    except Exception:  # OSError (truncated), ValueError, SyntaxError, struct.error ... from the decoders
        raise RequestError(422, "the image is truncated or corrupt") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] * rgb.shape[1] > limits.max_pixels:
        raise RequestError(422, f"decoded image has an unexpected shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def validate_boxes(raw: Any, image_size: tuple[int, int], limits: LimitsConfig) -> np.ndarray:
    """Raw boxes (list of [x, y, w, h]) -> float64 [P, 4], or a 4xx naming the first bad box.

    A box must have a finite position, sides >= `min_box_side`, overlap the image, and extend at most
    one image size past any edge (a crop of a box far outside the image is meaningless, and huge
    coordinates would overflow the crop affine).
    """
    if not isinstance(raw, list | tuple):
        raise RequestError(422, "boxes must be a list of [x, y, w, h]")
    if len(raw) > limits.max_boxes:
        raise RequestError(422, f"{len(raw)} boxes exceed the limit of {limits.max_boxes} per request")
    try:
        boxes = np.asarray(raw, dtype=np.float64) if raw else np.zeros((0, 4))
    except (ValueError, TypeError, OverflowError):
        raise RequestError(422, "boxes must be a list of [x, y, w, h] numbers") from None
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise RequestError(422, "each box must be [x, y, w, h]")
    width, height = image_size
    for index, (x, y, w, h) in enumerate(boxes):
        problem = None
        if not np.all(np.isfinite([x, y, w, h])):
            problem = "is not finite"
        elif w < limits.min_box_side or h < limits.min_box_side:
            problem = f"is smaller than {limits.min_box_side} pixels"
        elif x >= width or y >= height or x + w <= 0 or y + h <= 0:
            problem = f"lies outside the {width}x{height} image"
        elif x < -width or y < -height or x + w > 2 * width or y + h > 2 * height:
            problem = "extends more than one image size beyond the image"
        if problem:
            raise RequestError(422, f"box {index} {[float(v) for v in (x, y, w, h)]} {problem}")
    return boxes
