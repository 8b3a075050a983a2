"""`vitpose register`: score candidate checkpoints and the current champion on one val set, register the
best candidate, and move the alias to it only if it beats the champion.

    vitpose register --checkpoint finetune=DIR_OR_URI [--checkpoint tune=...] --shards DIR_OR_URI
                     [--model-name vitpose] [--alias champion] [--tracking-uri URI] [--set scoring.eval.flip_test=false]
                     [--detections val_detections.json]   # also: the champion's AP with these boxes vs ground truth

The config file (optional) is the register stage's section (`pipelines.register.config.RegisterConfig`).
Inside `vitpose run` this is the register stage; tune and distill never register on their own.
"""

from __future__ import annotations

import argparse

from pipelines.training.command import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("register", help="register the best candidate; promote it if it beats the champion",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config=None)
    parser.add_argument("--checkpoint", dest="checkpoints", action="append", default=[], metavar="NAME=URI",
                        help="a candidate: name and checkpoint (dir, s3:// prefix, models:/..., runs:/...)")
    parser.add_argument("--shards", help="the shard stage output whose val split scores every model")
    parser.add_argument("--model-name", help="registered model name (default: vitpose)")
    parser.add_argument("--alias", help="alias the winner gets (default: champion)")
    parser.add_argument("--detections", help="COCO detection results on the val images (the detect stage's "
                        "val_detections.json): also report the champion's pose AP with them and with ground-truth boxes")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                               "./vitpose_runs/mlflow.db)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.config import ConfigError, build_config
    from pipelines.register.config import RegisterConfig
    from pipelines.register.run import run_register
    from pipelines.training.command import print_record, stage_section

    data = stage_section(args)
    for item in args.checkpoints:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise ConfigError(f"--checkpoint {item!r} is not NAME=URI")
        data.setdefault("checkpoints", {})[name] = uri
    if args.shards:
        data.setdefault("scoring", {}).setdefault("data", {})["shards"] = args.shards
    for key, value in (("model_name", args.model_name), ("alias", args.alias), ("tracking_uri", args.tracking_uri),
                       ("detections", args.detections)):
        if value:
            data[key] = value
    data.setdefault("scoring", {}).setdefault("tracking", {})["enabled"] = False
    return print_record(run_register(build_config(RegisterConfig, data, source=args.config or "<command line>")))
