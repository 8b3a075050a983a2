"""Hostile input against the real Serve app: >= 300 malformed requests, every one a 4xx JSON error, no 5xx.

The app runs with the person-detector deployment, so every request without boxes (most hostile
ones, and the odd-but-decodable images of `detector_path_cases`) takes the detector path.

Each case is built from a seeded RNG, so a failure is reproducible from its printed name. The limits
are set low (256 KiB body, 1 MP, 4096 px side, 8 boxes) so the oversize cases stay cheap to send.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests
from detector_helpers import briefly_trained_detector
from PIL import Image
from serve_helpers import free_port, running_app, tiny_checkpoint

pytestmark = pytest.mark.timeout(600)  # the module's set-up trains a detector for a few seconds of CPU

MAX_BODY = 256 * 1024
Case = tuple[str, Callable[[str], requests.Response]]


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    """A barely trained detector: real boxes (32 per image at threshold 0) through the real deployment."""
    return briefly_trained_detector(tmp_path_factory.mktemp("fuzz-detector"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("fuzz-model") / "tiny")


@pytest.fixture(scope="module")
def service(ray_local, checkpoint, detector_dir):
    config = {
        "model": {"checkpoint": str(checkpoint)},
        "batching": {"max_batch_size": 8},
        "resources": {"model_num_cpus": 0.5, "ingress_num_cpus": 0.25},
        "limits": {"max_body_bytes": MAX_BODY, "max_pixels": 1_000_000, "max_side": 4096, "max_boxes": 8},
        # box-free requests go to the person detector deployment (TorchvisionPersonDetector)
        "detector": {"import_path": "pipelines.serve.detector:TorchvisionPersonDetector",
                     "init_kwargs": {"path": str(detector_dir), "score_threshold": 0.0}, "num_cpus": 0.25},
        "max_ongoing_requests": 32, "max_queued_requests": 256, "request_timeout_s": 60, "dtype": "fp32",
    }
    with running_app(config, free_port()) as url:
        yield url


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_with_header_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (CRC fixed up) over the original tiny pixel data: a bomb header."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def jpeg_with_header_size(jpeg: bytes, width: int, height: int) -> bytes:
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def hostile_cases(rng: random.Random) -> Iterator[Case]:
    """Yields (name, send(url) -> response) for every hostile request, ~330 in all."""
    small = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    png, jpeg = encode(small, "PNG"), encode(small, "JPEG", quality=90)
    images = {"png": png, "jpeg": jpeg, "webp": encode(small, "WEBP"), "bmp": encode(small, "BMP")}

    def multipart(data: bytes, boxes: Any = None, filename: str = "x") -> Callable[[str], requests.Response]:
        form = {} if boxes is None else {"boxes": boxes if isinstance(boxes, str) else json.dumps(boxes)}
        return lambda url: requests.post(f"{url}/v1/pose", files={"image": (filename, data)}, data=form, timeout=60)

    def post(body: Any, content_type: str | None, params: dict | None = None) -> Callable[[str], requests.Response]:
        headers = {"Content-Type": content_type} if content_type else {}
        return lambda url: requests.post(f"{url}/v1/pose", data=body, headers=headers, params=params, timeout=60)

    def as_json(document: Any) -> Callable[[str], requests.Response]:
        return post(json.dumps(document), "application/json")

    for i in range(40):  # not an image: random bytes, text, an HTML page, a PDF header
        junk = rng.randbytes(rng.randint(0, 5000))
        junk = [junk, b"hello world", b"<html><body>x</body></html>", b"%PDF-1.7\n" + junk][i % 4]
        yield f"junk-multipart-{i}", multipart(junk)
        yield f"junk-raw-{i}", post(junk, rng.choice(["image/jpeg", "image/png", "application/octet-stream"]))
        yield f"junk-json-{i}", as_json({"image": base64.b64encode(junk).decode()})
    for i in range(40):  # truncated images of every accepted format
        fmt = ["png", "jpeg", "webp", "bmp"][i % 4]
        data = images[fmt]
        yield f"truncated-{fmt}-{i}", multipart(data[:rng.randint(1, len(data) - 1)])
    for i, (width, height) in enumerate([(50_000, 50_000), (65_535, 65_535), (2_000, 2_000), (1_001, 1_000),
                                         (20_000, 10), (10, 30_000), (0, 10), (10, 0)]):
        yield f"bomb-png-{i}", multipart(png_with_header_size(png, width, height))
        if width and height:
            yield f"bomb-jpeg-{i}", multipart(jpeg_with_header_size(jpeg, width, height))
    real_bomb = encode(Image.new("L", (3000, 3000)), "PNG", optimize=True)  # 9 MP of zeros in a few KB
    yield "bomb-real-png", multipart(real_bomb)
    yield "bomb-real-png-json", as_json({"image": base64.b64encode(real_bomb).decode()})
    for name, fmt in [("gif", "GIF"), ("tiff", "TIFF"), ("ico", "ICO"), ("pcx", "PCX"), ("ppm", "PPM")]:
        yield f"format-{name}", multipart(encode(small, fmt))
    bad_boxes: list[Any] = [
        [[0, 0, 0, 10]], [[0, 0, 10, 0]], [[5, 5, -10, 20]], [[0, 0, 0.5, 0.5]], [[1000, 1000, 10, 10]],
        [[-100, -100, 50, 50]], [[64, 0, 10, 10]], [[0, 48, 10, 10]], [[-1e9, -1e9, 2e9, 2e9]], [[0, 0, 1e300, 1e300]],
        [[1, 2, 3]], [[1, 2, 3, 4, 5]], [["a", 0, 10, 10]], [[None, 0, 10, 10]], [[[0, 0], [10, 10]]],
        [[0, 0, 10, 10]] * 9, [[0, 0, 10, 10]] * 500, {"x": 0}, "0,0,10,10", 7, [[True, 0, 10, 10], 3],
        [[0, 0, 10, 10], [0, 0, 10]], [[0, 0, 10, 10], [0, 0, 0, 0]],
    ]
    for i, boxes in enumerate(bad_boxes):
        yield f"boxes-multipart-{i}", multipart(png, boxes)
        yield f"boxes-json-{i}", as_json({"image": base64.b64encode(png).decode(), "boxes": boxes})
    for i, text in enumerate(["[[NaN, 0, 10, 10]]", "[[Infinity, 0, 10, 10]]", "[[0, 0, -Infinity, 10]]",
                              "[[0,0,10,10]", "not json", "[" * 50_000 + "]" * 50_000, "1e999", "[[1e999, 0, 1, 1]]"]):
        yield f"boxes-text-{i}", multipart(png, text)
        yield f"boxes-query-{i}", post(png, "image/png", params={"boxes": text})
    for i in range(12):  # oversize bodies: declared (Content-Length) and streamed (chunked)
        size = MAX_BODY + 1 + rng.randint(0, 64 * 1024)
        yield f"oversize-declared-{i}", multipart(png + rng.randbytes(size))
        chunks = [rng.randbytes(16 * 1024) for _ in range(size // (16 * 1024) + 1)]
        yield f"oversize-chunked-{i}", post(iter(chunks), "image/png")
        yield f"oversize-json-{i}", as_json({"image": base64.b64encode(rng.randbytes(size)).decode()})
    for i, content_type in enumerate(["text/plain", "application/xml", None, "image/gif", "video/mp4",
                                      "application/x-www-form-urlencoded", "multipart/mixed; boundary=x",
                                      "application/json-patch+json", "*/*", "image/svg+xml"]):
        yield f"content-type-{i}", post(png, content_type)
    malformed_json = ['{"image": ', "{", "[]", "null", '"just a string"', "{'image': 'x'}", "\x00\x01\x02",
                      '{"image": 123}', '{"image": null}', '{"boxes": [[0,0,10,10]]}', '{"image": ["a"]}',
                      '{"image": "%%%not-base64%%%"}', '{"image": "aGVsbG8="}', '{"image": "", "boxes": []}',
                      '{"image": "x", "extra": 1}', '{"image": "data:image/png;base64,!!!"}',
                      "[" * 100_000, '{"image": "' + "A" * 100 + '", "boxes": "' + "[" * 1000 + '"}']
    for i, text in enumerate(malformed_json):
        yield f"malformed-json-{i}", post(text.encode("utf-8", "surrogatepass"), "application/json")
        yield f"malformed-json-latin1-{i}", post(text.encode("latin-1", "replace") + b"\xff\xfe", "application/json")
    boundary = "b0undary"
    for i, body in enumerate([
        b"no multipart at all",
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nnot a file\r\n--{boundary}--\r\n".encode(),
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"other\"; filename=\"a\"\r\n\r\nx\r\n--{boundary}--\r\n".encode(),
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\n".encode() + png,
        b"--wrong\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\"\r\n\r\nx\r\n--wrong--\r\n",
        b"--" + boundary.encode() + b"\r\n\r\n\r\n--" + boundary.encode() + b"--\r\n",
    ]):
        yield f"multipart-raw-{i}", post(body, f"multipart/form-data; boundary={boundary}")
        yield f"multipart-noboundary-{i}", post(body, "multipart/form-data")
    two_files = lambda url: requests.post(f"{url}/v1/pose", timeout=60, files=[("image", ("a", png)), ("image", ("b", png))])  # noqa: E731
    yield "multipart-two-files", two_files
    yield "multipart-boxes-as-file", lambda url: requests.post(
        f"{url}/v1/pose", timeout=60, files={"image": ("a", png), "boxes": ("b.json", b"[[0,0,10,10]]")})
    yield "get-pose", lambda url: requests.get(f"{url}/v1/pose", timeout=60)
    yield "post-health", lambda url: requests.post(f"{url}/healthz", timeout=60)
    yield "unknown-path", lambda url: requests.post(f"{url}/v2/pose", data=png, timeout=60)
    yield "put-pose", lambda url: requests.put(f"{url}/v1/pose", data=png, timeout=60)


def test_hostile_requests_get_4xx_json_and_the_service_stays_up(service):
    cases = list(hostile_cases(random.Random(1234)))
    assert len(cases) >= 300, len(cases)

    def send(case: Case) -> tuple[str, int, Any]:
        name, call = case
        try:
            response = call(service)
        except requests.ConnectionError as error:  # the server closed the connection: record, do not hide
            return name, -1, str(error)[:120]
        try:
            body = response.json()
        except ValueError:
            body = response.text[:120]
        return name, response.status_code, body

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, cases))

    by_code: dict[int, int] = {}
    for _, code, _ in results:
        by_code[code] = by_code.get(code, 0) + 1
    print(f"fuzz: {len(results)} hostile requests, status counts {dict(sorted(by_code.items()))}")
    server_errors = [(name, code, body) for name, code, body in results if code >= 500 or code < 0]
    assert not server_errors, server_errors[:10]
    # uvicorn itself refuses the 100 kB URL of boxes-query-5 (plain-text 400) before the app sees it
    not_json = [(name, code, body) for name, code, body in results if name != "boxes-query-5"
                and code >= 400 and not (isinstance(body, dict) and isinstance(body.get("error"), str))]
    assert not not_json, not_json[:10]
    accepted = [(name, body) for name, code, body in results if code < 400]
    assert not accepted, accepted

    # still healthy and still correct
    assert requests.get(f"{service}/healthz", timeout=10).status_code == 200
    ok = requests.post(f"{service}/v1/pose", data=encode(Image.new("RGB", (64, 48)), "PNG"),
                       headers={"Content-Type": "image/png"}, params={"boxes": "[[0, 0, 64, 48]]"}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["persons"]) == 1


def detector_path_cases(rng: np.random.Generator) -> Iterator[tuple[str, bytes, tuple[int, int]]]:
    """Decodable images sent without boxes, so the detector sees them: (name, encoded image, (w, h)).

    Extreme shapes (a 4096x1 strip: the detector's resize would make a zero-pixel side), every PIL
    mode the decoder converts to RGB, flat and noise content; the 1 MP noise PNGs exceed the body
    limit (413).
    """
    for width, height in [(1, 1), (2, 2), (4096, 1), (1, 4096), (4096, 3), (7, 2000), (1000, 1000), (999, 1001)]:
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        yield f"shape-{width}x{height}", encode(Image.fromarray(pixels), "PNG"), (width, height)
    base = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    for mode in ["L", "LA", "RGBA", "P", "1", "I;16", "I", "F", "CMYK", "YCbCr", "HSV"]:
        fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "TIFF" if mode in ("F", "HSV") else "PNG"
        try:
            image = base.convert(mode)
            data = encode(image, fmt)
        except (OSError, ValueError):  # a mode this Pillow cannot write in that format
            continue
        yield f"mode-{mode}-{fmt.lower()}", data, (128, 96)
    rotated = Image.fromarray(rng.integers(0, 255, (40, 100, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on decode
    yield "exif-rotated-jpeg", encode(rotated, "JPEG", exif=exif), (40, 100)
    for value in (0, 255):
        yield f"flat-{value}", encode(Image.new("RGB", (320, 240), (value,) * 3), "JPEG"), (320, 240)


def test_box_free_requests_through_the_detector_answer_4xx_or_a_valid_response(service):
    cases = list(detector_path_cases(np.random.default_rng(99)))
    assert len(cases) >= 20, len(cases)

    def send(indexed: tuple[int, tuple[str, bytes, tuple[int, int]]]) -> tuple[str, int, Any, tuple[int, int]]:
        index, (name, data, size) = indexed
        form = {"boxes": "null"} if index % 2 else {}  # an explicit null means "detect" too
        try:
            response = requests.post(f"{service}/v1/pose", files={"image": ("x", data)}, data=form, timeout=120)
        except requests.ConnectionError as error:
            return name, -1, str(error)[:120], size
        try:
            return name, response.status_code, response.json(), size
        except ValueError:
            return name, response.status_code, response.text[:120], size

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, enumerate(cases)))
    print("detector path:", {name: code for name, code, _, _ in results})
    bad = []
    for name, code, body, (width, height) in results:
        if 400 <= code < 500 and isinstance(body, dict) and isinstance(body.get("error"), str):
            continue
        if code != 200 or not isinstance(body, dict) or body.get("image_size") != [width, height]:
            bad.append((name, code, body))
            continue
        for person in body["persons"]:
            x, y, w, h = person["box"]
            keypoints = np.asarray(person["keypoints"], np.float64)
            if not (0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= width and y + h <= height) \
                    or keypoints.shape != (17, 3) or not np.isfinite(keypoints).all():
                bad.append((name, code, person))
        if len(body["persons"]) > 8:  # limits.max_boxes caps the detector's boxes too
            bad.append((name, code, len(body["persons"])))
    assert not bad, bad[:5]
    assert requests.get(f"{service}/healthz", timeout=10).status_code == 200


def test_box_free_request_poses_the_detector_boxes(service, detector_dir, checkpoint):
    """Plumbing: the served boxes are the detector's (capped at max_boxes), the keypoints the pose model's."""
    from vitpose_core.checkpoint import load_model
    from vitpose_core.detection import load_detector
    from vitpose_core.inference import TopDownPredictor

    image = np.asarray(Image.open(io.BytesIO(encode(Image.fromarray(
        np.random.default_rng(5).integers(0, 255, (120, 160, 3), dtype=np.uint8)), "PNG"))))
    response = requests.post(f"{service}/v1/pose", files={"image": ("x.png", encode(Image.fromarray(image), "PNG"))},
                             timeout=120)
    assert response.status_code == 200, response.text
    persons = response.json()["persons"]
    expected_boxes = load_detector(detector_dir, score_threshold=0.0).detect(image)[:8, :4]
    assert len(persons) == len(expected_boxes) == 8
    np.testing.assert_allclose([p["box"] for p in persons], expected_boxes, atol=1e-6)
    expected = TopDownPredictor(load_model(checkpoint)).predict(image, expected_boxes)
    got = np.array([p["keypoints"] for p in persons])
    assert np.abs(got[..., :2] - expected[..., :2]).max() <= 1e-3


def format_option_cases(rng: random.Random) -> Iterator[Case]:
    """The response-format options (`?format=coco&image_id=`) with hostile values, and hostile bodies
    asking for the COCO shape: (name, send(url) -> response), every one a 4xx."""
    png = encode(Image.new("RGB", (64, 48)), "PNG")

    def post(params: Any, body: bytes = png, content_type: str = "image/png") -> Callable[[str], requests.Response]:
        return lambda url: requests.post(f"{url}/v1/pose", data=body, params=params, timeout=60,
                                         headers={"Content-Type": content_type})

    for i, value in enumerate(["", "COCO", "coco ", "json", "default\x00", "cöco", "x" * 4000, "coco;", "null"]):
        yield f"format-value-{i}", post({"format": value})
    yield "format-repeated", post([("format", "coco"), ("format", "xml")])
    for i, value in enumerate(["-1", "1.5", "1e3", "0x10", " 1", "", "9" * 20, str(2**63), "\u0663", "NaN", "null",
                               "1" * 5000]):
        yield f"image-id-{i}", post({"format": "coco", "image_id": value})
    yield "image-id-without-coco", post({"image_id": "1"})
    for i in range(8):  # the COCO option does not open another way past the input checks
        junk = rng.randbytes(rng.randint(0, 3000))
        yield f"coco-junk-{i}", post({"format": "coco", "image_id": str(i)}, junk)
    for i, boxes in enumerate(["[[0, 0, 0, 10]]", "[[NaN, 0, 10, 10]]", "[[1000, 1000, 10, 10]]", "not json"]):
        yield f"coco-bad-boxes-{i}", post({"format": "coco", "boxes": boxes})
    yield "coco-wrong-type", post({"format": "coco"}, png, "text/plain")
    yield "coco-oversize", post({"format": "coco"}, png + rng.randbytes(MAX_BODY + 1))
    yield "post-model-info", lambda url: requests.post(f"{url}/v1/model", data=png, timeout=60)
    yield "put-model-info", lambda url: requests.put(f"{url}/v1/model", timeout=60)


def test_hostile_format_options_get_4xx_json(service):
    cases = list(format_option_cases(random.Random(4321)))
    assert len(cases) >= 35, len(cases)
    results = []
    for name, call in cases:
        try:
            response = call(service)
        except requests.ConnectionError as error:
            results.append((name, -1, str(error)[:120]))
            continue
        try:
            body = response.json()
        except ValueError:
            body = response.text[:120]
        results.append((name, response.status_code, body))
    print("format options:", {name: code for name, code, _ in results})
    bad = [(name, code, body) for name, code, body in results
           if not (400 <= code < 500 and isinstance(body, dict) and isinstance(body.get("error"), str))]
    assert not bad, bad[:10]
    ok = requests.post(f"{service}/v1/pose", data=encode(Image.new("RGB", (64, 48)), "PNG"),
                       headers={"Content-Type": "image/png"}, timeout=60,
                       params={"boxes": "[[0, 0, 64, 48]]", "format": "coco", "image_id": str(2**63 - 1)})
    assert ok.status_code == 200 and ok.json()[0]["image_id"] == 2**63 - 1
