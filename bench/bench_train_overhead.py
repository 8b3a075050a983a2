"""Seconds per training step: the finetune stage in a Ray Train worker vs the same loop in one plain process.

    RAY_AUTH_MODE=disabled .venv/bin/python bench/bench_train_overhead.py [--steps 72] [--arms plain,ray]

The embedded default's finetune section (pipelines/configs/local.yaml: vitpose-tiny at 96x128, batch 32,
2 torch threads) on the embedded default's synthetic shards (400 train images), from scratch:

- plain: this process runs the worker's loop by hand: `iter_pose_batches` over the shard files (pyarrow,
  no Ray), the background `prefetch` thread, `run_epoch` with the stage's task, optimiser and schedule.
- ray: `run_finetune` with the same config: one Ray Train worker on a local 2-CPU Ray, the rows streamed
  by Ray Data into the worker, checkpoints every epoch, MLflow logging, validation once at the end.
- ray+<name>: the ray arm with one setting changed (`--variants`), each in a fresh Ray (own process).

Each arm reports the median wall seconds per step over its epochs after the first (the first pays for
start-up, the shuffle buffer and allocator warm-up) and the median seconds of the step's compute alone
(`StepResult.seconds`: forward, backward, optimiser). Steps minus compute = time the step waited for
its batch or lost to other threads. The arms run one after another on the same machine; run it on a
quiet box (the load average is recorded before and after each arm).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

RESULTS = ROOT / "bench" / "results"

# name -> environment of the Ray cluster (and so of its workers) for the ray+<name> arms
VARIANTS: dict[str, dict[str, str]] = {
    "parquet_v2": {"RAY_DATA_USE_DATASOURCE_V2": "1"},  # Ray Data's default reader (read_shards picks V1)
    "omp_passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "nice0": {"RAY_worker_niceness": "0"},
}


def finetune_config(shards: str, workdir: Path, steps: int, name: str):
    """local.yaml's finetune section, pointed at the bench's shards and sized to `steps`."""
    import yaml

    from pipelines.config import build_config
    from pipelines.finetune.config import FinetuneConfig

    section = yaml.safe_load((ROOT / "pipelines" / "configs" / "local.yaml").read_text())["finetune"]
    section["data"]["shards"] = shards
    section["schedule"]["max_steps"] = steps
    section["eval"] = {**section["eval"], "num_visualized": 0, "every_n_epochs": 1000}  # once, at the end
    section["checkpoint"] = {"storage_path": str(workdir / "runs"), "name": name, "every_n_steps": 10_000}
    section["tracking"] = {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "bench-train-overhead",
                           "system_metrics_every_s": None}
    return build_config(FinetuneConfig, section)


def make_shards(workdir: Path) -> str:
    """The embedded default's shard section (synthetic people), written once under the workdir."""
    import yaml

    from pipelines.config import build_config
    from pipelines.shard.config import ShardConfig
    from pipelines.shard.run import run_shard

    out = workdir / "shards"
    if not (out / "manifest.json").exists():
        section = yaml.safe_load((ROOT / "pipelines" / "configs" / "local.yaml").read_text())["shard"]
        run_shard(build_config(ShardConfig, {**section, "out": str(out)}))
    return str(out)


def plain_arm(shards: str, workdir: Path, steps: int) -> dict:
    """The Train worker's loop (pipelines.training.loop) without Ray: same model, task, stream, optimiser."""
    from itertools import islice

    import torch

    from pipelines.data import iter_pose_batches, prefetch, shard_keypoint_sets
    from pipelines.finetune.run import FINETUNE
    from pipelines.training.recipe import schedule_steps, steps_per_epoch, train_rows
    from vitpose_core.engine import EngineConfig, run_epoch
    from vitpose_core.optim import build_adamw, build_scheduler

    config = finetune_config(shards, workdir, steps, "plain")
    torch.set_num_threads(config.scaling.torch_threads)
    per_epoch = steps_per_epoch(config, train_rows(shards))
    total, milestones = schedule_steps(config, per_epoch)
    torch.manual_seed(config.seed)
    model = FINETUNE.build_model(config)
    optim, schedule = config.optim, config.schedule
    optimizer = build_adamw(model, optim.lr, optim.weight_decay, optim.layer_decay_for(config), optim.betas,
                            backbone_prefix=FINETUNE.backbone_prefix)
    scheduler = build_scheduler(optimizer, total, schedule.warmup_steps, schedule.warmup_ratio, schedule.kind,
                                milestones, schedule.gamma, schedule.min_ratio)
    engine = EngineConfig(device="cpu", precision=config.scaling.precision, max_grad_norm=optim.max_grad_norm)
    stream = config.data.stream_config(config.model.input_size)
    keypoint_sets = shard_keypoint_sets(shards)

    epochs, compute, step = [], [], 0
    for epoch in range(10_000):
        if step >= total:
            break
        batches = iter_pose_batches(shards, stream, batch_size=config.data.batch_size, seed=config.seed, epoch=epoch,
                                    split="train", drop_last=True, shuffle_buffer=config.data.shuffle_buffer,
                                    keypoint_sets=keypoint_sets)
        batches = prefetch(batches, depth=config.data.prefetch_batches)
        seconds: list[float] = []
        try:
            summary = run_epoch(model, FINETUNE.task, islice(batches, per_epoch), optimizer, scheduler, engine,
                                step=step, max_steps=total, on_step=lambda r, out=seconds: out.append(r.seconds))
        finally:
            batches.close()
        step += len(seconds)
        epochs.append({"steps": len(seconds), "seconds": summary.seconds})
        compute.append(seconds)
    return {"epochs": epochs, "compute": compute}


