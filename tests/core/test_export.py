"""ONNX export: onnxruntime equals torch (fp32) at batch 1 and 3 through one file with a dynamic batch
axis, every attention type exports, int8 quantization keeps the heatmaps, and bad input is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitpose_core import ViTPose, build_model, save_checkpoint
from vitpose_core.export import (
    ExportError,
    OnnxPoseModel,
    export_onnx,
    onnx_parity,
    quantize_onnx,
    read_onnx_config,
)
from vitpose_core.inference import TopDownPredictor, decode_to_image, prepare_crops, run_model

pytest.importorskip("onnxruntime")

IMG_SIZE = (128, 96)  # (H, W): an 8x6 token grid, 32x24 heatmaps


def trained_like_tiny(**overrides) -> torch.nn.Module:
    """vitpose-tiny whose decoder gives heatmaps of a trained model's magnitude (the official init gives ~1e-5,
    where any absolute tolerance passes trivially)."""
    torch.manual_seed(0)
    model = build_model("vitpose-tiny", img_size=IMG_SIZE, **overrides).eval()
    with torch.no_grad():
        for parameter in model.keypoint_head.parameters():
            parameter.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """A checkpoint exported by the real `vitpose export` command, fp32 and int8."""
    from pipelines.cli import main

    root = tmp_path_factory.mktemp("export")
    model = trained_like_tiny()
    checkpoint = save_checkpoint(model, root / "checkpoint")
    out = root / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out),
                 "--quantize", "int8"]) == 0
    return model, out, root / "model.int8.onnx"


def test_onnxruntime_equals_torch_fp32_at_batch_1_and_3(exported):
    model, onnx_path, _ = exported
    runtime_model = OnnxPoseModel(onnx_path)
    assert runtime_model.input_shape[0] not in (1, 2, 3)  # a named (dynamic) batch axis, not a fixed size
    differences = onnx_parity(model, runtime_model, batch_sizes=(1, 3))
    assert set(differences) == {1, 3}
    assert max(differences.values()) < 1e-3
    with torch.inference_mode():
        heatmaps = model(torch.randn(3, 3, *IMG_SIZE))
    assert heatmaps.abs().max() > 0.05  # heatmaps big enough for the tolerance to mean something
    assert tuple(runtime_model(torch.randn(5, 3, *IMG_SIZE)).shape) == (5, 17, 32, 24)


def test_config_travels_in_the_file_and_predictor_runs_it(exported):
    model, onnx_path, int8_path = exported
    assert read_onnx_config(onnx_path) == model.config
    assert read_onnx_config(int8_path) == model.config  # the quantizer drops metadata; we copy it back
    runtime_model = OnnxPoseModel(onnx_path)
    image = np.random.default_rng(0).integers(0, 255, (200, 160, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 20.0, 80.0, 150.0], [50.0, 5.0, 100.0, 180.0]])
    predictor = TopDownPredictor(model, flip_test=True)
    expected = predictor.predict(image, boxes)
    got = TopDownPredictor(runtime_model, flip_test=True).predict(image, boxes)  # keypoint set, size from metadata
    assert got.shape == expected.shape == (2, 17, 3)
    np.testing.assert_allclose(got[..., 2], expected[..., 2], atol=1e-3)  # scores
    # The two runtimes' heatmaps differ by ~1e-8, yet an untrained model's heatmaps are so flat that UDP's
    # refinement can move some keypoints by pixels on a 1e-8 change (how many depends on the CPU's kernels:
    # 21% on an AMX Xeon). Those keypoints are found by decoding torch's own heatmaps with 1e-6 noise added;
    # every other keypoint must agree between the runtimes.
    crops, crop_to_image = prepare_crops(image, boxes, predictor.input_size, predictor.padding)
    heatmaps = run_model(model, crops, True, predictor.keypoint_set.flip_index)
    noise = torch.Generator().manual_seed(0)
    stable = np.ones(expected.shape[:2], dtype=bool)
    for _ in range(3):
        nudged = decode_to_image(heatmaps + 1e-6 * torch.randn(heatmaps.shape, generator=noise), crop_to_image,
                                 predictor.codec)
        stable &= np.abs(nudged[..., :2] - expected[..., :2]).max(-1) < 0.05
    assert stable.mean() >= 0.5, stable  # enough keypoints left for the comparison to mean something
    close = np.abs(got[..., :2] - expected[..., :2]).max(-1) < 0.05
    assert close[stable].all(), (close, stable)


def test_int8_quantized_model_uses_integer_kernels_and_keeps_the_heatmaps(exported):
    import onnx

    model, _, int8_path = exported
    op_types = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert op_types & {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul"}, op_types
    crops = torch.randn(4, 3, *IMG_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(crops)
    got = OnnxPoseModel(int8_path)(crops)
    relative = float((got - expected).abs().max() / expected.abs().max())
    assert 0 < relative < 0.1  # quantized (not bit-equal) yet close
    # the peak of each heatmap (what decoding reads) stays in place for nearly all keypoints
    same_peak = (got.flatten(2).argmax(-1) == expected.flatten(2).argmax(-1)).float().mean()
    assert same_peak > 0.9


def test_static_quantization_needs_calibration(exported, tmp_path):
    _, onnx_path, _ = exported
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(onnx_path, tmp_path / "static.onnx", method="static")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "q.onnx")


@pytest.mark.parametrize("attention", ["window", "shifted_window", "pooling_window"])
def test_window_attention_types_export_and_match(tmp_path, attention):
    # 4x3 token grid with 2x2 windows: the width is padded (masked keys) and shifted blocks roll it
    torch.manual_seed(0)
    model = build_model("vitpose-tiny", img_size=(64, 48), depth=2, attention=attention, window_size=2).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # random weights everywhere so attention changes the output
            parameter.normal_(0, 0.1)
    path = export_onnx(model, tmp_path / f"{attention}.onnx")
    differences = onnx_parity(model, OnnxPoseModel(path), batch_sizes=(1, 3))
    assert max(differences.values()) < 1e-3, differences
    assert read_onnx_config(path).attention == attention


class DataDependentViTPose(ViTPose):
    def forward(self, images: torch.Tensor, extra_tokens: torch.Tensor | None = None) -> torch.Tensor:
        heatmaps = super().forward(images)
        return heatmaps if heatmaps.sum() > 0 else -heatmaps


def test_export_errors_name_the_problem(tmp_path):
    model = build_model("vitpose-tiny", img_size=(64, 48), depth=1)
    with pytest.raises(ExportError, match="fp32"):
        export_onnx(model.to(torch.bfloat16), tmp_path / "bf16.onnx")
    with pytest.raises(ExportError, match="ViTPoseConfig"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), tmp_path / "conv.onnx")
    with pytest.raises(ExportError, match="opset must be >= 18"):
        export_onnx(model.float(), tmp_path / "old.onnx", opset=11)
    with pytest.raises(ExportError, match="max_batch"):
        export_onnx(model.float(), tmp_path / "one.onnx", max_batch=1)
    # a failure inside torch.export (here: control flow on tensor values, as a user-modified forward might
    # have) is reported with the model and attention type it was exporting
    broken = DataDependentViTPose(model.config).eval()
    with pytest.raises(ExportError, match="cannot export vitpose-tiny \\(attention 'full', window 8\\)"):
        export_onnx(broken, tmp_path / "broken.onnx")
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        OnnxPoseModel(tmp_path / "nothing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="garbage.onnx"):
        OnnxPoseModel(tmp_path / "garbage.onnx")


def test_runner_rejects_crops_of_the_wrong_size_and_pickles(exported):
    import pickle

    _, onnx_path, _ = exported
    runtime_model = OnnxPoseModel(onnx_path, graph_optimization="basic", intra_op_threads=1)
    with pytest.raises(ValueError, match=r"takes crops \[N, 3, 128, 96\]"):
        runtime_model(torch.zeros(1, 3, 256, 192))
    clone = pickle.loads(pickle.dumps(runtime_model))  # how a Ray actor receives it
    crops = torch.randn(2, 3, *IMG_SIZE)
    assert torch.equal(clone(crops), runtime_model(crops))
    assert clone.config == runtime_model.config


def test_cli_export_rejects_bad_paths(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_vitpose_core_does_not_import_onnxruntime():
    code = ("import sys, vitpose_core, vitpose_core.export, vitpose_core.inference; "
            "print(json.dumps([m for m in ('onnxruntime', 'onnx') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []

