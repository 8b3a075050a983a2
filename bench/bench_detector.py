"""Person detector benchmark: training cost, box AP, and pose AP with detected vs ground-truth boxes.

ViTPose reports COCO keypoint AP on *detected* person boxes; this measures the same on the
synthetic val split, with the project's own detector (vitpose_core.detection) trained here:

    python bench/bench_detector.py                     # all steps, ~10 min of CPU on 1 thread
    python bench/bench_detector.py --pose-checkpoint runs/finetune/best   # reuse a pose model
    python bench/bench_detector.py --stage detector &  python bench/bench_detector.py --stage pose; wait
    python bench/bench_detector.py --stage report      # the same, with both trainings in parallel

Steps, in one run and one process (1 torch thread unless --threads):
1. synthetic train/val images (320x240, seeds 0/1) under --work;
2. training cost of the candidate torchvision architectures, side by side on the same batch;
3. train the chosen detector (CPU and wall seconds), COCO bbox AP on val, detection time per image;
4. a vitpose-tiny pose model (trained here in-process unless --pose-checkpoint);
5. pose AP on val with ground-truth boxes, with the detector's boxes, and with one whole-image box
   (what serving answered before there was a detector).

Writes bench/results/detector.json and bench/results/detector.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from vitpose_core.detection import (
    DetectorConfig,
    DetectorTrainConfig,
    build_detector,
    detect_dataset,
    evaluate_boxes,
    load_detector,
    read_image_rgb,
    read_person_boxes,
    save_detector,
    train_detector,
)
from vitpose_core.evaluation import (
    evaluate_keypoints,
    ground_truth_boxes,
    load_detections,
    load_ground_truth,
    rescore_and_nms,
)
from vitpose_core.keypoints import COCO
from vitpose_core.synthetic import SyntheticConfig, coco_json, iter_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
POSE_INPUT_SIZE = (96, 128)  # (W, H) as bench/learning_curve.py: an 8x6 token grid


def write_split(root: Path, num_images: int, seed: int, split: str) -> tuple[Path, Path]:
    annotations = root / "annotations" / f"person_keypoints_{split}.json"
    if annotations.is_file() and len(json.loads(annotations.read_text())["images"]) == num_images:
        return annotations, root / "images"
    config = SyntheticConfig(num_images=num_images, seed=seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries, people = [], []
    for entry, jpeg, anns in iter_dataset(config):
        (root / "images" / entry["file_name"]).write_bytes(jpeg)
        entries.append(entry)
        people.extend(anns)
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_bytes(coco_json(entries, people, config))
    return annotations, root / "images"


def architecture_step_costs(samples: list, batch_size: int, steps: int) -> dict[str, dict]:
    """CPU and wall seconds per training step of each architecture on the same images, 1 warm-up step."""
    costs = {}
    for architecture in ("fcos_mobilenet_v3_small_fpn", "ssdlite320_mobilenet_v3_large",
                         "fasterrcnn_mobilenet_v3_large_320_fpn"):
        config = DetectorConfig(architecture=architecture)
        torch.manual_seed(0)
        model = build_detector(config)
        train = DetectorTrainConfig(epochs=1, batch_size=batch_size, warmup_steps=1)
        history = train_detector(model, samples[:batch_size * (steps + 1)], train, log_every=1)
        warm = history[0]
        last = history[-1]
        fixed = model.transform.fixed_size  # (H, W) for SSD, which resizes to one square; None for the others
        costs[architecture] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "input": f"{fixed[1]}x{fixed[0]}" if fixed else f"{config.max_size}x{config.min_size}",
            "cpu_s_per_step": round((last["cpu_seconds"] - warm["cpu_seconds"]) / (last["step"] - warm["step"]), 3),
            "wall_s_per_step": round((last["seconds"] - warm["seconds"]) / (last["step"] - warm["step"]), 3),
        }
        print(architecture, costs[architecture], flush=True)
    return costs


def train_pose_model(annotations: Path, images: Path, steps: int, batch_size: int, out: Path) -> dict:
    """A vitpose-tiny trained in-process on the GT person crops of the train split (no Ray)."""
    from vitpose_core.augment import AugmentConfig, augment_top_down
    from vitpose_core.checkpoint import save_checkpoint
    from vitpose_core.codec import UDPHeatmapCodec
    from vitpose_core.engine import EngineConfig, FinetuneTask, train_step
    from vitpose_core.geometry import box_xywh_to_center_scale
    from vitpose_core.inference import IMAGENET_MEAN, IMAGENET_STD
    from vitpose_core.models import build_model
    from vitpose_core.optim import build_adamw, build_scheduler

    document = json.loads(annotations.read_text())
    files = {image["id"]: images / image["file_name"] for image in document["images"]}
    decoded = {image_id: read_image_rgb(path) for image_id, path in files.items()}
    people = [a for a in document["annotations"] if a["num_keypoints"] > 0 and min(a["bbox"][2:]) > 1]
    codec = UDPHeatmapCodec(POSE_INPUT_SIZE, sigma=1.5)
    augment = AugmentConfig(rotation_factor=30.0)
    rng = np.random.default_rng(0)

    def batch() -> dict:
        crops, targets, weights = [], [], []
        for index in rng.integers(0, len(people), batch_size):
            ann = people[index]
            keypoints = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
            center, scale = box_xywh_to_center_scale(np.asarray(ann["bbox"]), POSE_INPUT_SIZE[0] / POSE_INPUT_SIZE[1])
            sample = augment_top_down(decoded[ann["image_id"]], keypoints[:, :2], keypoints[:, 2], center, scale,
                                      POSE_INPUT_SIZE, COCO, rng, augment)
            target, weight = codec.encode(sample.keypoints, sample.visibility)
            crops.append((sample.image.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD)
            targets.append(target)
            weights.append(weight)
        image = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()  # (B, h, w, 3) -> (B, 3, h, w)
        return {"image": image, "target": torch.from_numpy(np.stack(targets)),
                "target_weight": torch.from_numpy(np.stack(weights))}

    torch.manual_seed(0)
    model = build_model("vitpose-tiny", img_size=POSE_INPUT_SIZE[::-1])
    optimizer = build_adamw(model, lr=1e-3, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, total_steps=steps, warmup_steps=min(80, steps // 5), min_ratio=0.01)
    # fp32: a bf16-autocast training step of this model took 16x the CPU time of fp32 here (8.0 vs 0.5 CPU s
    # at batch 16, one thread), whatever bench/learning_curve.py measured on other machines
    engine = EngineConfig(precision="fp32", max_grad_norm=1.0)
    began, began_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        result = train_step(model, FinetuneTask(), batch(), optimizer, scheduler, engine, step)
        if result.step % 10 == 0:
            print(f"pose step {result.step} loss {result.loss:.5f}", flush=True)
    save_checkpoint(model, out, metadata={"trained_by": "bench/bench_detector.py", "steps": steps,
                                          "batch_size": batch_size})
    return {"steps": steps, "batch_size": batch_size, "wall_s": round(time.perf_counter() - began, 1),
            "cpu_s": round(time.process_time() - began_cpu, 1)}


def pose_ap(checkpoint: Path, ground_truth, images: Path, boxes_by_image: dict) -> dict[str, float]:
    from vitpose_core.checkpoint import load_model
    from vitpose_core.inference import TopDownPredictor, predict_dataset

    predictor = TopDownPredictor(load_model(checkpoint), COCO, flip_test=True, batch_size=32)
    paths = {image_id: images / info["file_name"] for image_id, info in ground_truth.imgs.items()}
    predictions = predict_dataset(predictor, paths, boxes_by_image)
    results = rescore_and_nms(predictions, COCO.sigmas_array())
    stats = evaluate_keypoints(ground_truth, results, COCO.sigmas_array())
    return {key: round(stats[key], 4) for key in ("AP", "AP50", "AP75", "AR")}


def detector_stage(args: argparse.Namespace) -> dict:
    """Steps 1-3: data, architecture costs, train the detector, box AP and detection time on val."""
    report: dict = {"load_start": os.getloadavg()}
    train_annotations, train_images = write_split(args.work / "train", args.train_images, 0, "train")
    val_annotations, val_images = write_split(args.work / "val", args.val_images, 1, "val")
    samples = read_person_boxes(train_annotations, train_images)
    if args.compare_steps:
        report["architectures"] = architecture_step_costs(samples, 8, args.compare_steps)

    config = DetectorConfig()
    torch.manual_seed(0)
    model = build_detector(config)
    train = DetectorTrainConfig(epochs=args.detector_epochs, lr=args.detector_lr)
    history = train_detector(model, samples, train, log=lambda point: print(point, flush=True), log_every=50)
    detector_dir = save_detector(model, config, args.work / "detector",
                                 metadata={"train": train.model_dump(), "history": history})
    report["detector"] = {"config": config.model_dump(), "train": train.model_dump(), "images": len(samples),
                          "steps": history[-1]["step"], "train_wall_s": history[-1]["seconds"],
                          "train_cpu_s": history[-1]["cpu_seconds"], "final_loss": history[-1]["loss"],
                          "parameters": sum(p.numel() for p in model.parameters())}

    ground_truth = load_ground_truth(val_annotations)
    detector = load_detector(detector_dir)
    paths = {image_id: val_images / info["file_name"] for image_id, info in ground_truth.imgs.items()}
    detections, seconds_per_image = detect_dataset(detector, paths, args.det_score_thr, batch_size=1)
    report["detector"]["ms_per_image"] = round(seconds_per_image * 1000, 1)
    report["box_ap"] = {k: round(v, 4) for k, v in evaluate_boxes(ground_truth, detections).items()}
    print("box AP", report["box_ap"], flush=True)
    (args.work / "detections_val.json").write_text(json.dumps(detections))
    report["load_end"] = os.getloadavg()
    return report


def pose_stage(args: argparse.Namespace) -> dict:
    """Step 4: a vitpose-tiny trained on the train split's ground-truth crops."""
    train_annotations, train_images = write_split(args.work / "train", args.train_images, 0, "train")
    return {"pose_training": {**train_pose_model(train_annotations, train_images, args.pose_steps,
                                                 args.pose_batch_size, args.work / "pose_tiny"),
                              "load": os.getloadavg()}}


