"""`vitpose detect`: train the person detector on a shard set's source images, score it, register it.

    vitpose detect --shards DIR_OR_URI --out DIR_OR_URI [--config FILE [--section detect]]
                   [--set train.epochs=4] [--model-name vitpose-detector] [--tracking-uri URI]

The config file (optional) is the detect stage's section (`pipelines.detect.config.DetectConfig`), e.g.
`--config pipelines/configs/local_detect.yaml --section detect`. Prints the stage record.
"""

from __future__ import annotations

import argparse

from pipelines.training.command import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("detect", help="train, score and register the person detector (box AP)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config=None)
    parser.add_argument("--shards", help="the shard stage output whose manifest names the train and val images")
    parser.add_argument("--out", help="where the detector and the val detections go (local or s3://)")
    parser.add_argument("--model-name", help="registered model name (default: vitpose-detector)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                               "./vitpose_runs/mlflow.db)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.config import build_config
    from pipelines.detect.config import DetectConfig
    from pipelines.detect.run import run_detect
    from pipelines.session import connect_ray
    from pipelines.training.command import print_record, stage_section

    data = stage_section(args)
    if args.shards:
        data.setdefault("data", {})["shards"] = args.shards
    for key, value in (("out", args.out), ("model_name", args.model_name), ("tracking_uri", args.tracking_uri)):
        if value:
            data[key] = value
    config = build_config(DetectConfig, data, source=args.config or "<command line>")
    connect_ray(address=args.address)
    return print_record(run_detect(config))
