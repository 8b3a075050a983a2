"""`vitpose eval`: COCO keypoint metrics of a results file, or of a checkpoint run over images.

    vitpose eval --annotations GT.json --predictions PRED.json
    vitpose eval --checkpoint CKPT --annotations GT.json --images DIR [--detections DET.json] [--flip-test]
    vitpose eval --checkpoint CKPT --shards DIR_OR_URI [--no-flip-test] [--precision fp32]

With `--shards` the checkpoint is scored exactly as the finetune stage validates (and the register stage
scores candidates): the val split of the shard set, ground-truth boxes, the same crops and decode, flip
test and bf16 by default, so it reports the AP the training run logged.

Prints the metrics as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="COCO keypoint AP of a results file or of a checkpoint",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, help="COCO keypoint annotation json (with --shards: default "
                        "the val annotations the shard manifest names)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, help="COCO keypoint results json (evaluated as is)")
    source.add_argument("--checkpoint", type=Path, help="model checkpoint (own format dir or official .pth)")
    parser.add_argument("--images", type=Path, help="image directory (with --checkpoint)")
    parser.add_argument("--shards", help="shard stage output (with --checkpoint): score on its val split")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="with --shards: autocast precision, as the training run's scaling.precision (auto: "
                             "bf16 where native, else fp32)")
    parser.add_argument("--detections", type=Path, help="COCO detection results json; default: ground-truth boxes")
    parser.add_argument("--det-score-thr", type=float, default=0.0, help="drop detections scoring below (0.0)")
    parser.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=None,
                        help="average with horizontally flipped crops (default: off over --images, on over --shards)")
    parser.add_argument("--keypoint-set", default=None,
                        help="a built-in set, COCO json or keypoint-set YAML; default: the annotation categories")
    parser.add_argument("--dataset", default=None,
                        help="multi-dataset checkpoint: the dataset (its name) to score; with --shards "
                             "default: every dataset (val_AP of the first)")
    parser.add_argument("--batch-size", type=int, default=32, help="crops per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    parser.add_argument("--output", type=Path, help="also write the metrics (and with --checkpoint the results) here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.storage import refuse_overwriting_inputs
    from vitpose_core.evaluation import evaluate_keypoints, infer_keypoint_set, load_ground_truth

    if args.output is not None:
        refuse_overwriting_inputs(args.output, [args.annotations, args.predictions, args.detections, args.checkpoint])
    if args.shards is not None:
        return _evaluate_on_shards(args)
    if args.annotations is None:
        raise ValueError("--annotations is required (except with --shards, whose manifest names them)")
    ground_truth = load_ground_truth(args.annotations)
    keypoint_set = infer_keypoint_set(ground_truth, args.keypoint_set)
    results = None
    if args.predictions is not None:
        if args.images or args.detections or args.flip_test:
            raise ValueError("--images/--detections/--flip-test only apply with --checkpoint")
        metrics = evaluate_keypoints(ground_truth, args.predictions, keypoint_set.sigmas_array())
    else:
        results = _predict_results(args, ground_truth, keypoint_set)
        metrics = evaluate_keypoints(ground_truth, results, keypoint_set.sigmas_array())
    print(json.dumps(metrics, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        record = {"metrics": metrics, "keypoint_set": keypoint_set.name}
        if results is not None:
            record["results"] = results
        args.output.write_text(json.dumps(record, allow_nan=False))
    return 0


def _predict_results(args: argparse.Namespace, ground_truth, keypoint_set) -> list[dict]:
    import numpy as np

    from vitpose_core import load_model
    from vitpose_core.errors import InvalidInputError
    from vitpose_core.evaluation import ground_truth_boxes, load_detections, rescore_and_nms
    from vitpose_core.image_io import image_size_from_header
    from vitpose_core.inference import TopDownPredictor, predict_dataset, resolve_device

    if args.images is None or not args.images.is_dir():
        raise ValueError(f"--checkpoint needs --images pointing at a directory, got {args.images}")
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if args.detections is not None:
        boxes = load_detections(args.detections, args.det_score_thr, image_ids=ground_truth.getImgIds())
    else:
        boxes = ground_truth_boxes(ground_truth)
    image_paths = {image_id: args.images / info["file_name"] for image_id, info in ground_truth.imgs.items()}
    for image_id, items in boxes.items():  # a missing, junk or oversized image fails now, not after minutes
        if items:
            image_size_from_header(image_paths[image_id])
    model = load_model(args.checkpoint, dataset=args.dataset).to(resolve_device(args.device))
    if model.config.num_keypoints != keypoint_set.num_keypoints:
        raise ValueError(f"the checkpoint predicts {model.config.num_keypoints} keypoints but the annotations "
                         f"use {keypoint_set.name!r} ({keypoint_set.num_keypoints})")
    predictor = TopDownPredictor(model, keypoint_set, flip_test=bool(args.flip_test), batch_size=args.batch_size)
    start = time.perf_counter()
    predictions = predict_dataset(predictor, image_paths, boxes)
    logger.info("predicted %d persons in %d images in %.1f s", len(predictions), len(boxes),
                time.perf_counter() - start)
    broken = sum(not np.all(np.isfinite(p.keypoints)) for p in predictions)
    if broken:
        raise InvalidInputError(f"checkpoint {args.checkpoint} produced non-finite keypoints or scores for {broken} "
                                f"of {len(predictions)} persons (NaN or Inf weights?)")
    return rescore_and_nms(predictions, keypoint_set.sigmas_array())


def _evaluate_on_shards(args: argparse.Namespace) -> int:
    """The finetune stage's own validation (pipelines.finetune.run.validate) of a checkpoint on a shard set."""
    from pipelines.config import build_config
    from pipelines.finetune.config import FinetuneConfig
    from pipelines.finetune.run import validate
    from pipelines.tracking import Tracker
    from vitpose_core import load_model
    from vitpose_core.inference import resolve_device

    if args.checkpoint is None or args.images or args.detections or args.predictions:
        raise ValueError("--shards goes with --checkpoint alone (ground-truth boxes of the shards' val split)")
    model = load_model(args.checkpoint, dataset=args.dataset).to(resolve_device(args.device))
    data = {"shards": args.shards, **({"val_annotations": str(args.annotations)} if args.annotations else {})}
    config = build_config(FinetuneConfig, {
        "model": {"variant": model.config.variant, "input_size": list(model.config.input_size)},
        "data": data, "scaling": {"precision": args.precision}, "tracking": {"enabled": False},
        "eval": {"flip_test": args.flip_test is not False, "batch_size": args.batch_size, "num_visualized": 0},
    }, source="vitpose eval --shards")
    metrics = {name.removeprefix("val_"): value for name, value in
               validate(model, config, Tracker({}, active=False), epoch=0).items()}
    print(json.dumps(metrics, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"metrics": metrics, "shards": args.shards}, allow_nan=False))
    return 0
