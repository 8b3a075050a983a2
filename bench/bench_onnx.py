"""onnxruntime (fp32, int8) vs the project's torch path vs transformers on this CPU: throughput and val AP.

Two parts, each updating bench/results/onnx.json and rewriting bench/results/onnx.md from it:

  speed  ViTPose-B at 256x192, random weights (speed does not depend on them), the same weights on
         every side, one process, settings interleaved round by round so load from other processes hits
         all alike; medians and ratios to transformers' best setting; the matmul peak measured in the run.
         The torch and transformers runners are bench_model_throughput's (imported, not copied).
  ap     val COCO AP on the synthetic split of one trained vitpose-tiny (128x96), every setting on the
         same val crops with the same decode (engine.evaluate_coco_ap, flip test): torch fp32 / bf16,
         transformers fp32, onnxruntime fp32 at each graph optimisation level, and int8 (dynamic
         per-channel, with and without reduce_range; static QDQ per-channel calibrated on train crops).
         Makes the data (synthetic + shards on a private Ray) and trains the model (fp32 engine, a few
         minutes) under --work if they are not there yet.

    python bench/bench_onnx.py ap [--work runs/bench_onnx] [--steps 300] [--train-minutes 5]
    python bench/bench_onnx.py speed [--batch 8] [--rounds 3] [--threads 2] [--compile]
    python bench/bench_onnx.py report     # rewrite the .md from the .json

int8 settings quantize the MatMuls (all but the patch conv and the decoder's ~3% of the FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from bench_model_throughput import forward_flops, make_runner, matmul_peak_gflops, time_batch  # noqa: E402

from vitpose_core.export import OnnxPoseModel, export_onnx, quantize_onnx  # noqa: E402
from vitpose_core.inference import cpu_has_native_bf16, optimize_for_inference  # noqa: E402
from vitpose_core.interop import build_hf_model  # noqa: E402
from vitpose_core.models import build_model  # noqa: E402

RESULTS_JSON = ROOT / "bench" / "results" / "onnx.json"
RESULTS_MD = ROOT / "bench" / "results" / "onnx.md"
TINY_INPUT_SIZE = (96, 128)  # (W, H), as bench/learning_curve.py

# name -> (graph optimisation level, quantization: None | (method, reduce_range))
ORT_SETTINGS: dict[str, tuple[str, tuple[str, bool] | None]] = {
    "ort fp32 basic": ("basic", None),
    "ort fp32 extended": ("extended", None),
    "ort fp32 all": ("all", None),
    "ort int8 dynamic": ("all", ("dynamic", False)),
    "ort int8 dynamic reduce-range": ("all", ("dynamic", True)),
    "ort int8 static QDQ": ("all", ("static", False)),
}


def machine_load() -> dict:
    return {"loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()], "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def build_onnx_files(model: torch.nn.Module, folder: Path, calibration: list, reuse: bool = False) -> dict[str, Path]:
    """fp32 export plus the three int8 variants -> {quantization key: file}; `reuse` keeps files already there
    (the ap part's work dir holds one trained model)."""
    fp32 = folder / "model.onnx"
    if not (reuse and fp32.is_file()):
        export_onnx(model, fp32)
    files = {"fp32": fp32}
    for method, reduce_range in {q for _, q in ORT_SETTINGS.values() if q is not None}:
        name = f"int8_{method}{'_rr' if reduce_range else ''}"
        if reuse and (folder / f"{name}.onnx").is_file():
            files[name] = folder / f"{name}.onnx"
            continue
        files[name] = quantize_onnx(fp32, folder / f"{name}.onnx", method=method, reduce_range=reduce_range,
                                    calibration=calibration if method == "static" else None)
    return files


def ort_models(files: dict[str, Path], threads: int) -> dict[str, OnnxPoseModel]:
    models = {}
    for name, (level, quantization) in ORT_SETTINGS.items():
        key = "fp32" if quantization is None else f"int8_{quantization[0]}{'_rr' if quantization[1] else ''}"
        models[name] = OnnxPoseModel(files[key], graph_optimization=level, intra_op_threads=threads)
    return models


# ---------------------------------------------------------------------------------------------- speed


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    ours = build_model("vitpose-b").eval()
    with torch.no_grad():  # trained-like decoder so heatmaps are not ~0 and the differences mean something
        for p in ours.keypoint_head.parameters():
            p.normal_(0, 0.02)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(args.batch, 3, 256, 192)
    load_start = machine_load()
    flops_per_crop = forward_flops(ours, x[:1])
    native_bf16 = cpu_has_native_bf16()
    # without native bf16 a 2048^3 bf16 matmul takes minutes (emulated); a 512^3 one shows the same rate
    peaks = {"fp32": matmul_peak_gflops(torch.float32),
             "bf16": matmul_peak_gflops(torch.bfloat16, *(() if native_bf16 else (512, 2)))}
    print(f"matmul peak fp32 {peaks['fp32']:.0f} / bf16 {peaks['bf16']:.0f} GFLOP/s, native bf16: {native_bf16}",
          flush=True)

    runners = []  # (side, setting, run(x) -> heatmaps)
    torch_settings = ["fp32"] + (["bf16-weights"] if native_bf16 else [])
    for setting in torch_settings:
        model = build_model("vitpose-b")
        model.load_state_dict(state)  # identical weights on every side
        runners.append(("torch", setting, make_runner("ours", model, setting, False)))
    hf_settings = [("fp32", "sdpa"), ("fp32", "eager")] + ([("bf16-weights", "eager")] if native_bf16 else [])
    for setting, attn in hf_settings:
        runners.append((f"transformers-{attn}", setting,
                        make_runner("hf", build_hf_model(ours.config, state, attn_implementation=attn), setting, True)))
    if args.compile:  # torch.compile with inductor freezing, fp32 (bf16 where the CPU has it), both sides
        dtype = torch.bfloat16 if native_bf16 else torch.float32
        model = build_model("vitpose-b")
        model.load_state_dict(state)
        compiled = optimize_for_inference(model, dtype, compile=True)
        runners.append(("torch", f"{'bf16' if native_bf16 else 'fp32'}-compiled", _compiled_runner(compiled, dtype)))
        hf = build_hf_model(ours.config, state, attn_implementation="sdpa").to(dtype)
        hf_compiled = torch.compile(hf, dynamic=True, options={"freezing": True})
        runners.append(("transformers-sdpa", f"{'bf16' if native_bf16 else 'fp32'}-compiled",
                        _compiled_runner(hf_compiled, dtype, hf=True)))

    # the files depend only on the seeded weights, so a rerun (another --threads) reuses them from --work
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as scratch:
        folder = Path(args.work) / "vitpose_b_onnx" if args.reuse_onnx else Path(scratch)
        # calibration for static int8: random crops (speed does not depend on the ranges; AP uses train crops)
        calibration = [torch.randn(4, 3, 256, 192).numpy() for _ in range(2)]
        started = time.perf_counter()
        files = build_onnx_files(ours, folder, calibration, reuse=args.reuse_onnx)
        print(f"export + quantization {time.perf_counter() - started:.0f} s", flush=True)
        for name, runtime_model in ort_models(files, args.threads).items():
            runners.append(("onnxruntime", name.removeprefix("ort "), _ort_runner(runtime_model)))

        reference = runners[0][2](x[:2])
        accuracy = {}
        for side, setting, run in runners:  # also the warm-up (and compilation) of every setting
            accuracy[(side, setting)] = float((run(x[:2]) - reference).abs().max() / reference.abs().max())
        samples: dict[tuple[str, str], list[float]] = {(side, setting): [] for side, setting, _ in runners}
        for round_index in range(args.rounds):
            for side, setting, run in runners:
                samples[(side, setting)].append(time_batch(run, x, 1))
            print(f"round {round_index + 1}/{args.rounds}: "
                  + ", ".join(f"{s}/{st} {v[-1]:.2f}" for (s, st), v in samples.items()), flush=True)

    rows = []
    for (side, setting), values in samples.items():
        crops_per_s = statistics.median(values)
        peak = peaks["bf16" if "bf16" in setting else "fp32"]
        rows.append({"impl": side, "setting": setting, "crops_per_s": round(crops_per_s, 3),
                     "gflops": round(crops_per_s * flops_per_crop / 1e9, 1),
                     "fraction_of_fp32_peak": round(crops_per_s * flops_per_crop / 1e9 / peaks["fp32"], 3),
                     "fraction_of_own_peak": round(crops_per_s * flops_per_crop / 1e9 / peak, 3),
                     "rel_diff_vs_torch_fp32": accuracy[(side, setting)],
                     "samples": [round(v, 3) for v in values]})
    update_results(f"speed_threads{args.threads}", {
        "command": f"python bench/bench_onnx.py speed --batch {args.batch} --rounds {args.rounds} --threads {args.threads}"
                   + (" --reuse-onnx" if args.reuse_onnx else "")
                   + (" --compile" if args.compile else ""), "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "onnxruntime": _ort_version(),
        "model": "vitpose-b 256x192, random weights", "batch": args.batch, "flops_per_crop": flops_per_crop,
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()}, "native_bf16": native_bf16,
        "cpu_flags": _cpu_flags(), "load_start": load_start, "load_end": machine_load(), "rows": rows})


