"""`vitpose infer` throughput: 1 pose actor vs 2, side by side in one run, on the same images and boxes.

    .venv/bin/python bench/bench_infer.py [--copies 12] [--variant vitpose-tiny] [--batch-size 4] [--repeats 1]

Input: the 4 COCO val images of ../shared/data/coco copied `--copies` times under new names, with the
people boxes of test_coco_det_AP_H_56.json scoring >= 0.3 matched to the copies by file name (a
`--boxes` file with `file_name` fields). The model is `--variant` with random weights (seed 0): the
throughput does not depend on the weights. Each configuration runs the real job (`pipelines.infer.job`:
Ray Data actor pool, part files, merge) into a fresh output folder on one local Ray cluster with
`--num-cpus` CPUs; each actor takes 1 CPU and 1 torch thread.

Reported per run: wall time of the pose phase (actor start-up included: each run starts its own pool),
images/s and persons/s over it, and the actors' summed compute time from the part records. The load
average before and after is printed: on a shared box figures compare only within one run.

Writes bench/results/infer.md (and infer.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_COCO = ROOT.parent / "shared" / "data" / "coco"


def make_inputs(folder: Path, copies: int, score_threshold: float) -> Path:
    """`copies` x the 4 COCO images under new names, and a boxes file naming them; returns the boxes file."""
    detections = json.loads((SHARED_COCO / "test_coco_det_AP_H_56.json").read_text())
    images = sorted(SHARED_COCO.glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    boxes = []
    for copy in range(copies):
        for image in images:
            name = f"copy{copy:03d}_{image.name}"
            shutil.copy(image, folder / name)
            boxes += [{"file_name": name, "category_id": 1, "bbox": d["bbox"], "score": d["score"]}
                      for d in detections if d["image_id"] == int(image.stem) and d["score"] >= score_threshold]
    boxes_file = folder.parent / "boxes.json"
    boxes_file.write_text(json.dumps(boxes))
    return boxes_file


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=12, help="copies of the 4 COCO images (48 images)")
    parser.add_argument("--variant", default="vitpose-tiny")
    parser.add_argument("--batch-size", type=int, default=4, help="images per actor call (= per part)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each actor count, alternating")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--box-score-thr", type=float, default=0.3)
    args = parser.parse_args()

    import torch

    from pipelines.infer.config import InferConfig
    from pipelines.infer.job import execute, prepare
    from pipelines.infer.models import checkpoint_ref
    from pipelines.session import connect_ray, disconnect_ray
    from vitpose_core.checkpoint import save_checkpoint
    from vitpose_core.models.vitpose import build_model

    work = Path(tempfile.mkdtemp(prefix="vitpose-bench-infer-"))
    boxes = make_inputs(work / "images", args.copies, args.box_score_thr)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_model(args.variant), work / "model")
    model = checkpoint_ref(str(checkpoint))
    load_before = load_average()
    connect_ray(num_cpus=args.num_cpus)
    rows = []
    try:
        for repeat in range(args.repeats):
            for actors in args.actors:
                config = InferConfig(input=str(work / "images"), out=str(work / f"out-{actors}-{repeat}"), model=model,
                                     boxes=str(boxes), box_score_threshold=args.box_score_thr, actors=actors,
                                     batch_size=args.batch_size, torch_threads=1)
                prepared = prepare(config)
                start = time.perf_counter()
                summary = execute(prepared, stream=open(os.devnull, "w"))  # noqa: SIM115
                wall = time.perf_counter() - start
                compute = sum(record["seconds"] for record in prepared.done.values())
                counts = summary["counts"]
                rows.append({"actors": actors, "repeat": repeat, "images": counts["images"],
                             "persons": counts["persons"], "pose_s": round(summary["seconds"]["pose"], 2),
                             "wall_s": round(wall, 2), "images_per_s": round(counts["images"] / summary["seconds"]["pose"], 3),
                             "persons_per_s": round(counts["persons"] / summary["seconds"]["pose"], 3),
                             "actor_compute_s": round(compute, 2), "load": load_average()})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        disconnect_ray()
        shutil.rmtree(work, ignore_errors=True)
    write_report(args, rows, load_before, load_average())


def write_report(args: argparse.Namespace, rows: list[dict], load_before: str, load_after: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "infer.json").write_text(json.dumps({"args": vars(args), "rows": rows, "load_before": load_before,
                                                     "load_after": load_after}, indent=1))
    base = {r["repeat"]: r["images_per_s"] for r in rows if r["actors"] == min(args.actors)}
    lines = [
        "# `vitpose infer` throughput: actors in the Ray Data pool",
        "",
        f"`bench/bench_infer.py --copies {args.copies} --variant {args.variant} --batch-size {args.batch_size} "
        f"--repeats {args.repeats}`: "
        f"{args.copies * 4} COCO images (4 val images copied), their detection boxes scoring >= {args.box_score_thr}, "
        f"{args.variant} (random weights, fp32, no flip test), 1 CPU and 1 torch thread per actor, on a local Ray "
        f"cluster of {args.num_cpus} CPUs. This machine has {os.cpu_count()} cores; "
        f"load average (1, 5, 15 min) {load_before} before, {load_after} after.",
        "",
        "| actors | repeat | images | persons | pose phase s | images/s | persons/s | actors' compute s | vs 1 actor | load after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = r["images_per_s"] / base[r["repeat"]] if base.get(r["repeat"]) else float("nan")
        lines.append(f"| {r['actors']} | {r['repeat']} | {r['images']} | {r['persons']} | {r['pose_s']} | "
                     f"{r['images_per_s']} | {r['persons_per_s']} | {r['actor_compute_s']} | {speedup:.2f}x | {r['load']} |")
    lines += ["", "The pose phase counts from the job's start to the last part written: it includes starting "
              "the actors and loading the model in each (every run starts its own pool). \"actors' compute s\" is "
              "the sum over parts of the time an actor spent reading, cropping, running and decoding them.", ""]
    (RESULTS / "infer.md").write_text("\n".join(lines))
    print(f"wrote {RESULTS / 'infer.md'}")


if __name__ == "__main__":
    main()
