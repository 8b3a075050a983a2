"""Training throughput (images/s) of ViTPose-B and the tiny preset on this CPU in bf16, with FLOP utilisation.

One training step = the engine's ``train_step`` (bf16 autocast forward, fp32 master weights,
backward, gradient clipping, fused AdamW with layer-decay groups) on random crops with heatmap
targets, so the figure is what the finetune stage's compute costs, without data loading. FLOPs of
forward + backward are counted by ``torch.utils.flop_counter`` on one step (matmuls, convs and
attention); utilisation = achieved FLOP/s / the bf16 matmul peak measured in the same process
(bench_model_throughput.matmul_peak_gflops). The load average is recorded: other processes on the
two cores lower the figures.

Run: python bench/bench_train_throughput.py [--steps 5] [--out bench/results/train_throughput.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_model_throughput import matmul_peak_gflops  # noqa: E402

from vitpose_core.engine import EngineConfig, FinetuneTask, train_step  # noqa: E402
from vitpose_core.models import build_model, count_parameters  # noqa: E402
from vitpose_core.optim import build_adamw  # noqa: E402

# (name, variant, (H, W), batch)
SETTINGS = [
    ("vitpose-tiny 128x96", "vitpose-tiny", (128, 96), 64),
    ("vitpose-tiny 256x192", "vitpose-tiny", (256, 192), 32),
    ("vitpose-b 256x192", "vitpose-b", (256, 192), 8),
]


def make_batch(model, batch: int) -> dict[str, torch.Tensor]:
    height, width = model.config.img_size
    heat_h, heat_w = model.config.heatmap_size
    k = model.config.num_keypoints
    return {"image": torch.randn(batch, 3, height, width), "target": torch.rand(batch, k, heat_h, heat_w),
            "target_weight": torch.ones(batch, k)}


def step_flops(model, batch, engine) -> int:
    """Forward + backward FLOPs of one step, as the autocast kernels see them."""
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = FinetuneTask().loss(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(variant: str, size: tuple[int, int], batch_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(variant, img_size=size, drop_path_rate=0.0)
    optimizer = build_adamw(model, lr=1e-4, layer_decay=0.75)
    engine = EngineConfig(precision="bf16", max_grad_norm=1.0)
    batch = make_batch(model, batch_size)
    flops = step_flops(model, batch, engine)
    train_step(model, FinetuneTask(), batch, optimizer, None, engine)  # warm-up: oneDNN primitive creation
    times = [train_step(model, FinetuneTask(), batch, optimizer, None, engine, i).seconds for i in range(steps)]
    seconds = statistics.median(times)
    return {"params_m": count_parameters(model) / 1e6, "batch": batch_size, "step_s": seconds,
            "images_per_s": batch_size / seconds, "gflop_per_image": flops / batch_size / 1e9,
            "achieved_gflops": flops / seconds / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_throughput.md"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    load_before = os.getloadavg()[0]
    peak = matmul_peak_gflops(torch.bfloat16)
    rows = []
    for name, variant, size, batch in SETTINGS:
        row = {"setting": name, **measure(variant, size, batch, args.steps)}
        row["utilisation"] = row["achieved_gflops"] / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
    peak_after = matmul_peak_gflops(torch.bfloat16)
    lines = [
        "# Training throughput on this CPU (bf16 autocast, engine.train_step, no data loading)",
        "",
        f"bf16 matmul peak measured in-process: {peak:.0f} GFLOP/s before, {peak_after:.0f} after; "
        f"threads {torch.get_num_threads()}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        "| setting | params (M) | batch | step (s, median) | images/s | GFLOP/image (fwd+bwd) | GFLOP/s | % of bf16 peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['params_m']:.1f} | {r['batch']} | {r['step_s']:.2f} | "
                     f"{r['images_per_s']:.1f} | {r['gflop_per_image']:.2f} | {r['achieved_gflops']:.0f} | "
                     f"{100 * r['utilisation']:.0f}% |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"peak_bf16_gflops": [peak, peak_after],
                                                               "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
