"""`vitpose shard`: keypoint annotations + images -> Parquet person-crop shards + manifest (Ray Data).

    vitpose shard --annotations ANN.json --images DIR_OR_URI --dataset coco|aic --split train|val --out URI
    vitpose shard --config pipelines/configs/local.yaml --section shard --out URI [--set rows_per_file=512 ...]

Paths may be local or s3:// (endpoint and keys from the AWS_* environment). Rerunning with the same
inputs and config does nothing; --force redoes it. Prints the manifest's totals as JSON.
"""

from __future__ import annotations

import argparse
import json

from pipelines.training.command import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("shard", help="raw COCO/AIC -> Parquet person-crop shards (Ray Data)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config=None)
    parser.add_argument("--annotations", help="annotation JSON (COCO person_keypoints or raw AIC list)")
    parser.add_argument("--images", help="directory or s3:// prefix holding the images")
    parser.add_argument("--dataset", choices=["coco", "aic"])
    parser.add_argument("--split", choices=["train", "val"])
    parser.add_argument("--format", choices=["auto", "coco", "aic_raw"], default="auto")
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
                            "split": args.split, "format": args.format}]
    if args.out:
        data["out"] = args.out
    if args.rows_per_file is not None:
        data["rows_per_file"] = args.rows_per_file
    return build_config(ShardConfig, data, source=args.config or "<command line>")


def run(args: argparse.Namespace) -> int:
    from pipelines.session import connect_ray
    from pipelines.shard.run import run_shard

    config = build_shard_config(args)
    connect_ray(address=args.address)
    manifest = run_shard(config, force=args.force)
    print(json.dumps({"out": config.out, "totals": manifest["totals"], "counts": manifest["counts"]}, indent=1))
    return 0