def report_stage(args: argparse.Namespace, checkpoint: Path) -> dict:
    """Step 5: pose AP on val with ground-truth, detected and whole-image boxes."""
    val_annotations, val_images = write_split(args.work / "val", args.val_images, 1, "val")
    ground_truth = load_ground_truth(val_annotations)
    detections = json.loads((args.work / "detections_val.json").read_text())
    whole_image = {image_id: [([0.0, 0.0, float(info["width"]), float(info["height"])], 1.0)]
                   for image_id, info in ground_truth.imgs.items()}
    pose = {
        "ground_truth_boxes": pose_ap(checkpoint, ground_truth, val_images, ground_truth_boxes(ground_truth)),
        "detected_boxes": pose_ap(checkpoint, ground_truth, val_images,
                                  load_detections(detections, args.det_score_thr, image_ids=ground_truth.getImgIds())),
        "whole_image_box": pose_ap(checkpoint, ground_truth, val_images, whole_image),
    }
    print(json.dumps(pose, indent=1), flush=True)
    return {"pose_checkpoint": str(checkpoint), "pose_ap": pose}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["all", "detector", "pose", "report"], default="all",
                        help="run one step group (each saves its part under --work; 'report' merges them), so "
                             "the detector and pose trainings can run as two processes at once")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_detector")
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--detector-epochs", type=int, default=12)
    parser.add_argument("--detector-lr", type=float, default=2e-3)
    parser.add_argument("--det-score-thr", type=float, default=0.05,
                        help="detections kept for pose AP (rescoring weighs each pose by its box score)")
    parser.add_argument("--pose-checkpoint", type=Path, default=None, help="reuse a pose model (else trained)")
    parser.add_argument("--pose-steps", type=int, default=200)
    parser.add_argument("--pose-batch-size", type=int, default=16)
    parser.add_argument("--compare-steps", type=int, default=3, help="timed steps per architecture (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    parts = {"detector": args.work / "part_detector.json", "pose": args.work / "part_pose.json"}
    if args.stage in ("all", "detector"):
        parts["detector"].write_text(json.dumps(detector_stage(args), indent=1))
    if args.stage in ("all", "pose") and args.pose_checkpoint is None:
        parts["pose"].write_text(json.dumps(pose_stage(args), indent=1))
    if args.stage not in ("all", "report"):
        return
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "cpus": os.cpu_count()}
    report.update(json.loads(parts["detector"].read_text()))
    checkpoint = args.pose_checkpoint or args.work / "pose_tiny"
    if args.pose_checkpoint is None and parts["pose"].is_file():
        report.update(json.loads(parts["pose"].read_text()))
    if (checkpoint / "config.json").is_file():
        report.update(report_stage(args, checkpoint))
    else:  # the pose stage has not finished: report the detector alone rather than nothing
        print(f"no pose model at {checkpoint}: pose AP not measured", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "detector.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "detector.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    detector, box = report["detector"], report["box_ap"]
    lines = [
        "# Person detector: training cost, box AP, pose AP with detected boxes",
        "",
        "`python bench/bench_detector.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in report["args"].items() if v is not None and k != "work")
        + "` (synthetic 320x240 people, train seed 0, val seed 1; "
        f"load average {report['load_start'][0]:.1f} at start, {report['load_end'][0]:.1f} at end, "
        f"{report['cpus']} CPUs, torch threads {report['args']['threads']}).",
        "",
    ]
    if "architectures" in report:
        lines += ["## Training cost per step, side by side (batch 8, same images, random init)", "",
                  "| architecture | parameters | input | CPU s / step | wall s / step |", "|---|---|---|---|---|"]
        for name, cost in report["architectures"].items():
            lines.append(f"| {name} | {cost['parameters'] / 1e6:.2f} M | {cost['input']} | "
                         f"{cost['cpu_s_per_step']} | {cost['wall_s_per_step']} |")
        lines.append("")
    lines += [
        f"## Detector: {detector['config']['architecture']}, {detector['parameters'] / 1e6:.2f} M parameters",
        "",
        f"Trained on {detector['images']} images for {detector['steps']} steps (batch 8, "
        f"{detector['train']['epochs']} epochs, AdamW lr {detector['train']['lr']}, horizontal flips) in "
        f"**{detector['train_cpu_s']:.0f} CPU s** ({detector['train_wall_s']:.0f} s wall). Detection: "
        f"{detector['ms_per_image']} ms per image (wall, batch 1).",
        "",
        "| box AP | AP50 | AP75 | AR100 |", "|---|---|---|---|",
        f"| {box['AP']:.3f} | {box['AP50']:.3f} | {box['AP75']:.3f} | {box['AR100']:.3f} |",
        "",
        "## Pose AP on the val split (vitpose-tiny, flip test, rescoring + OKS-NMS)",
        "",
        "| person boxes | AP | AP50 | AP75 | AR |", "|---|---|---|---|---|",
    ]
    if "pose_ap" not in report:
        lines.append("| (not measured in this run: no pose model) | | | | |")
    for name, stats in report.get("pose_ap", {}).items():
        lines.append(f"| {name.replace('_', ' ')} | {stats['AP']:.3f} | {stats['AP50']:.3f} | "
                     f"{stats['AP75']:.3f} | {stats['AR']:.3f} |")
    if "pose_training" in report:
        pose = report["pose_training"]
        lines += ["", f"Pose model trained here: {pose['steps']} steps of batch {pose['batch_size']} at "
                      f"{POSE_INPUT_SIZE[0]}x{POSE_INPUT_SIZE[1]}, {pose['cpu_s']:.0f} CPU s ({pose['wall_s']:.0f} s wall)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
