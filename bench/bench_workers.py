"""Data-parallel fine-tuning gives the same model: 1 Ray Train worker vs 2 at the same global batch.

    .venv/bin/python bench/bench_workers.py [--workdir /tmp/vitpose_bench_workers] [--epochs 6]

Runs the real finetune stage (`pipelines.finetune.run.run_finetune`: Ray Train, DDP over gloo, Ray Data
shards) on synthetic shards, tiny preset at 128x96: one run with 1 worker, one with 2 workers
(`data.batch_size` is the global batch, split evenly over the workers), for each seed of `--seeds`:
the seed-to-seed spread is the run-to-run noise the 1-vs-2-worker difference is judged against.
All runs take the same number of optimiser steps with the same schedule.

Writes bench/results/workers.md (and .json): val AP per epoch and steps of each run, and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vitpose_bench_workers")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    runs = [(f"{workers} worker{'s' * (workers > 1)}, seed {seed}", workers, seed)
            for seed in args.seeds for workers in (1, 2)]

    from bench_distill import common_sections, curve, make_shards, open_workdir

    from pipelines.config import build_config
    from pipelines.finetune.config import FinetuneConfig
    from pipelines.finetune.run import run_finetune

    workdir, tracking_uri = open_workdir(args.workdir)
    shards = str(workdir / "shards") if (workdir / "shards" / "manifest.json").exists() else \
        make_shards(workdir, args.train_images, args.val_images)

    rows = []
    for name, workers, seed in runs:
        slug = name.replace(", ", "_").replace(" ", "_")
        sections = common_sections(args.epochs, tracking_uri, args.batch_size, args.lr, experiment="bench-workers")
        config = build_config(FinetuneConfig, {
            **sections, "model": {"variant": "vitpose-tiny", "input_size": [96, 128]},
            "data": {**sections["data"], "shards": shards},
            "scaling": {"num_workers": workers, "cpus_per_worker": 0.5}, "seed": seed,
            "checkpoint": {"storage_path": str(workdir / "runs"), "name": slug}})
        start = time.time()
        result = run_finetune(config)
        rows.append({"run": name, "workers": workers, "seed": seed, "steps": result.metrics["steps"],
                     "best_val_AP": result.metrics["ap"], "curve": curve(result.outputs["mlflow_run_id"], tracking_uri),
                     "seconds": time.time() - start})
        print(json.dumps(rows[-1]), flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = ["# 1 vs 2 Ray Train workers at the same global batch (synthetic data, CPU)", "",
             f"`bench/bench_workers.py` with {vars(args)}: vitpose-tiny at 128x96, DDP over gloo, "
             "the same schedule and number of optimiser steps in every run.", "",
             "| run | steps | best val AP | last val AP | val AP per epoch | wall (s) |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['run']} | {row['steps']} | {row['best_val_AP']:.4f} | {row['curve'][-1]:.4f} | "
                     f"{', '.join(f'{v:.3f}' for v in row['curve'])} | {row['seconds']:.0f} |")
    last = {(row["workers"], row["seed"]): row["curve"][-1] for row in rows}
    lines.append("")
    for seed in args.seeds:
        lines.append(f"- seed {seed}: 2 workers - 1 worker = {last[2, seed] - last[1, seed]:+.4f} last-epoch AP")
    for workers in (1, 2):
        values = [last[workers, seed] for seed in args.seeds]
        lines.append(f"- {workers} worker(s): mean {sum(values) / len(values):.4f}, seed-to-seed range "
                     f"{max(values) - min(values):.4f}")
    (RESULTS / "workers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
