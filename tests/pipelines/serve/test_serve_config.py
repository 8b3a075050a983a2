"""Fast checks of the serve stage without Ray: shipped configs load, input validation, detector helpers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from paths import REPO_ROOT
from PIL import Image

from pipelines.config import ConfigError
from pipelines.serve.app import load_serve_config
from pipelines.serve.config import LimitsConfig, ServeConfig
from pipelines.serve.detector import WholeImageDetector, boxes_from_detections, import_detector_class
from pipelines.serve.inputs import RequestError, decode_image, validate_boxes
from pipelines.serve.model import count_crops, select_dtype

REPO = REPO_ROOT


def test_shipped_serve_configs_load():
    config = load_serve_config({"config_file": str(REPO / "pipelines/configs/serve.yaml")})
    assert config.model.uri == "models:/vitpose@champion" and config.host == "127.0.0.1"
    serve_yaml = yaml.safe_load((REPO / "infra/serve/serve_config.yaml").read_text())
    assert serve_yaml["applications"][0]["import_path"] == "pipelines.serve.app:build_app"
    load_serve_config(serve_yaml["applications"][0]["args"])
    rayservice = REPO / "infra/kuberay/rayservice.yaml"
    if rayservice.exists():
        spec = yaml.safe_load(yaml.safe_load(rayservice.read_text())["spec"]["serveConfigV2"])
        for app in spec["applications"]:
            if app["import_path"].startswith("pipelines.serve"):
                load_serve_config(app.get("args"))


def test_model_source_uris_and_strictness():
    assert ServeConfig(model={"checkpoint": "/m"}).model.uri == "/m"
    assert ServeConfig(model={"run_id": "abc"}).model.uri == "runs:/abc/model"
    assert ServeConfig(model={"alias": "challenger"}).model.uri == "models:/vitpose@challenger"
    with pytest.raises(ConfigError, match="unknown key 'batching.max_batch'"):
        load_serve_config({"batching": {"max_batch": 3}})
    with pytest.raises(ConfigError, match="min_replicas"):
        load_serve_config({"autoscaling": {"min_replicas": 3, "max_replicas": 1}})
    assert load_serve_config({"overrides": ["limits.max_boxes=3"]}).limits.max_boxes == 3


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_image_checks_the_header_before_decoding():
    limits = LimitsConfig(max_pixels=10_000, max_side=200)
    assert decode_image(png_bytes(100, 50), limits).shape == (50, 100, 3)
    for data, status in [(png_bytes(101, 100), 413), (png_bytes(201, 10), 413), (b"", 422), (b"GIF89a...", 422),
                         (png_bytes(20, 20)[:60], 422)]:
        with pytest.raises(RequestError) as caught:
            decode_image(data, limits)
        assert caught.value.status == status, data[:10]


def test_validate_boxes():
    limits = LimitsConfig(max_boxes=2)
    assert validate_boxes([[0, 0, 10, 10], [-5, -5, 20, 20]], (100, 50), limits).shape == (2, 4)
    assert validate_boxes([], (100, 50), limits).shape == (0, 4)
    for boxes in [[[0, 0, 0, 10]], [[200, 0, 10, 10]], [[0, 0, 10, 10]] * 3, [[float("nan"), 0, 1, 1]],
                  [[-1000, 0, 1100, 10]], [[[0, 0], [1, 1]]], "0,0,1,1", [[1, 2, 3]]]:
        with pytest.raises(RequestError) as caught:
            validate_boxes(boxes, (100, 50), limits)
        assert caught.value.status == 422


def test_detector_helpers_and_batch_size():
    image = np.zeros((30, 40, 3), np.uint8)
    assert boxes_from_detections(WholeImageDetector().detect(image), 5) == [[0.0, 0.0, 40.0, 30.0]]
    ranked = boxes_from_detections([[0, 0, 1, 1, 0.2], [1, 1, 2, 2, 0.9], [2, 2, 3, 3, 0.5]], 2)
    assert ranked == [[1, 1, 2, 2], [2, 2, 3, 3]]
    assert boxes_from_detections(np.zeros((0, 5)), 3) == []
    assert import_detector_class("pipelines.serve.detector:WholeImageDetector") is WholeImageDetector
    with pytest.raises(ValueError, match="cannot import"):
        import_detector_class("pipelines.serve.detector:Nope")
    assert count_crops([(np.zeros((3, 3, 8, 8)), None), (np.zeros((5, 3, 8, 8)), None)]) == 8
    # "auto": bf16 only where native (a CUDA GPU with bf16; a CPU with AVX512-BF16/AMX), the engine's rule
    from vitpose_core.inference import cpu_has_native_bf16

    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert select_dtype("fp32", "cuda") == "fp32" and select_dtype("auto", "cuda") == ("bf16" if cuda_bf16 else "fp32")
    assert select_dtype("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
