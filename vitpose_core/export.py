"""ONNX export of a ViTPose model, int8 quantization, and an onnxruntime model with the torch call shape.

    export_onnx(model, "model.onnx")          # crops [N, 3, H, W] -> heatmaps [N, K, H/4, W/4], N dynamic
    quantize_onnx("model.onnx", "model.int8.onnx", method="dynamic")
    model = OnnxPoseModel("model.int8.onnx")  # an nn.Module: model(crops) -> heatmaps, model.config
    heatmaps = model(crops)

`OnnxPoseModel` is a parameter-free ``nn.Module`` whose forward runs an onnxruntime session, so every
place that takes "a model returning heatmaps" (``inference.TopDownPredictor``, ``run_model``,
``engine.evaluate_coco_ap``) runs the ONNX file unchanged. The model's ``ViTPoseConfig`` travels in
the ONNX metadata (key ``vitpose_config``), so the file alone rebuilds the crop size and keypoint set.

Export goes through ``torch.export`` (the TorchScript exporter writes a Transpose with negative
``perm`` for ``movedim`` that onnxruntime rejects). The ONNX translation of
``scaled_dot_product_attention`` accepts only 4-D tensors, while the window variants attend over
(B, windows, heads, L, d); so before translation the op is decomposed into its explicit form
``softmax(q k^T / sqrt(d) + mask) v`` -- the same function, written with MatMul/Softmax that any
rank and onnxruntime's graph optimisers handle. All four attention types export this way (tested).

onnxruntime (and onnx) are imported inside the functions that need them, so importing
``vitpose_core`` never pays for them.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from vitpose_core.errors import InvalidInputError
from vitpose_core.models.vitpose import ViTPose, ViTPoseConfig

logger = logging.getLogger(__name__)

INPUT_NAME = "crops"
OUTPUT_NAME = "heatmaps"
CONFIG_METADATA_KEY = "vitpose_config"
ONNX_OPSET = 18
# protobuf caps a single file at 2 GiB; above this the weights go to a side file (ViTPose-H/G)
SINGLE_FILE_MAX_BYTES = 1_800_000_000
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
GraphOptimization = Literal["disable", "basic", "extended", "all"]
QuantizationMethod = Literal["dynamic", "static"]


class ExportError(InvalidInputError):
    """The model cannot be exported as asked; the message names the model, its attention type and the reason."""


class _Heatmaps(nn.Module):
    """The graph that is exported: crops -> heatmaps only (no knowledge tokens at inference)."""

    def __init__(self, model: ViTPose) -> None:
        super().__init__()
        self.model = model

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.model(crops)


def _explicit_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over (..., L, d) tensors of any rank; a bool mask is True where allowed."""
    if dropout_p or is_causal or enable_gqa:
        raise ExportError("ONNX export supports inference attention only (no dropout, causal mask or GQA)")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query * scale) @ key.transpose(-2, -1)  # (..., Lq, Lk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    return logits.softmax(dim=-1) @ value


