"""`vitpose export`: a checkpoint as an ONNX model with a dynamic batch axis, optionally int8.

    vitpose export --checkpoint CK --format onnx --out model.onnx [--quantize int8] [--dataset NAME]
    vitpose export --checkpoint CK --format checkpoint --dataset NAME --out DIR

Writes model.onnx (fp32: crops [N, 3, H, W] -> heatmaps [N, K, H/4, W/4]); with --quantize int8 also
model.int8.onnx (onnxruntime's dynamic int8 quantization of the MatMuls, per-channel weights; see
bench/results/onnx.md for its speed and AP). Before it returns, the fp32 file is run on onnxruntime
against the torch model at batch 1 and 3 and the largest heatmap difference is printed; a difference
above --tolerance is an error. Run the file with `vitpose_core.export.OnnxPoseModel`.

`--dataset NAME` takes one dataset's single-dataset model out of a multi-dataset (ViTPose+) checkpoint
first (MoE FFNs folded, that dataset's decoder; the official model_split); `--format checkpoint`
writes it in the project's checkpoint format (a directory, recording its keypoint set).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="checkpoint -> ONNX (dynamic batch), optionally int8",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="own format dir or official .pth")
    parser.add_argument("--format", default="onnx", choices=["onnx", "checkpoint"],
                        help="onnx (default) or checkpoint (the project's format, a directory)")
    parser.add_argument("--out", required=True, type=Path, help="output .onnx file (checkpoint: a directory)")
    parser.add_argument("--dataset", default=None,
                        help="multi-dataset checkpoint: export this dataset's single-dataset model (its name)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="also write <out stem>.int8.onnx quantized with onnxruntime (dynamic, per-channel)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest allowed |torch - onnxruntime| fp32 heatmap difference (default 1e-3)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.storage import refuse_overwriting_inputs
    from vitpose_core import load_model
    from vitpose_core.export import OnnxPoseModel, export_onnx, onnx_parity, quantize_onnx

    if not args.checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    refuse_overwriting_inputs(args.out, [args.checkpoint], flag="--out")
    if args.format == "onnx" and args.out.suffix != ".onnx":
        raise ValueError(f"--out must end in .onnx, got {args.out}")
    model = load_model(args.checkpoint, dataset=args.dataset).eval()
    if args.format == "checkpoint":
        from vitpose_core.checkpoint import save_checkpoint

        if args.quantize:
            raise ValueError("--quantize applies to --format onnx only")
        save_checkpoint(model, args.out, metadata={"exported_from": str(args.checkpoint), "dataset": args.dataset})
        print(json.dumps({"checkpoint": str(args.out), "keypoint_set": model.config.keypoint_set,
                          "num_keypoints": model.config.num_keypoints}, indent=2))
        return 0
    path = export_onnx(model, args.out)
    differences = onnx_parity(model, OnnxPoseModel(path), batch_sizes=(1, 3))
    worst = max(differences.values())
    if worst > args.tolerance:
        raise ValueError(f"{path}: onnxruntime differs from torch by {worst:.2e} > --tolerance {args.tolerance}")
    summary = {"onnx": str(path), "max_abs_diff_vs_torch": {str(k): v for k, v in differences.items()}}
    if args.quantize == "int8":
        quantized = quantize_onnx(path, path.with_name(path.stem + ".int8.onnx"), method="dynamic")
        summary["int8"] = str(quantized)
    print(json.dumps(summary, indent=2))
    return 0
