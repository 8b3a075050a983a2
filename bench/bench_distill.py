"""Distillation ablation at equal student steps: student alone vs + knowledge token vs + token + output distillation.

    .venv/bin/python bench/bench_distill.py [--workdir /tmp/vitpose_bench_distill] [--student-epochs 6]

Everything runs through the stage code (`pipelines.finetune.run` for the teacher,
`pipelines.distill.run.run_distill` for each student) on a local Ray with synthetic shards:

1. shards: synthetic people (train / val), canonical crops 144x192;
2. teacher: vitpose-tiny (width 192, depth 6) fine-tuned at 128x96;
3. three students (width 96, depth 3), same seed, data order, schedule and number of optimiser steps;
   the token variants also spend `token_epochs` of teacher-side steps learning the token (stage 1).

Writes bench/results/distill.md (and .json): val AP of the teacher and of each student (best epoch and
last epoch; students evaluated as deployed, i.e. without the token).
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
VARIANTS = {  # name -> distill switches
    "student alone": {"knowledge_token": False, "output_weight": 0.0},
    "student + token": {"knowledge_token": True, "output_weight": 0.0},
    "student + token + output distillation": {"knowledge_token": True, "output_weight": 1.0},
}


def make_shards(workdir: Path, train_images: int, val_images: int) -> str:
    from pipelines.shard.config import ShardConfig, ShardSource
    from pipelines.shard.crops import CropConfig
    from pipelines.shard.run import run_shard, write_synthetic_dataset
    from vitpose_core.synthetic import SyntheticConfig

    sources = []
    for split, count, seed in (("train", train_images, 0), ("val", val_images, 1)):
        annotations = write_synthetic_dataset(str(workdir / split), SyntheticConfig(num_images=count, seed=seed), split)
        sources.append(ShardSource(annotations=annotations, images=str(workdir / split / "images"), dataset="coco",
                                   split=split))
    run_shard(ShardConfig(sources=tuple(sources), out=str(workdir / "shards"), crop=CropConfig(width=144, height=192)))
    return str(workdir / "shards")


def open_workdir(path: str) -> tuple[Path, str]:
    """The bench's work directory (created), its sqlite MLflow URI, and a local 2-CPU Ray."""
    import ray

    workdir = Path(path).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    return workdir, f"sqlite:///{workdir / 'mlflow.db'}"


def common_sections(epochs: int, tracking_uri: str, batch_size: int, lr: float, experiment: str = "bench-distill") -> dict:
    return {"data": {"batch_size": batch_size, "shuffle_buffer": 1024},
            "optim": {"lr": lr}, "schedule": {"epochs": epochs, "warmup_steps": 30, "kind": "cosine"},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}, "eval": {"batch_size": 64, "num_visualized": 0},
            "tracking": {"tracking_uri": tracking_uri, "experiment": experiment}}


def curve(run_id: str, tracking_uri: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "val_AP")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vitpose_bench_distill")
    parser.add_argument("--train-images", type=int, default=120)
    parser.add_argument("--val-images", type=int, default=30)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=6)
    parser.add_argument("--token-epochs", type=int, default=2)
    parser.add_argument("--shards", default=None, help="existing shards (e.g. runs/learning_curve/shards) instead of new ones")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    from pipelines.config import build_config
    from pipelines.distill.config import DistillConfig
    from pipelines.distill.run import run_distill
    from pipelines.finetune.config import FinetuneConfig
    from pipelines.finetune.run import run_finetune

    workdir, tracking_uri = open_workdir(args.workdir)
    start = time.time()
    shards = str(Path(args.shards).resolve()) if args.shards else make_shards(workdir, args.train_images, args.val_images)

    teacher_config = build_config(FinetuneConfig, {
        **common_sections(args.teacher_epochs, tracking_uri, args.batch_size, args.lr),
        "model": {"variant": "vitpose-tiny", "input_size": [96, 128]},
        "data": {"shards": shards, "batch_size": args.batch_size, "shuffle_buffer": 1024},
        "checkpoint": {"storage_path": str(workdir / "teacher"), "name": "teacher"}})
    teacher = run_finetune(teacher_config)
    teacher_dir = teacher.outputs["checkpoint"]
    rows = [{"model": "teacher: vitpose-tiny (192 wide, 6 deep)", "best_val_AP": teacher.metrics["ap"],
             "curve": curve(teacher.outputs["mlflow_run_id"], tracking_uri), "steps": teacher.metrics["steps"]}]

    for name, switches in VARIANTS.items():
        slug = name.replace(" + ", "_").replace(" ", "_")
        config = build_config(DistillConfig, {
            **common_sections(args.student_epochs, tracking_uri, args.batch_size, args.lr),
            "out": str(workdir / slug), "teacher": str(teacher_dir),
            "data": {"shards": shards, "batch_size": args.batch_size, "shuffle_buffer": 1024},
            "model": {"variant": "vitpose-tiny"},
            "student": {"embed_dim": 96, "depth": 3, "num_heads": 3, "mlp_hidden_dim": 384, "decoder_channels": 64},
            "distill": {**switches, "token_epochs": args.token_epochs, "token_lr": 1e-3}})
        record = run_distill(config)
        values = curve(record.outputs["mlflow_run_id"], tracking_uri)
        rows.append({"model": name, "best_val_AP": record.metrics["ap"], "last_val_AP": values[-1],
                     "curve": values, "switches": switches})
        print(json.dumps(rows[-1]), flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                      "seconds": time.time() - start}, indent=1))
    lines = ["# Distillation ablation (synthetic data, CPU)", "",
             f"`bench/bench_distill.py` with {vars(args)}; total {time.time() - start:.0f} s on a shared 2-core box"
             + (f" (shards from {args.shards}; train_images/val_images unused)." if args.shards else "."),
             "Students: width 96, depth 3, 128x96 input, the same seed, data order, schedule and "
             f"{args.student_epochs} epochs of optimiser steps each; the token variants first spend "
             f"{args.token_epochs} epoch(s) of teacher-side steps learning the token. AP: COCO keypoint AP on the "
             "synthetic val split (flip test), students evaluated without the token, as deployed.", "",
             "| model | best val AP | last val AP | val AP per epoch |", "|---|---|---|---|"]
    for row in rows:
        last = row.get("last_val_AP", row["curve"][-1] if row["curve"] else float("nan"))
        lines.append(f"| {row['model']} | {row['best_val_AP']:.4f} | {last:.4f} | "
                     f"{', '.join(f'{v:.3f}' for v in row['curve'])} |")
    (RESULTS / "distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
