"""ViTPose-B inference throughput on this CPU: ours vs Hugging Face transformers, side by side.

Same weights (ours converted with ``vitpose_core.interop``), same batch, same input (256x192), in one
process with the settings interleaved round by round, so load from other processes hits both
sides alike; we report medians and the ratio. FLOP utilisation is against the matmul peak measured
in the same run (a large square matmul in fp32 and in bf16).

Settings:
  fp32          eager fp32 forward under torch.inference_mode
  bf16-autocast torch.autocast("cpu", bfloat16) around the fp32 model (the peer's documented mode)
  bf16-weights  model cast to bfloat16 once (no per-call weight casts, bf16 LayerNorm/GELU/softmax)
  bf16-compiled bf16 weights + torch.compile(dynamic=True, inductor freezing): ours through
                `vitpose_core.inference.optimize_for_inference`, the peer through the same
                torch.compile call, so the comparison is of the models, not of the recipe

Run: python bench/bench_model_throughput.py [--batch 16] [--rounds 5] [--out bench/results/model_throughput.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitpose_core import build_model  # noqa: E402
from vitpose_core.inference import optimize_for_inference  # noqa: E402
from vitpose_core.interop import build_hf_model  # noqa: E402


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 6) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up (oneDNN kernel selection)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops()


def make_runner(name: str, model: torch.nn.Module, setting: str, is_hf: bool):
    model = model.eval()
    if setting == "bf16-weights":
        model = model.to(torch.bfloat16)
    elif setting == "bf16-compiled":
        if is_hf:
            model = torch.compile(model.to(torch.bfloat16), dynamic=True, options={"freezing": True})
        else:
            model = optimize_for_inference(model, torch.bfloat16, compile=True)

    def run(x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if setting == "bf16-autocast" else contextlib.nullcontext()
        inp = x.to(torch.bfloat16) if setting in ("bf16-weights", "bf16-compiled") else x
        with torch.inference_mode(), ctx:
            out = model(pixel_values=inp).heatmaps if is_hf else model(inp)
        return out.float()

    run.__name__ = f"{name}/{setting}"
    return run


def time_batch(run, x: torch.Tensor, iters: int) -> float:
    run(x)  # warm-up for this setting
    start = time.perf_counter()
    for _ in range(iters):
        run(x)
    return x.shape[0] * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2, help="batches per timing")
    parser.add_argument("--out", default="bench/results/model_throughput.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    ours = build_model("vitpose-b").eval()
    with torch.no_grad():  # trained-like decoder so heatmaps are not ~0 and the comparison means something
        for p in ours.keypoint_head.parameters():
            p.normal_(0, 0.02)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    x = torch.randn(args.batch, 3, 256, 192)

    flops_per_crop = forward_flops(ours, x[:1])
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}

    settings = ["fp32", "bf16-autocast", "bf16-weights", "bf16-compiled"]
    runners = []
    for setting in settings:
        model_ours = build_model("vitpose-b")
        model_ours.load_state_dict(state)  # identical weights on both sides
        runners.append(("ours", setting, make_runner("ours", model_ours, setting, False)))
    # the peer in its own settings: fused (sdpa) and eager attention, autocast and bf16 weights
    for setting, attn in [("fp32", "sdpa"), ("fp32", "eager"), ("bf16-autocast", "eager"), ("bf16-autocast", "sdpa"),
                          ("bf16-weights", "sdpa"), ("bf16-weights", "eager"), ("bf16-compiled", "sdpa")]:
        hf_model = build_hf_model(ours.config, state, attn_implementation=attn)
        runners.append((f"transformers-{attn}", setting, make_runner("hf", hf_model, setting, True)))

    # accuracy: every setting's heatmaps against our fp32 heatmaps. The first call of a compiled
    # setting compiles it (~1 min each on 2 cores); the timed rounds below see warm kernels.
    reference = runners[0][2](x[:4])
    accuracy = {}
    for side, setting, run in runners:
        out = run(x[:4])
        accuracy[(side, setting)] = {
            "max_abs_diff": float((out - reference).abs().max()),
            "rel_diff": float((out - reference).abs().max() / reference.abs().max()),
        }

    samples: dict[tuple[str, str], list[float]] = {(s, st): [] for s, st, _ in runners}
    for round_index in range(args.rounds):
        for side, setting, run in runners:
            iters = 1 if setting == "fp32" else args.iters
            samples[(side, setting)].append(time_batch(run, x, iters))
        print(f"round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{s}/{st} {v[-1]:.2f}" for (s, st), v in samples.items()), flush=True)

    rows = []
    for (side, setting), values in samples.items():
        crops_per_s = statistics.median(values)
        peak = peaks["fp32" if setting == "fp32" else "bf16"]
        rows.append({"impl": side, "setting": setting, "crops_per_s": crops_per_s,
                     "gflops": crops_per_s * flops_per_crop / 1e9,
                     "utilisation": crops_per_s * flops_per_crop / 1e9 / peak, **accuracy[(side, setting)]})
    best_ours = max((r for r in rows if r["impl"] == "ours"), key=lambda r: r["crops_per_s"])
    best_hf = max((r for r in rows if r["impl"].startswith("transformers")), key=lambda r: r["crops_per_s"])
    ratio = best_ours["crops_per_s"] / best_hf["crops_per_s"]
    eager_hf = [r for r in rows if r["impl"].startswith("transformers") and r["setting"] != "bf16-compiled"]
    best_hf_eager = max(eager_hf, key=lambda r: r["crops_per_s"])
    by_setting = {(r["impl"], r["setting"]): r["crops_per_s"] for r in rows}

    def best_hf_in(setting: str) -> float:
        return max(v for (impl, st), v in by_setting.items() if impl.startswith("transformers") and st == setting)

    lines = [
        "# ViTPose-B inference throughput, 256x192, this CPU",
        "",
        f"Command: `python bench/bench_model_throughput.py --batch {args.batch} --rounds {args.rounds}` "
        f"({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
        "",
        f"Forward FLOPs per crop (FlopCounterMode): {flops_per_crop / 1e9:.2f} GFLOP. "
        f"Measured matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s.",
        "",
        "| impl | setting | crops/s (median) | GFLOP/s | % of peak | max rel. heatmap diff vs our fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['setting']} | {r['crops_per_s']:.2f} | {r['gflops']:.0f} | "
                     f"{100 * r['utilisation']:.0f}% | {r['rel_diff']:.4f} |")
    lines += ["", f"Best ours ({best_ours['setting']}) / best transformers ({best_hf['impl']} {best_hf['setting']}): **{ratio:.2f}x**",
              "",
              f"Best ours / best transformers without torch.compile ({best_hf_eager['impl']} {best_hf_eager['setting']}): "
              f"**{best_ours['crops_per_s'] / best_hf_eager['crops_per_s']:.2f}x**",
              "",
              "Same setting on both sides (ours / transformers' faster attention implementation in that setting): "
              + ", ".join(f"{setting} {by_setting[('ours', setting)] / best_hf_in(setting):.2f}x"
                          for setting in settings),
              "", "Per-round samples (crops/s): " + json.dumps({f"{s}/{st}": [round(v, 2) for v in vals]
                                                                for (s, st), vals in samples.items()})]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
