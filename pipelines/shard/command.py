"""`vitpose shard`: keypoint annotations + images -> Parquet person-crop shards + manifest (Ray Data).

    vitpose shard --annotations ANN.json --images DIR_OR_URI --dataset NAME --split train|val --out URI
                  [--keypoints SET|FILE.json|FILE.yaml]
    vitpose shard --config pipelines/configs/local.yaml --section shard --out URI [--set rows_per_file=512 ...]

Any COCO-format keypoint file shards (plus raw AI Challenger and MPII's list layout). `--dataset` is a
free name; the keypoint set is the file's category unless `--keypoints` names a built-in set (coco, aic,
mpii, crowdpose, ochuman, ap10k, coco_wholebody, posetrack18), a COCO json or a keypoint-set YAML. The
manifest records each dataset's set (names, flip pairs, skeleton, sigmas) for training and evaluation.

Paths may be local or s3:// (endpoint and keys from the AWS_* environment). Rerunning with the same
inputs and config does nothing; --force redoes it. Prints the manifest's totals as JSON.
"""

from __future__ import annotations

import argparse
import json

from pipelines.training.command import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("shard", help="COCO-format keypoints (any set), raw AIC, MPII -> Parquet person-crop shards (Ray Data)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config=None)
    parser.add_argument("--annotations", help="annotation JSON (COCO person_keypoints or raw AIC list)")
    parser.add_argument("--images", help="directory or s3:// prefix holding the images")
    parser.add_argument("--dataset", help="a free name for the dataset (coco, aic, my_fish, ...)")
    parser.add_argument("--split", choices=["train", "val"])
    parser.add_argument("--format", choices=["auto", "coco", "aic_raw", "mpii"], default="auto")
    parser.add_argument("--keypoints", default=None, metavar="SET|FILE",
                        help="keypoint set: built-in name, COCO json or keypoint-set YAML (default: the file's category)")
    parser.add_argument("--out", help="output directory or s3:// prefix")
    parser.add_argument("--rows-per-file", type=int, default=None)
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    parser.add_argument("--force", action="store_true", help="redo the work even if the output is up to date")
    parser.set_defaults(func=run)


def build_shard_config(args: argparse.Namespace):
    from pipelines.config import ConfigError, build_config
    from pipelines.shard.config import ShardConfig
    from pipelines.training.command import stage_section

    data = stage_section(args)
    source_flags = (args.annotations, args.images, args.dataset, args.split)
    if any(source_flags):
        if not all(source_flags):
            raise ConfigError("--annotations, --images, --dataset and --split go together")
        data["sources"] = [{"annotations": args.annotations, "images": args.images, "dataset": args.dataset,
                            "split": args.split, "format": args.format,
                            **({"keypoints": args.keypoints} if args.keypoints else {})}]
    elif args.keypoints:
        raise ConfigError("--keypoints goes with --annotations (in a config file: sources[].keypoints)")
    if args.out:
        data["out"] = args.out
    if args.rows_per_file is not None:
        data["rows_per_file"] = args.rows_per_file
    return build_config(ShardConfig, data, source=args.config or "<command line>")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from pipelines import storage
    from pipelines.session import connect_ray, quiet_console
    from pipelines.shard.run import run_shard

    config = build_shard_config(args)
    # Ray's and Ray Data's messages (their tracebacks of a failed task too) go to a log file beside the stage's
    # folders, which the stage never touches; the console keeps the result, or the one-line error
    root = Path("vitpose-logs") if storage.is_s3(config.out) else Path(storage.normalize(config.out)) / "logs"
    log_file = (root / f"shard-{time.strftime('%Y%m%d-%H%M%S')}.log").resolve()
    restore = quiet_console(log_file, args.verbose, task_errors_to_console=False)
    try:
        connect_ray(address=args.address)
        manifest = run_shard(config, force=args.force)
    finally:
        restore()
    sets = {dataset: f"{record['name']} ({len(record['names'])} keypoints)"
            for dataset, record in manifest.get("keypoint_sets", {}).items()}
    print(json.dumps({"out": config.out, "totals": manifest["totals"], "counts": manifest["counts"],
                      "keypoint_sets": sets}, indent=1))
    return 0