def _compiled_runner(model, dtype: torch.dtype, hf: bool = False):
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = model(pixel_values=x.to(dtype)).heatmaps if hf else model(x.to(dtype))
        return out.float()

    return run


def _ort_runner(runtime_model: OnnxPoseModel):
    def run(x: torch.Tensor) -> torch.Tensor:
        return runtime_model(x)

    return run


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return []
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or "vnni" in f or "bf16" in f)


# ------------------------------------------------------------------------------------------------- ap


def make_data(work: Path, train_images: int, val_images: int) -> None:
    """Synthetic train/val COCO sets and their Parquet shards, on a private Ray (own temp dir, no dashboard)."""
    if (work / "shards" / "manifest.json").is_file():
        return
    import ray

    from pipelines.shard.config import ShardConfig, ShardSource
    from pipelines.shard.crops import CropConfig
    from pipelines.shard.run import run_shard, write_synthetic_dataset
    from vitpose_core.synthetic import SyntheticConfig

    sources = []
    for split, num_images, seed in (("train", train_images, 0), ("val", val_images, 1)):
        root = work / f"synthetic_{split}"
        annotations = write_synthetic_dataset(str(root), SyntheticConfig(num_images=num_images, seed=seed), split)
        sources.append(ShardSource(annotations=annotations, images=str(root / "images"), dataset="coco", split=split))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray_bench_onnx_"))
    try:
        run_shard(ShardConfig(sources=tuple(sources), out=str(work / "shards"),
                              crop=CropConfig(width=144, height=192), rows_per_file=1024))
    finally:
        ray.shutdown()