def ray_arm(shards: str, workdir: Path, steps: int, name: str) -> dict:
    """`run_finetune` in a local 2-CPU Ray; per-epoch wall and per-step compute from its MLflow run."""
    import ray
    from mlflow.tracking import MlflowClient

    from pipelines.finetune.run import run_finetune

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        config = finetune_config(shards, workdir, steps, name)
        result = run_finetune(config)
    finally:
        ray.shutdown()
    client = MlflowClient(config.tracking.tracking_uri)
    run_id = result.outputs["mlflow_run_id"]

    def by_step(key: str) -> list:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)

    epoch_seconds = by_step("epoch_seconds")
    steps_at = [int(m.step) for m in epoch_seconds]
    epochs = [{"steps": b - a, "seconds": m.value} for a, b, m in zip([0, *steps_at], steps_at, epoch_seconds, strict=False)]
    # images_per_s = batch / the step's compute seconds (logged every tracking.log_every_n_steps)
    batch = config.data.batch_size
    compute_by_epoch: list[list[float]] = [[] for _ in epochs]
    for metric in by_step("images_per_s"):
        index = next(i for i, end in enumerate(steps_at) if metric.step <= end)
        compute_by_epoch[index].append(batch / metric.value)
    return {"epochs": epochs, "compute": compute_by_epoch}


def summarise(arm: dict) -> dict:
    later = slice(1, None) if len(arm["epochs"]) > 1 else slice(None)
    per_step = [e["seconds"] / e["steps"] for e in arm["epochs"][later] if e["steps"]]
    compute = [s for seconds in arm["compute"][later] for s in seconds]
    step, work = statistics.median(per_step), statistics.median(compute) if compute else float("nan")
    return {"step_s": round(step, 3), "compute_s": round(work, 3), "other_s": round(step - work, 3),
            "epochs": len(arm["epochs"]), "steps": sum(e["steps"] for e in arm["epochs"])}


def run_one(arm: str, shards: str, workdir: Path, steps: int) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    # a fresh Train run name each time: the same name would resume the finished run
    name = f"{arm.replace('+', '_')}-{time.strftime('%H%M%S')}"
    raw = plain_arm(shards, workdir, steps) if arm == "plain" else ray_arm(shards, workdir, steps, name)
    return {"arm": arm, **summarise(raw), "wall_s": round(time.perf_counter() - start, 1),
            "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1), "raw": raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=72, help="optimiser steps per arm (24 per epoch)")
    parser.add_argument("--arms", default="plain,ray", help="plain, ray, ray+<variant> (comma-separated)")
    parser.add_argument("--variants", default="", help=f"add ray+<name> arms: {', '.join(VARIANTS)}")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_overhead.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train_overhead_"))
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, make_shards(workdir), workdir, args.steps)), flush=True)
        return
    arms = [a for a in args.arms.split(",") if a] + [f"ray+{v}" for v in args.variants.split(",") if v]
    make_shards(workdir)
    rows = []
    for arm in arms:  # each in its own process: a fresh Ray with the arm's environment, no state carried over
        env = {**os.environ, **VARIANTS.get(arm.partition("+")[2], {})}
        out = subprocess.run([sys.executable, __file__, "--one", arm, "--steps", str(args.steps), "--workdir",
                              str(workdir)], env=env, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"arm {arm} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        print({k: v for k, v in rows[-1].items() if k != "raw"}, flush=True)
    args.out.write_text(json.dumps({"steps": args.steps, "cpus": os.cpu_count(), "rows": rows}, indent=1))
    lines = ["# Seconds per finetune step: Ray Train worker vs one plain process (bench/bench_train_overhead.py)", "",
             f"local.yaml's finetune section (vitpose-tiny 96x128, batch 32, 2 torch threads), {args.steps} steps per "
             f"arm, {os.cpu_count()} CPUs. Medians over the epochs after the first.", "",
             "| arm | s per step | compute s per step | other s per step | step / plain | arm wall s | load before / after |",
             "|---|---|---|---|---|---|---|"]
    plain = next((r["step_s"] for r in rows if r["arm"] == "plain"), None)
    for r in rows:
        ratio = f"{r['step_s'] / plain:.2f}x" if plain else ""
        lines.append(f"| {r['arm']} | {r['step_s']} | {r['compute_s']} | {r['other_s']} | {ratio} | {r['wall_s']} | "
                     f"{r['load_before']} / {r['load_after']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