def export_onnx(model: ViTPose, path: str | Path, *, opset: int = ONNX_OPSET, max_batch: int = 4096) -> Path:
    """Write ``model`` (fp32, eval) as ONNX with a dynamic batch axis; returns the file path.

    Input ``crops`` float32 [N, 3, H, W] (ImageNet-normalised RGB, H x W = ``config.img_size``), output
    ``heatmaps`` float32 [N, K, H/4, W/4]. The config is stored in the metadata (``vitpose_config``).

    Raises:
        ExportError: the model is not a ViTPose in fp32, or torch cannot export it (the message names
            the variant and attention type).
    """
    config: ViTPoseConfig | None = getattr(model, "config", None)
    if not isinstance(config, ViTPoseConfig):
        raise ExportError(f"export_onnx needs a ViTPose model with a ViTPoseConfig, got {type(model).__name__}")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ExportError(f"export the fp32 model (its weights are {sorted(map(str, dtypes))}); "
                          "onnxruntime quantization starts from fp32 (quantize_onnx)")
    described = f"{config.variant} (attention {config.attention!r}, window {config.window_size})"
    if opset < ONNX_OPSET:  # torch's exporter would quietly keep 18 when it cannot convert down
        raise ExportError(f"opset must be >= {ONNX_OPSET} (torch's ONNX exporter starts there), got {opset}")
    if max_batch < 2:
        raise ExportError(f"max_batch must be >= 2 for a dynamic batch axis, got {max_batch}")
    height, width = config.img_size
    # a copy: tracing fills the window masks' caches with export-time tensors, which must not stay in `model`
    wrapper = _Heatmaps(copy.deepcopy(model)).eval()
    example = torch.randn(2, 3, height, width)  # batch 2: torch.export specialises sizes 0 and 1
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, (example,), dynamic_shapes={"crops": {0: batch}}, strict=False)
        # the explicit form instead of the fused op (module docstring): same function, any rank
        program = program.run_decompositions({torch.ops.aten.scaled_dot_product_attention.default: _explicit_sdpa})
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset,
                                         input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
    except ExportError:
        raise
    except Exception as error:  # torch.export / ONNX translation: report which model failed and why
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"cannot export {described} to ONNX: {type(error).__name__}: {first_line}") from error
    onnx_program.model.metadata_props[CONFIG_METADATA_KEY] = config.model_dump_json()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    onnx_program.save(str(path), external_data=weight_bytes > SINGLE_FILE_MAX_BYTES)
    logger.info("exported %s to %s (%.1f MB of weights)", described, path, weight_bytes / 1e6)
    return path


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("running ONNX models needs onnxruntime: pip install onnxruntime") from error
    return onnxruntime


