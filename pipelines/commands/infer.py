"""`vitpose infer`: poses for every image of a folder / s3:// prefix, or every frame of a video (Ray Data).

    vitpose infer --checkpoint CK --input DIR|s3://bucket/prefix|VIDEO --out DIR|s3://... [--boxes DETS.json]
    vitpose infer --model-alias champion [--tracking-uri URI] [--model-name vitpose] --input ... --out ...
                  [--detector DIR | --detector-alias A] [--render] [--actors N] [--batch-size B] [--device cpu|cuda]

Person boxes: `--boxes` (COCO detection results, matched by image_id or file_name), else a person
detector (`--detector`, a folder `vitpose_core.detection.save_detector` wrote, or `--detector-alias`,
a registered one), else one whole-image box per image. Writes OUT/results.json (COCO keypoint results),
OUT/images.json (the image ids), OUT/infer.json (what ran), OUT/parts/ (finished work) and with
--render OUT/rendered/. Rerunning the same command skips the parts already written (see docs/inference.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("infer", help="poses for a folder, an s3:// prefix or a video -> COCO results "
                                   "(Ray Data actor pool, resumable)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="own-format folder or official .pth (local on every node, or s3://)")
    model.add_argument("--model-alias", help="a registered model's alias, e.g. champion")
    parser.add_argument("--model-name", default="vitpose", help="registered model name (with --model-alias)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                        "else vitpose_runs/mlflow.db)")
    parser.add_argument("--input", required=True, help="folder or s3:// prefix of .jpg/.png images, or a video file")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    people = parser.add_mutually_exclusive_group()
    people.add_argument("--boxes", help="COCO detection results json (image_id or file_name, bbox, score)")
    people.add_argument("--detector", help="person detector folder (detector.json + detector.safetensors)")
    people.add_argument("--detector-alias", help="alias of a registered person detector (see --detector-name)")
    parser.add_argument("--detector-name", default="vitpose-detector", help="registered detector name")
    parser.add_argument("--box-score-thr", type=float, default=0.0, help="with --boxes: drop boxes scoring below")
    parser.add_argument("--detector-score-thr", type=float, default=None,
                        help="with a detector: its score threshold (default: the one it was saved with)")
    parser.add_argument("--render", action="store_true", help="also write drawn images (a drawn video for video input)")
    parser.add_argument("--draw-score-thr", type=float, default=0.3, help="with --render: hide keypoints below")
    parser.add_argument("--actors", type=int, default=1, help="pose actors (model copies) in the pool")
    parser.add_argument("--batch-size", type=int, default=16, help="images per actor call = per part file")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the actors run the model")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=1.0, help="with --device cuda")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per actor (0: torch's default)")
    parser.add_argument("--flip-test", action="store_true", help="average with the mirrored crops (2x compute)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "auto"], default="fp32",
                        help="fp32 (as eval), bf16 (weights cast once), or auto: bf16 where the device computes it natively")
    parser.add_argument("--no-oks-nms", dest="oks_nms", action="store_false",
                        help="keep every person (default: OKS-NMS per image, as `vitpose eval`)")
    parser.add_argument("--max-frames", type=int, default=None, help="video: pose at most this many frames")
    parser.add_argument("--frame-stride", type=int, default=1, help="video: pose every n-th frame")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    from pipelines.infer.config import InferConfig
    from pipelines.infer.models import checkpoint_ref, detector_ref, registry_ref

    if args.checkpoint:
        model = checkpoint_ref(args.checkpoint)
    else:
        model = registry_ref(args.model_name, args.model_alias, args.tracking_uri, "--model-alias")
    detector = None
    if args.detector:
        detector = detector_ref(args.detector)
    elif args.detector_alias:
        detector = registry_ref(args.detector_name, args.detector_alias, args.tracking_uri, "--detector-alias")
    return InferConfig(
        input=args.input, out=args.out, model=model, boxes=args.boxes, box_score_threshold=args.box_score_thr,
        detector=detector, detector_score_threshold=args.detector_score_thr, render=args.render,
        draw_score_threshold=args.draw_score_thr, actors=args.actors, batch_size=args.batch_size,
        device=args.device, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
        torch_threads=args.torch_threads, flip_test=args.flip_test, dtype=args.dtype, oks_nms=args.oks_nms,
        max_frames=args.max_frames, frame_stride=args.frame_stride)


def run(args: argparse.Namespace) -> int:
    from pipelines import storage
    from pipelines.infer.job import execute, prepare
    from pipelines.session import connect_ray, disconnect_ray, quiet_console

    config = build_config(args)
    prepared = prepare(config)  # inputs, boxes, part keys: errors name the path before Ray starts
    todo = prepared.todo
    unit = "frames" if prepared.plan.kind == "video" else "images"
    say(f"vitpose infer: {len(prepared.plan.items)} {unit} from {prepared.plan.source}")
    say(f"  model    {config.model.label}")
    say(f"  people   {prepared.people_source()}")
    say(f"  parts    {len(todo)} of {len(prepared.parts)} to run, {len(prepared.parts) - len(todo)} finished "
        f"earlier (skipped){f', {len(prepared.stale)} stale removed' if prepared.stale else ''}")
    root = Path("vitpose-logs") if storage.is_s3(prepared.out) else Path(prepared.out) / "logs"
    log_file = (root / f"infer-{time.strftime('%Y%m%d-%H%M%S')}.log").resolve()
    restore = quiet_console(log_file, args.verbose)
    started_here = False
    try:
        if todo:
            where = connect_ray(address=args.address)
            started_here = where != "existing"
            from pipelines.infer.job import check_resources

            check_resources(config, local=not (args.address or os.environ.get("RAY_ADDRESS")))
            say(f"  ray      {where}; {config.actors} actor(s) x {config.cpus_per_actor:g} CPU"
                f"{f' + {config.gpus_per_actor:g} GPU' if config.device == 'cuda' else ''}, {config.device}")
            say(f"  log      {log_file}")
        summary = execute(prepared)
    finally:
        if started_here:
            disconnect_ray()  # a private local cluster stops with the command
        restore()
    counts = summary["counts"]
    say(f"  results  {summary['results']}  ({counts['results']} persons in {counts['images']} {unit}, "
        f"{summary['parts']['run']} parts run, {summary['parts']['skipped']} skipped as finished)")
    say(f"  images   {summary['images']}")
    if counts["skipped"]:
        shown = "; ".join(f"{s['file_name']}: {s['reason']}" for s in summary["skipped"][:3])
        say(f"  skipped  {counts['skipped']} unreadable {unit}: {shown}")
    if config.render:
        say(f"  rendered {summary.get('rendered_video') or storage.join(prepared.out, 'rendered')}")
    return 0


def say(line: str) -> None:
    print(line, flush=True)