def train_tiny(work: Path, args: argparse.Namespace) -> dict:
    """vitpose-tiny trained from scratch with the engine (fp32 unless the CPU has native bf16)."""
    from learning_curve import prefetch, train_stream

    from pipelines.data import StreamConfig
    from vitpose_core.checkpoint import save_checkpoint
    from vitpose_core.engine import EngineConfig, FinetuneTask, train_step
    from vitpose_core.optim import build_adamw, build_scheduler

    checkpoint = work / "tiny_checkpoint"
    record_path = work / "train_record.json"
    if checkpoint.is_dir() and record_path.is_file():
        return json.loads(record_path.read_text())
    torch.manual_seed(0)
    model = build_model("vitpose-tiny", img_size=TINY_INPUT_SIZE[::-1])
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, total_steps=args.steps, warmup_steps=max(1, args.steps // 10),
                                min_ratio=0.01)
    engine = EngineConfig(precision="bf16" if cpu_has_native_bf16() else "fp32", max_grad_norm=1.0)
    stream = StreamConfig(input_size=TINY_INPUT_SIZE, sigma=1.5, rotation_factor=30.0)
    train_seconds, step, loss = 0.0, 0, float("nan")
    cpu_start = time.process_time()  # CPU seconds of every thread of this process: the budget on a shared machine
    for batch in prefetch(train_stream(work, stream, args.batch_size, seed=0)):
        result = train_step(model, FinetuneTask(), batch, optimizer, scheduler, engine, step)
        step, train_seconds, loss = result.step, train_seconds + result.seconds, result.loss
        if step % 25 == 0:
            print(f"train step {step} loss {loss:.5f} {train_seconds:.0f} s", flush=True)
        if step >= args.steps or time.process_time() - cpu_start > args.train_minutes * 60:
            break
    save_checkpoint(model, checkpoint)
    record = {"steps": step, "train_seconds": round(train_seconds, 1), "final_loss": loss,
              "cpu_seconds": round(time.process_time() - cpu_start, 1),
              "batch_size": args.batch_size, "precision": engine.precision, "schedule_steps": args.steps}
    record_path.write_text(json.dumps(record))
    return record


