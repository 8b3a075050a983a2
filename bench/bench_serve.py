"""Load test of the pose service: throughput and p50/p99 latency at concurrency 1, 8, 32, batched vs unbatched.

    .venv/bin/python bench/bench_serve.py [--variant vitpose-tiny] [--max-requests 400] [--max-seconds 20]

Everything runs on this machine over loopback (127.0.0.1): a local Ray, the Serve app built by
`build_app` around a random-init model, and closed-loop aiohttp clients (each sends its next request
when the previous one answers). Each (mode, concurrency) cell is bounded by `--max-requests` and
`--max-seconds`. Every request is a 320x240 PNG with one person box, so one request = one crop.

Also measured, in this process: the model's offline throughput (crop forward + heatmap decode, no
HTTP) at batch size 1 and at the served `max_batch_size`, with the same torch thread count as the
model replica. Results go to bench/results/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "serve.md"
CONCURRENCY = (1, 8, 32)


def offline_crops_per_s(checkpoint: Path, batch_size: int, threads: int, seconds: float = 6.0) -> float:
    """Crops/s of run_model + decode_to_image on ready crops, at `batch_size`, with `threads` torch threads."""
    import torch

    from vitpose_core.checkpoint import load_model
    from vitpose_core.codec import UDPHeatmapCodec
    from vitpose_core.inference import decode_to_image, model_input_size, run_model

    torch.set_num_threads(threads)
    model = load_model(checkpoint)
    width, height = model_input_size(model)
    codec = UDPHeatmapCodec((width, height))
    crops = torch.randn(batch_size, 3, height, width)
    crop_to_image = np.tile(np.eye(2, 3), (batch_size, 1, 1))
    decode_to_image(run_model(model, crops), crop_to_image, codec)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        decode_to_image(run_model(model, crops), crop_to_image, codec)
        done += batch_size
    return done / (time.perf_counter() - start)


async def load_cell(url: str, body: bytes, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    """Closed-loop load at `concurrency`: latencies of successful requests, status counts, throughput."""
    import aiohttp

    latencies: list[float] = []
    codes: dict[int, int] = {}
    sent = 0
    deadline = time.monotonic() + max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < max_requests and time.monotonic() < deadline:
            sent += 1
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/pose", data=body, params={"boxes": "[[60, 20, 200, 210]]"},
                                        headers={"Content-Type": "image/png"}) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError:
                status = -1
            codes[status] = codes.get(status, 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "concurrency": concurrency, "requests": sum(codes.values()), "ok": len(latencies), "codes": codes,
        "throughput": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
    }


def deploy(checkpoint: Path, name: str, max_batch_size: int, threads: int, args) -> None:
    """Deploy the app as Serve application `name` under route prefix /`name`."""
    from ray import serve

    from pipelines.serve.app import build_app

    config = {
        "model": {"checkpoint": str(checkpoint)},
        "batching": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": args.batch_wait},
        "resources": {"model_num_cpus": 0.5, "ingress_num_cpus": 0.25, "torch_threads": threads},
        "max_ongoing_requests": 64, "max_queued_requests": 256, "request_timeout_s": 60, "dtype": args.dtype,
    }
    serve.run(build_app(config), name=name, route_prefix=f"/{name}", blocking=False)


def run_cells(base_url: str, body: bytes, args) -> dict[str, list[dict]]:
    """Both apps are up; per concurrency, the batched then the unbatched cell back to back, so a change
    in background load on the machine hits both modes alike."""
    results: dict[str, list[dict]] = {"batched": [], "unbatched": []}
    for mode in results:  # warm-up: connections, first batches
        asyncio.run(load_cell(f"{base_url}/{mode}", body, 4, 40, 10))
    for concurrency in CONCURRENCY:
        for mode, cells in results.items():
            cell = asyncio.run(load_cell(f"{base_url}/{mode}", body, concurrency, args.max_requests,
                                         args.max_seconds))
            cell["mode"] = mode
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="vitpose-tiny")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait", type=float, default=0.005)
    parser.add_argument("--max-requests", type=int, default=400, help="per (mode, concurrency) cell")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="per (mode, concurrency) cell")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the model replica and offline (1: OpenMP barriers collapse "
                             "when the 2 cores are shared with the proxy, ingress and client)")
    parser.add_argument("--dtype", default="fp32", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import torch
    from ray import serve

    from pipelines.serve.client import encode_png
    from vitpose_core.checkpoint import save_checkpoint
    from vitpose_core.models.vitpose import build_model

    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_model(args.variant), Path(tempfile.mkdtemp(prefix="bench-serve-")) / "m")
    body = encode_png(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8))

    offline = {b: offline_crops_per_s(checkpoint, b, args.threads) for b in sorted({1, args.max_batch_size})}
    print("offline crops/s", offline, flush=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    deploy(checkpoint, "batched", args.max_batch_size, args.threads, args)
    deploy(checkpoint, "unbatched", 1, args.threads, args)
    load_before, started = os.getloadavg()[0], time.monotonic()
    results = run_cells(f"http://127.0.0.1:{args.port}", body, args)
    batched, unbatched = results["batched"], results["unbatched"]
    wall, load_after = time.monotonic() - started, os.getloadavg()[0]
    serve.shutdown()
    ray.shutdown()
    # offline again after the load, and keep the better of the two: background load on a shared box
    # only ever lowers a measurement
    after = {b: offline_crops_per_s(checkpoint, b, args.threads) for b in offline}
    print("offline crops/s after", after, flush=True)
    offline = {b: max(offline[b], after[b]) for b in offline}
    write_report(args, offline, batched, unbatched, wall, (load_before, load_after))
    return 0


def write_report(args, offline: dict[int, float], batched: list[dict], unbatched: list[dict], wall: float,
                 load: tuple[float, float]) -> None:
    rows = ["| mode | concurrency | requests | 200 | other codes | throughput (req/s) | p50 (ms) | p99 (ms) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, cells in (("batched", batched), ("unbatched", unbatched)):
        for c in cells:
            other = {k: v for k, v in c["codes"].items() if k != 200} or "-"
            size = args.max_batch_size if name == "batched" else 1
            rows.append(f"| {name} (max_batch_size={size}) | {c['concurrency']} | {c['requests']} | "
                        f"{c['ok']} | {other} | {c['throughput']:.1f} | {c['p50_ms']:.0f} | {c['p99_ms']:.0f} |")
    at32 = {name: next(c for c in cells if c["concurrency"] == 32) for name, cells in
            (("batched", batched), ("unbatched", unbatched))}
    ratio = at32["batched"]["throughput"] / max(at32["unbatched"]["throughput"], 1e-9)
    served_vs_offline = at32["batched"]["throughput"] / offline[args.max_batch_size]
    unbatched_vs_offline = at32["unbatched"]["throughput"] / offline[1]
    text = f"""# Serve load test (`bench/bench_serve.py`)

Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch threads {args.threads}; model
{args.variant} (random init), dtype {args.dtype}; both apps deployed side by side (one model replica and
one ingress replica each, local Ray with num_cpus=2), cells run back to back per concurrency. Client: closed-loop aiohttp over 127.0.0.1 in the same machine (it shares the 2 cores).
Each request: a 320x240 PNG with one box (one crop). Cells bounded by {args.max_requests} requests or
{args.max_seconds:.0f} s; batch_wait_timeout_s {args.batch_wait}. Total load time {wall:.0f} s.
1-minute load average before / after the load: {load[0]:.1f} / {load[1]:.1f} (on 2 cores; other work on the
machine competes with the benchmark when this is far above 2).

{chr(10).join(rows)}

Offline model throughput (forward + heatmap decode on ready crops, no HTTP, same threads; the better of a
measurement before and one after the load):
{", ".join(f"batch {b}: {v:.1f} crops/s" for b, v in offline.items())}.

- Batched / unbatched throughput at concurrency 32: **{ratio:.2f}x** (goal >= 2.5x).
- Served (batched, concurrency 32) / offline at batch {args.max_batch_size}: **{served_vs_offline:.0%}** (goal >= 80%).
- Served (unbatched, concurrency 32) / offline at batch 1: {unbatched_vs_offline:.0%}.
"""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
