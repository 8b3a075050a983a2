"""Learning-curve benchmark: val COCO AP of the tiny preset against wall-clock training time on this CPU.

Runs in one process (no Ray Train) so the curve measures the model, the data stream and the engine,
not the cluster; the Ray Train path runs the same engine (pipelines/finetune.py).

    python bench/learning_curve.py data                      # synthetic train/val + Parquet shards
    python bench/learning_curve.py pretrain --minutes 8      # MAE on the train crops -> encoder
    python bench/learning_curve.py finetune --minutes 20 --init mae   # or --init scratch

Each command appends to bench/results/learning_curve_<name>.json: the config, the machine load, and
(train seconds, step, loss) / (train seconds, step, AP...) points. Evaluation time is not counted as
training time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pipelines.data import StreamConfig, iter_pose_batches, prefetch  # noqa: E402
from vitpose_core.codec import UDPHeatmapCodec  # noqa: E402
from vitpose_core.engine import (  # noqa: E402
    EngineConfig,
    FinetuneTask,
    PretrainTask,
    evaluate_coco_ap,
    train_step,
)
from vitpose_core.evaluation import load_ground_truth  # noqa: E402
from vitpose_core.keypoints import COCO  # noqa: E402
from vitpose_core.mae import build_mae, load_pretrained_encoder, save_pretrained_encoder  # noqa: E402
from vitpose_core.models import build_model, variant_config  # noqa: E402
from vitpose_core.optim import build_adamw, build_scheduler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
INPUT_SIZE = (96, 128)  # (W, H): an 8x6 token grid, 24x32 heatmaps


def train_stream(work: Path, stream: StreamConfig, batch_size: int, seed: int) -> Iterator[dict]:
    """Endless augmented training batches, a fresh shuffle and augmentation draw per epoch."""
    epoch = 0
    while True:
        yield from iter_pose_batches(str(work / "shards"), stream, batch_size=batch_size, seed=seed, epoch=epoch,
                                     split="train", drop_last=True)
        epoch += 1


def make_data(args: argparse.Namespace) -> None:
    import ray

    from pipelines.shard.config import ShardConfig, ShardSource
    from pipelines.shard.crops import CropConfig
    from pipelines.shard.run import run_shard, write_synthetic_dataset
    from vitpose_core.synthetic import SyntheticConfig

    work = Path(args.work)
    sources = []
    for split, num_images, seed in (("train", args.train_images, 0), ("val", args.val_images, 1)):
        root = work / f"synthetic_{split}"
        annotations = write_synthetic_dataset(str(root), SyntheticConfig(num_images=num_images, seed=seed), split)
        sources.append(ShardSource(annotations=annotations, images=str(root / "images"), dataset="coco", split=split))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    manifest = run_shard(ShardConfig(sources=tuple(sources), out=str(work / "shards"),
                                     crop=CropConfig(width=144, height=192), rows_per_file=1024))
    ray.shutdown()
    print(json.dumps(manifest.get("totals", {}), indent=1))


def record(name: str, payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"learning_curve_{name}.json"
    path.write_text(json.dumps(payload, indent=1))


def machine_load() -> dict:
    return {"loadavg": os.getloadavg(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def encoder_dir(args: argparse.Namespace) -> Path:
    """Where pretrain writes the MAE encoder and finetune --init mae reads it."""
    return Path(args.encoder) if args.encoder else Path(args.work) / "mae_encoder"


def pretrain(args: argparse.Namespace) -> None:
    work = Path(args.work)
    torch.manual_seed(args.seed)
    mae = build_mae(variant_config("vitpose-tiny", input_size=INPUT_SIZE), decoder_dim=128, decoder_depth=2,
                    decoder_heads=4, mask_ratio=0.75)
    optimizer = build_adamw(mae, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, total_steps=args.steps, warmup_steps=args.warmup)
    engine = EngineConfig(precision="auto", max_grad_norm=None)
    stream = StreamConfig(input_size=INPUT_SIZE, rotation_prob=0.0, half_body_prob=0.0)  # MAE: crops + flips
    payload = {"stage": "pretrain", "args": vars(args), "load_start": machine_load(), "points": []}
    train_seconds, step = 0.0, 0
    for batch in prefetch(train_stream(work, stream, args.batch_size, args.seed), depth=3):
        result = train_step(mae, PretrainTask(), batch, optimizer, scheduler, engine, step)
        step, train_seconds = result.step, train_seconds + result.seconds
        if step % 10 == 0:
            payload["points"].append({"seconds": round(train_seconds, 1), "step": step, "loss": result.loss,
                                      "images_per_s": round(result.samples_per_second, 1)})
            print(payload["points"][-1], flush=True)
        if train_seconds > args.minutes * 60 or step >= args.steps:
            break
    save_pretrained_encoder(mae, encoder_dir(args), metadata={"steps": step, "loss": result.loss})
    payload["load_end"] = machine_load()
    record(args.name or "pretrain", payload)


def finetune(args: argparse.Namespace) -> None:
    work = Path(args.work)
    torch.manual_seed(args.seed)
    input_size = tuple(args.input_size)
    model = build_model("vitpose-tiny", input_size=input_size, drop_path_rate=args.drop_path, decoder=args.decoder)
    if args.init == "mae":
        load_pretrained_encoder(model, encoder_dir(args))
    if args.freeze_backbone:  # a probe of the encoder's features: only the heatmap decoder learns
        model.backbone.requires_grad_(False)
    optimizer = build_adamw(model, lr=args.lr, weight_decay=0.1, layer_decay=args.layer_decay)
    scheduler = build_scheduler(optimizer, total_steps=args.steps, warmup_steps=args.warmup, min_ratio=0.01)
    engine = EngineConfig(precision="auto", max_grad_norm=1.0)  # bf16 only where native
    stream = StreamConfig(input_size=input_size, sigma=args.sigma, rotation_factor=args.rotation)
    val_stream = stream.model_copy(update={"augment": False})
    codec = UDPHeatmapCodec(input_size, stream.heatmap_size, args.sigma)
    ground_truth = load_ground_truth(work / "synthetic_val" / "annotations" / "person_keypoints_val.json")

    def evaluate() -> dict:
        val = iter_pose_batches(str(work / "shards"), val_stream, batch_size=64, split="val")
        stats, _ = evaluate_coco_ap(model, val, codec, ground_truth, COCO, engine, flip_test=True)
        return {k: round(v, 4) for k, v in stats.items() if k in ("AP", "AP50", "AP75", "AR")}

    payload = {"stage": "finetune", "args": vars(args), "load_start": machine_load(), "points": [], "evals": []}
    train_seconds, step, next_eval = 0.0, 0, args.eval_every
    start = time.perf_counter()
    for batch in prefetch(train_stream(work, stream, args.batch_size, args.seed), depth=3):
        result = train_step(model, FinetuneTask(), batch, optimizer, scheduler, engine, step)
        step, train_seconds = result.step, train_seconds + result.seconds
        if step % 10 == 0:
            payload["points"].append({"seconds": round(train_seconds, 1), "step": step, "loss": result.loss,
                                      "lr": result.lr, "images_per_s": round(result.samples_per_second, 1)})
        finished = train_seconds > args.minutes * 60 or step >= min(args.steps, args.stop_step or args.steps)
        due = (step % args.eval_every_steps == 0) if args.eval_every_steps else train_seconds >= next_eval
        if due or finished:
            next_eval += 0 if args.eval_every_steps else args.eval_every
            point = {"seconds": round(train_seconds, 1), "wall_seconds": round(time.perf_counter() - start, 1),
                     "step": step, "loss": result.loss, **evaluate(), "loadavg": os.getloadavg()[0]}
            payload["evals"].append(point)
            print(point, flush=True)
            record(args.name or f"finetune_{args.init}", payload)
        if finished:
            break
    payload["load_end"] = machine_load()
    record(args.name or f"finetune_{args.init}", payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["data", "pretrain", "finetune"])
    parser.add_argument("--work", default=str(ROOT / "runs" / "learning_curve"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=1500, help="schedule length (and step cap)")
    parser.add_argument("--stop-step", type=int, default=None, help="stop early without shortening the schedule")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layer-decay", type=float, default=1.0)
    parser.add_argument("--drop-path", type=float, default=0.0)
    parser.add_argument("--sigma", type=float, default=1.5)
    parser.add_argument("--rotation", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=float, default=120.0, help="train seconds between evaluations")
    parser.add_argument("--eval-every-steps", type=int, default=None,
                        help="evaluate every N steps instead (equal-step comparisons, e.g. MAE vs scratch)")
    parser.add_argument("--init", choices=["scratch", "mae"], default="scratch")
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="train the decoder only: compares what MAE and random encoders provide")
    parser.add_argument("--encoder", default=None,
                        help="MAE encoder directory that pretrain writes and finetune --init mae reads (default: "
                             "<work>/mae_encoder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-size", type=int, nargs=2, default=list(INPUT_SIZE), metavar=("W", "H"),
                        help="finetune input (W H), default 96 128")
    parser.add_argument("--decoder", choices=["classic", "simple"], default="classic")
    args = parser.parse_args()
    torch.set_num_threads(2)
    {"data": make_data, "pretrain": pretrain, "finetune": finetune}[args.command](args)


if __name__ == "__main__":
    main()
