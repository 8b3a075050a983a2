"""Which attention kernel is faster on this CPU: PyTorch's fused SDPA or the explicit matmul-softmax-matmul.

For the sequence lengths ViTPose meets (48 tokens: the tiny preset at 128x96; 64: an 8x8 window;
192: 256x192; 432: 384x288; 972: 576x432), 12 heads of 64 channels, in bf16 and fp32, inference and
forward + backward. Both kernels run interleaved in one process (best of several repeats each), so
the ratio is robust to load from other processes. The result sets
`vitpose_core.models.attention.EXPLICIT_ATTENTION_MAX_TOKENS`.

Run: python bench/bench_attention_kernels.py [--out bench/results/attention_kernels.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CASES = [(64, 48), (64, 64), (16, 192), (8, 432), (2, 972)]  # (batch, tokens): ~constant work per row
HEADS, HEAD_DIM = 12, 64


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def explicit(q, k, v):
    return ((q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v


def best_ms(kernel, q, k, v, train: bool, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        with torch.inference_mode(not train):
            start = time.perf_counter()
            out = kernel(q, k, v)
            if train:
                out.float().square().sum().backward()
            best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/attention_kernels.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = ["# Attention kernels on this CPU: fused SDPA vs explicit softmax", "",
             f"Command: `python bench/bench_attention_kernels.py --repeats {args.repeats}` "
             f"({time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads); "
             f"{HEADS} heads x {HEAD_DIM} channels, best of {args.repeats}.", "",
             "| dtype | pass | batch x tokens | fused SDPA (ms) | explicit (ms) | fused / explicit | "
             "max abs error vs fp64: fused | explicit |",
             "|---|---|---|---|---|---|---|---|"]
    for dtype in (torch.bfloat16, torch.float32):
        for train in (False, True):
            for batch, tokens in CASES:
                q, k, v = (torch.randn(batch, HEADS, tokens, HEAD_DIM, dtype=dtype, requires_grad=train)
                           for _ in range(3))
                for kernel in (fused, explicit):  # warm-up: oneDNN kernel selection, allocator
                    best_ms(kernel, q, k, v, train, 1)
                times = {kernel.__name__: best_ms(kernel, q, k, v, train, args.repeats) for kernel in (fused, explicit)}
                with torch.no_grad():
                    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
                    errors = [float((kernel(q, k, v).double() - reference).abs().max()) for kernel in (fused, explicit)]
                row = (f"| {str(dtype).removeprefix('torch.')} | {'fwd+bwd' if train else 'inference'} | "
                       f"{batch} x {tokens} | {times['fused']:.1f} | {times['explicit']:.1f} | "
                       f"{times['fused'] / times['explicit']:.2f}x | {errors[0]:.1e} | {errors[1]:.1e} |")
                lines.append(row)
                print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
