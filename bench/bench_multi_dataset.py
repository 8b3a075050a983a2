"""Shared backbone (one decoder per dataset, ViTPose+) vs one model per dataset, at equal optimiser steps.

Two synthetic datasets of the same people in different layouts (COCO-17 and AIC-14, vitpose_core.synthetic)
are sharded once by the real shard stage. Then, in one process on this CPU (no Ray Train: the Ray
Train path runs the same engine and stream), with the tiny preset, the same seed, lr and batch size:

* shared:        one model, two decoders, batches mixed 1:1 (pipelines.data.mix_by_ratio), S steps;
* separate S/2:  one model per dataset, S/2 steps each: the same total compute as `shared`;
* separate S:    one model per dataset, S steps each: each dataset sees as many samples as a whole
                 shared run, at twice the compute.

Each model is scored per dataset on its val split (COCO AP with that dataset's sigmas, flip test,
ground-truth boxes) and by PCK@0.05 (labelled keypoints within 0.05 x the longer side of their person's
box): a layout-independent accuracy, since AIC-14's OKS sigmas are 2-5x smaller than COCO's for the same
joints (AIC's own metric) and its AP stays near 0 until keypoints are right to about half a heatmap pixel.
Results: bench/results/multi_dataset.json and .md (ratios against `separate S/2`).

    python bench/bench_multi_dataset.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from pipelines.data import StreamConfig, iter_pose_batches, shard_keypoint_sets  # noqa: E402
from vitpose_core.codec import UDPHeatmapCodec  # noqa: E402
from vitpose_core.engine import EngineConfig, FinetuneTask, evaluate_coco_ap, predict_keypoints, run_epoch  # noqa: E402
from vitpose_core.evaluation import load_ground_truth  # noqa: E402
from vitpose_core.models import build_model  # noqa: E402
from vitpose_core.multi_dataset import MultiDatasetFinetuneTask, dataset_view  # noqa: E402
from vitpose_core.optim import build_adamw, build_scheduler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# (W, H): at 48x64 neither setting left AP 0 within 500 steps of batch 32 (2026-11-30); 96x128 is the input
# the learning curves reach 0.3 AP at in 150 steps (bench/results/learning_curve_*)
INPUT_SIZE = (96, 128)
DATASETS = (("coco", "coco"), ("aic_synth", "aic"))  # (dataset name, synthetic layout)
PCK_THRESHOLD = 0.05  # x the longer side of the person's box


def make_shards(work: Path, train_images: int, val_images: int) -> tuple[str, dict[str, str]]:
    import ray

    from pipelines.shard.config import ShardConfig, ShardSource
    from pipelines.shard.crops import CropConfig
    from pipelines.shard.run import run_shard, write_synthetic_dataset
    from vitpose_core.synthetic import SyntheticConfig

    sources, val_files = [], {}
    for dataset, layout in DATASETS:
        # different seeds per dataset: different people, as two real datasets would have
        offset = 0 if layout == "coco" else 100
        for split, images, seed in (("train", train_images, offset), ("val", val_images, offset + 1)):
            root = work / dataset / split
            annotations = write_synthetic_dataset(str(root), SyntheticConfig(num_images=images, seed=seed,
                                                                             layout=layout), split)
            sources.append(ShardSource(annotations=annotations, images=str(root / "images"), dataset=dataset,
                                       split=split))
            if split == "val":
                val_files[dataset] = annotations
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        run_shard(ShardConfig(sources=tuple(sources), out=str(work / "shards"),
                              crop=CropConfig(width=72, height=96)))
    finally:
        ray.shutdown()
    return str(work / "shards"), val_files


def endless(shards: str, stream: StreamConfig, batch_size: int, **kwargs) -> object:
    epoch = 0
    while True:
        yield from iter_pose_batches(shards, stream, batch_size=batch_size, split="train", drop_last=True,
                                     epoch=epoch, **kwargs)
        epoch += 1


def train(model, task, batches, steps: int, lr: float, engine: EngineConfig) -> float:
    optimizer = build_adamw(model, lr, 0.1, 1.0)  # no layer decay from scratch (docs/training.md: 1.0 >= 0.85)
    scheduler = build_scheduler(optimizer, steps, min(20, steps // 10), 0.001, "cosine", (), 0.1, 0.0)
    start = time.perf_counter()
    model.train()
    run_epoch(model, task, islice(batches, steps), optimizer, scheduler, engine, max_steps=steps)
    return time.perf_counter() - start


def score(model, shards: str, dataset: str, val_file: str, engine: EngineConfig) -> tuple[float, float]:
    """(COCO AP with the dataset's sigmas, PCK@0.05) on the dataset's val split, flip test, ground-truth boxes."""
    stream = StreamConfig(input_size=INPUT_SIZE, augment=False)
    codec = UDPHeatmapCodec(stream.input_size, stream.heatmap_size, stream.sigma)
    layout = shard_keypoint_sets(shards)[dataset]
    ground_truth = load_ground_truth(val_file)

    def batches():
        return iter_pose_batches(shards, stream, batch_size=64, split="val", datasets=[dataset])

    stats, _ = evaluate_coco_ap(model.eval(), batches(), codec, ground_truth, layout, engine, True)
    hits = []
    for out in predict_keypoints(model, batches(), codec, engine, layout.flip_index):
        for ann_id, predicted in zip(out["ann_id"], out["keypoints"], strict=True):
            ann = ground_truth.anns[int(ann_id)]
            truth = np.asarray(ann["keypoints"], dtype=float).reshape(-1, 3)
            labelled = truth[:, 2] > 0
            distance = ((predicted[labelled] - truth[labelled, :2]) ** 2).sum(-1) ** 0.5
            hits.extend((distance <= PCK_THRESHOLD * max(ann["bbox"][2:])).tolist())
    return float(stats["AP"]), float(sum(hits) / max(len(hits), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="S: optimiser steps of the shared run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--input-size", type=int, nargs=2, default=[96, 128], metavar=("W", "H"))
    parser.add_argument("--train-images", type=int, default=120)
    parser.add_argument("--val-images", type=int, default=30)
    parser.add_argument("--skip-separate-full", action="store_true",
                        help="run only the compute-matched comparison (shared vs separate S/2)")
    args = parser.parse_args()
    global INPUT_SIZE
    INPUT_SIZE = tuple(args.input_size)
    torch.set_num_threads(2)
    engine = EngineConfig(device="cpu", precision="fp32")
    stream = StreamConfig(input_size=INPUT_SIZE)
    names = [name for name, _ in DATASETS]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        shards, val_files = make_shards(Path(tmp), args.train_images, args.val_images)
        sets = shard_keypoint_sets(shards)
        runs: dict[str, dict] = {}

        torch.manual_seed(0)
        shared = build_model("vitpose-tiny", input_size=INPUT_SIZE, datasets=[(n, sets[n]) for n in names])
        seconds = train(shared, MultiDatasetFinetuneTask(tuple(names)),
                        endless(shards, stream, args.batch_size, mixed_datasets=names, ratios=[1, 1]),
                        args.steps, args.lr, engine)
        scores = {n: score(dataset_view(shared, i), shards, n, val_files[n], engine) for i, n in enumerate(names)}
        runs["shared"] = {"steps_total": args.steps, "train_seconds": seconds,
                          "AP": {n: ap for n, (ap, _) in scores.items()},
                          "PCK@0.05": {n: pck for n, (_, pck) in scores.items()}}
        print("shared:", runs["shared"], flush=True)
        settings = [("separate S/2", args.steps // 2)] + ([] if args.skip_separate_full else [("separate S", args.steps)])
        for label, steps in settings:
            aps, pcks, seconds = {}, {}, 0.0
            for name in names:
                torch.manual_seed(0)
                model = build_model("vitpose-tiny", input_size=INPUT_SIZE, keypoint_set=sets[name])
                seconds += train(model, FinetuneTask(), endless(shards, stream, args.batch_size, datasets=[name]),
                                 steps, args.lr, engine)
                aps[name], pcks[name] = score(model, shards, name, val_files[name], engine)
            runs[label] = {"steps_total": steps * len(names), "train_seconds": seconds, "AP": aps, "PCK@0.05": pcks}
            print(f"{label}:", runs[label], flush=True)

    baseline = runs["separate S/2"]["AP"]
    command = (f"python bench/bench_multi_dataset.py --steps {args.steps} --batch-size {args.batch_size} "
               f"--input-size {INPUT_SIZE[0]} {INPUT_SIZE[1]}") + (
        " --skip-separate-full" if args.skip_separate_full else "")
    result = {"command": command,
              "args": vars(args), "input_size": INPUT_SIZE, "load_average": [load_before, os.getloadavg()[0]],
              "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "multi_dataset.json").write_text(json.dumps(result, indent=1))
    lines = ["# Shared backbone (ViTPose+) vs one model per dataset, equal optimiser steps", "",
             f"`{result['command']}` (vitpose-tiny {INPUT_SIZE[0]}x{INPUT_SIZE[1]}, synthetic COCO-17 + AIC-14 "
             f"people, {args.train_images} train / {args.val_images} val images each, CPU, load average "
             f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}; one run per setting, same seed).", "",
             "| setting | optimiser steps (total) | train s | " + " | ".join(f"AP {n}" for n in names) + " | "
             + " | ".join(f"AP {n} / separate S/2" for n in names) + " | "
             + " | ".join(f"PCK@0.05 {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * (3 * len(names))]
    for label, run in runs.items():
        ratios = [run["AP"][n] / baseline[n] if baseline[n] > 0 else float("nan") for n in names]
        lines.append(f"| {label} | {run['steps_total']} | {run['train_seconds']:.0f} | "
                     + " | ".join(f"{run['AP'][n]:.3f}" for n in names) + " | "
                     + " | ".join(f"{r:.2f}" for r in ratios) + " | "
                     + " | ".join(f"{run['PCK@0.05'][n]:.3f}" for n in names) + " |")
    lines += ["", "Tiny, short runs on synthetic people: the comparison (shared vs separate at the same compute) "
              "is the point, not the AP level; one seed, so differences of a few hundredths are noise."]
    (RESULTS / "multi_dataset.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