def ap(args: argparse.Namespace) -> None:
    from pipelines.data import StreamConfig, iter_pose_batches
    from vitpose_core.checkpoint import load_model
    from vitpose_core.codec import UDPHeatmapCodec
    from vitpose_core.engine import EngineConfig, evaluate_coco_ap
    from vitpose_core.evaluation import load_ground_truth
    from vitpose_core.keypoints import COCO

    work = Path(args.work)
    load_start = machine_load()
    started = time.perf_counter()
    make_data(work, args.train_images, args.val_images)
    data_seconds = time.perf_counter() - started
    training = train_tiny(work, args)
    model = load_model(work / "tiny_checkpoint").eval()
    shards = str(work / "shards")
    stream = StreamConfig(input_size=TINY_INPUT_SIZE, sigma=1.5, augment=False)
    # calibration for static int8: plain (unaugmented) *train* crops, never the val crops it is scored on
    calibration = []
    for batch in iter_pose_batches(shards, stream, batch_size=32, split="train"):
        calibration.append(batch["image"].numpy())
        if len(calibration) == 8:
            break
    files = build_onnx_files(model, work / "onnx", calibration, reuse=True)

    codec = UDPHeatmapCodec(TINY_INPUT_SIZE, stream.heatmap_size, 1.5)
    ground_truth = load_ground_truth(work / "synthetic_val" / "annotations" / "person_keypoints_val.json")
    # no transformers row: its ViTPose decoder has a fixed 256 channels, the tiny preset's has 128
    settings: dict[str, tuple[torch.nn.Module, str]] = {"torch fp32": (model, "fp32")}
    if not args.skip_bf16:
        settings["torch bf16-autocast"] = (model, "bf16")
    settings.update({name: (runtime_model, "fp32") for name, runtime_model in ort_models(files, args.threads).items()})
    results = {}
    for name, (evaluated, precision) in settings.items():
        started = time.perf_counter()
        val = iter_pose_batches(shards, stream, batch_size=64, split="val")
        stats, _ = evaluate_coco_ap(evaluated, val, codec, ground_truth, COCO, EngineConfig(precision=precision),
                                    flip_test=True)
        results[name] = {k: round(v, 4) for k, v in stats.items() if k in ("AP", "AP50", "AP75", "AR")}
        results[name]["eval_seconds"] = round(time.perf_counter() - started, 1)
        print(name, results[name], flush=True)
    update_results("ap", {
        "command": (f"python bench/bench_onnx.py ap --steps {args.steps} --train-minutes {args.train_minutes} "
                    f"--batch-size {args.batch_size} --threads {args.threads}" + (" --skip-bf16" if args.skip_bf16 else "")),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": f"vitpose-tiny {TINY_INPUT_SIZE[1]}x{TINY_INPUT_SIZE[0]}, trained from scratch",
        "data": {"train_images": args.train_images, "val_images": args.val_images, "seconds": round(data_seconds)},
        "training": training, "load_start": load_start, "load_end": machine_load(), "settings": results})


# --------------------------------------------------------------------------------------------- report


def update_results(part: str, payload: dict) -> None:
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {}
    results[part] = payload
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    RESULTS_MD.write_text(render_markdown(results))
    print(RESULTS_MD.read_text())


def report(args: argparse.Namespace) -> None:
    RESULTS_MD.write_text(render_markdown(json.loads(RESULTS_JSON.read_text())))
    print(RESULTS_MD.read_text())