def session_options(graph_optimization: GraphOptimization = "all", intra_op_threads: int | None = None) -> Any:
    """onnxruntime SessionOptions with a named graph optimisation level and intra-op thread count."""
    ort = _onnxruntime()
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if graph_optimization not in levels:
        raise InvalidInputError(f"graph_optimization must be one of {GRAPH_OPTIMIZATION_LEVELS}, got {graph_optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[graph_optimization]
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise InvalidInputError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        options.intra_op_num_threads = intra_op_threads
    return options


class OnnxPoseModel(nn.Module):
    """An ONNX ViTPose on onnxruntime, called like the torch model: crops [N, 3, H, W] -> heatmaps [N, K, h, w].

    Args:
        path: an ``.onnx`` file written by ``export_onnx`` (or ``quantize_onnx``).
        graph_optimization: onnxruntime's graph optimisation level ("disable" ... "all").
        intra_op_threads: threads per call; None lets onnxruntime use one per core.
        providers: execution providers in order of preference.

    Returns float32 CPU tensors whatever the input's dtype or device. Pickles by path and options,
    so it can be shipped to a Ray actor (the session is rebuilt there).
    """

    def __init__(self, path: str | Path, graph_optimization: GraphOptimization = "all",
                 intra_op_threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        ort = _onnxruntime()
        self.path = path
        self._options = {"graph_optimization": graph_optimization, "intra_op_threads": intra_op_threads,
                         "providers": tuple(providers)}
        try:
            self.session = ort.InferenceSession(str(path), session_options(graph_optimization, intra_op_threads),
                                                providers=list(providers))
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            raise InvalidInputError(f"onnxruntime cannot load {path}: {str(error).strip().splitlines()[0]}") from error
        inputs = self.session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME]:
            raise InvalidInputError(f"{path} takes inputs {[i.name for i in inputs]}, expected [{INPUT_NAME!r}]")
        self.input_shape = tuple(inputs[0].shape)  # ('batch', 3, H, W)
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.config: ViTPoseConfig | None = None
        if CONFIG_METADATA_KEY in metadata:
            self.config = ViTPoseConfig.model_validate_json(metadata[CONFIG_METADATA_KEY])

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        expected = self.input_shape[1:]
        if crops.ndim != 4 or tuple(crops.shape[1:]) != expected:
            raise InvalidInputError(f"{self.path.name} takes crops [N, {', '.join(map(str, expected))}], "
                                    f"got {list(crops.shape)}")
        array = crops.detach().to("cpu", torch.float32).contiguous().numpy()
        (heatmaps,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(heatmaps)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, **self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


def onnx_parity(model: nn.Module, onnx_model: nn.Module, batch_sizes: Iterable[int] = (1, 3),
                seed: int = 0) -> dict[int, float]:
    """Max |torch - onnxruntime| heatmap difference (fp32) per batch size, on random normalised crops."""
    config: ViTPoseConfig = model.config
    generator = torch.Generator().manual_seed(seed)
    differences = {}
    for batch_size in batch_sizes:
        crops = torch.randn(batch_size, 3, *config.img_size, generator=generator)
        with torch.inference_mode():
            expected = model.eval()(crops).float()
        differences[batch_size] = float((onnx_model(crops) - expected).abs().max())
    return differences


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, method: QuantizationMethod = "dynamic",
                  calibration: Iterable[np.ndarray] | None = None, per_channel: bool = True,
                  reduce_range: bool = False, op_types: Sequence[str] = ("MatMul",)) -> Path:
    """int8 weights (and activations) through onnxruntime's quantization tools; returns ``out_path``.

    Args:
        method: "dynamic" (``quantize_dynamic``: int8 weights, activation ranges computed per call) or
            "static" (``quantize_static`` in QDQ format: activation ranges from ``calibration``).
        calibration: float32 crop batches [N, 3, H, W] for "static" (training crops, not the val set).
        per_channel: one weight scale per output channel rather than per tensor.
        reduce_range: 7-bit weights, which avoids int16 overflow in the u8 x s8 kernels of CPUs
            without VNNI (onnxruntime's advice for AVX2/AVX512 machines).
        op_types: which ops to quantize; the transformer's MatMuls carry ~all the FLOPs.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {fp32_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # shape inference + onnxruntime's fusions first, as the quantization docs advise
    prepared = out_path.with_name(out_path.stem + ".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    try:
        if method == "dynamic":
            quantize_dynamic(str(prepared), str(out_path), per_channel=per_channel, reduce_range=reduce_range,
                             weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types))
        elif method == "static":
            if calibration is None:
                raise InvalidInputError("static quantization needs calibration crops")
            quantize_static(str(prepared), str(out_path), _CalibrationReader(calibration),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(op_types))
        else:
            raise InvalidInputError(f"quantization method must be 'dynamic' or 'static', got {method!r}")
    finally:
        prepared.unlink(missing_ok=True)
    _copy_metadata(fp32_path, out_path)
    return out_path


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over crop batches."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        array = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        return {INPUT_NAME: np.ascontiguousarray(array, dtype=np.float32)}


def _copy_metadata(source: Path, target: Path) -> None:
    """Carry the ViTPose config over to the quantized file (the quantizers drop metadata_props)."""
    import onnx

    source_props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    if CONFIG_METADATA_KEY not in source_props:
        return
    quantized = onnx.load(str(target))
    kept = {p.key: p.value for p in quantized.metadata_props}
    kept[CONFIG_METADATA_KEY] = source_props[CONFIG_METADATA_KEY]
    onnx.helper.set_model_props(quantized, kept)
    onnx.save(quantized, str(target))


def read_onnx_config(path: str | Path) -> ViTPoseConfig:
    """The ViTPoseConfig stored in an exported file's metadata."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if CONFIG_METADATA_KEY not in props:
        raise InvalidInputError(f"{path} has no {CONFIG_METADATA_KEY!r} metadata; was it written by export_onnx?")
    return ViTPoseConfig(**json.loads(props[CONFIG_METADATA_KEY]))