def _ap_key(impl: str, setting: str) -> str:
    """The ap-part name of a speed row (the same recipe applied to the trained tiny model)."""
    if impl == "onnxruntime":
        return f"ort {setting}"
    if impl == "torch" and setting == "bf16-weights":
        return "torch bf16-autocast"
    return f"{impl} {setting}"


def render_markdown(results: dict) -> str:
    lines = ["# onnxruntime vs torch vs transformers on this CPU", ""]
    ap_part = results.get("ap")
    ap_settings = ap_part["settings"] if ap_part else {}
    reference_ap = ap_settings.get("torch fp32", {}).get("AP")
    if ap_part:
        lines += [f"AP: `{ap_part['command']}` ({ap_part['date']}): {ap_part['model']} "
                  f"({ap_part['training']['steps']} steps of batch {ap_part['training']['batch_size']}, "
                  f"{ap_part['training']['precision']}, {ap_part['training']['train_seconds']:.0f} s wall, "
                  f"{ap_part['training'].get('cpu_seconds', float('nan')):.0f} CPU-s), synthetic val "
                  f"split ({ap_part['data']['val_images']} images, ground-truth boxes, flip test), each speed row's "
                  f"recipe applied to it. Load at start {ap_part['load_start']['loadavg_1_5_15']}.", ""]
    for part_name in sorted(k for k in results if k.startswith("speed")):
        speed_part = results[part_name]
        rows = speed_part["rows"]
        best_hf = max((r for r in rows if r["impl"].startswith("transformers")), key=lambda r: r["crops_per_s"])
        peaks = speed_part["matmul_peak_gflops"]
        lines += [
            f"## Throughput, {speed_part['threads']} thread(s) per side", "",
            f"Speed: `{speed_part['command']}` ({speed_part['date']}, torch {speed_part['torch']}, onnxruntime "
            f"{speed_part['onnxruntime']}). {speed_part['model']}, batch {speed_part['batch']}, "
            f"{speed_part['flops_per_crop'] / 1e9:.2f} GFLOP per crop. Matmul peak measured in the run: fp32 "
            f"{peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s (native bf16: {speed_part['native_bf16']}; "
            f"CPU flags: {', '.join(speed_part['cpu_flags'])}). Machine load (1/5/15 min) at start "
            f"{speed_part['load_start']['loadavg_1_5_15']}, at end {speed_part['load_end']['loadavg_1_5_15']} "
            f"on {speed_part['load_start']['cpus']} cores: "
            + ("other jobs shared the cores, so absolute figures are low and noisy; the ratios come from "
               "interleaved rounds." if max(speed_part['load_start']['loadavg_1_5_15'][0],
                                           speed_part['load_end']['loadavg_1_5_15'][0])
               > 1.5 * speed_part['load_start']['cpus'] else "a quiet machine; the ratios come from interleaved rounds."),
            "",
        ]
        lines += ["| impl | setting | crops/s (median) | / transformers' best | % of fp32 matmul peak | "
                  "max rel. heatmap diff vs torch fp32 | val AP (tiny) | AP change (points) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ap_row = ap_settings.get(_ap_key(r["impl"], r["setting"]))
            ap_text = f"{ap_row['AP']:.4f}" if ap_row else "not measured"
            delta = (f"{100 * (ap_row['AP'] - reference_ap):+.2f}" if ap_row and reference_ap is not None else "")
            lines.append(f"| {r['impl']} | {r['setting']} | {r['crops_per_s']:.2f} | "
                         f"{r['crops_per_s'] / best_hf['crops_per_s']:.2f}x | {100 * r['fraction_of_fp32_peak']:.0f}% | "
                         f"{r['rel_diff_vs_torch_fp32']:.4f} | {ap_text} | {delta} |")
        fastest = max(rows, key=lambda r: r["crops_per_s"])
        speedup = fastest["crops_per_s"] / best_hf["crops_per_s"]
        fastest_ap = ap_settings.get(_ap_key(fastest["impl"], fastest["setting"]))
        ap_change = 100 * (fastest_ap["AP"] - reference_ap) if fastest_ap and reference_ap is not None else None
        goal_met = speedup >= 1.2 and ap_change is not None and abs(ap_change) <= 0.5
        lines += ["", f"Transformers' best: {best_hf['impl']} {best_hf['setting']} ({best_hf['crops_per_s']:.2f} crops/s). "
                  f"Fastest: {fastest['impl']} {fastest['setting']} at "
                  f"**{speedup:.2f}x** transformers' best"
                  + (f", val AP change {ap_change:+.2f} points vs torch fp32" if ap_change is not None else "")
                  + f". Goal (>= 1.2x with AP within 0.5 points): **{'met' if goal_met else 'not met'}** in this run.",
                  "",
                  "Per-round samples (crops/s): " + json.dumps({f"{r['impl']}/{r['setting']}": r["samples"] for r in rows}),
                  ""]
    if ap_part:
        lines += ["## Val AP of every setting (vitpose-tiny, synthetic val split)", "",
                  "| setting | AP | AP50 | AP75 | AR | AP change vs torch fp32 (points) | eval s |", "|---|---|---|---|---|---|---|"]
        for name, stats in ap_settings.items():
            delta = f"{100 * (stats['AP'] - reference_ap):+.2f}" if reference_ap is not None else ""
            lines.append(f"| {name} | {stats['AP']:.4f} | {stats['AP50']:.4f} | {stats['AP75']:.4f} | "
                         f"{stats['AR']:.4f} | {delta} | {stats['eval_seconds']} |")
        lines.append("")
    lines += ["## Method notes", "",
              "- Every side runs the same weights; int8 rows quantize the fp32 ONNX file with onnxruntime's own "
              "tools (`vitpose_core.export.quantize_onnx`: `quant_pre_process`, then `quantize_dynamic` with "
              "per-channel int8 weights, or `quantize_static` in QDQ format, per-channel, u8 activations). "
              "The static speed rows are calibrated on random crops (speed does not depend on the ranges); "
              "the AP rows on 8 batches of plain train crops.",
              "- `dynamic` quantizes the 48 weight MatMuls (qkv, proj, fc1, fc2 of 12 blocks; ~91% of the "
              "FLOPs) and leaves the attention products q k^T and p v in fp32; `static QDQ` quantizes all 72 "
              "MatMuls. The patch conv and the decoder stay fp32.",
              "- `reduce-range` (7-bit weights) is onnxruntime's advice for x86 without VNNI, where the u8 x s8 "
              "kernel's int16 intermediate can saturate.",
              "- Graph optimisation levels: `basic` (constant folding, redundant nodes), `extended` (+ fusions "
              "such as LayerNorm, GELU, MatMul+Add), `all` (+ layout changes); intra-op threads as the row says.",
              "- On a loaded machine the matmul peak is measured at one moment and each row at others, so a "
              "'% of peak' above 100% means the load changed, not a kernel beating the peak: read the ratios, "
              "and the per-round samples for their spread.",
              "- torch.compile rows run only with `--compile` (minutes of compilation per row on 2 busy cores); "
              "bf16 rows only on CPUs with native bf16 (AMX / AVX512-BF16): elsewhere bf16 matmuls are emulated "
              "(see the measured bf16 peak) and would take minutes per batch.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["speed", "ap", "report"], help="report: rewrite the .md from the .json")
    parser.add_argument("--batch", type=int, default=8, help="speed: crops per timed call")
    parser.add_argument("--rounds", type=int, default=3, help="speed: interleaved rounds")
    parser.add_argument("--compile", action="store_true",
                        help="speed: add torch.compile rows (minutes of compilation per row on 2 busy cores)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench_onnx"), help="ap: data, shards, checkpoint")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300, help="ap: training steps (schedule length)")
    parser.add_argument("--train-minutes", type=float, default=5.0, help="ap: stop training after this many CPU minutes")
    parser.add_argument("--batch-size", type=int, default=32, help="ap: training batch")
    parser.add_argument("--skip-bf16", action="store_true", help="ap: no torch bf16 row (slow without native bf16)")
    parser.add_argument("--reuse-onnx", action="store_true",
                        help="speed: keep the ViTPose-B ONNX files under --work and reuse them in later runs")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads and onnxruntime intra-op threads, the same for every side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"speed": speed, "ap": ap, "report": report}[args.part](args)


if __name__ == "__main__":
    main()
