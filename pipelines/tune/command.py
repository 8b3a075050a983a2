"""`vitpose tune`: Ray Tune over the finetune stage (resolution, attention, lr, layer decay, drop path; ASHA).

    vitpose tune --config pipelines/configs/tune_tiny.yaml --shards DIR_OR_URI --out DIR_OR_URI [--set KEY=VALUE]

The config file is the tune stage's section (`pipelines.tune.config.TuneConfig`), as under `tune:` of a
pipeline file (or pass a pipeline file with `--section tune`). Rerunning after the driver died restores
the experiment (`Tuner.restore`) and continues it; rerunning a finished sweep prints its winner; --force
starts the sweep again. Prints the winner (trial, params, val AP); `vitpose register` registers it.
"""

from __future__ import annotations

import argparse

from pipelines.training.command import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="Ray Tune over finetune with ASHA; reports the best trial",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config="tune_tiny.yaml")
    parser.add_argument("--shards", help="shard stage output (local path or s3://)")
    parser.add_argument("--out", help="output directory or s3:// prefix")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    parser.add_argument("--force", action="store_true", help="start the sweep again instead of restoring it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.session import connect_ray
    from pipelines.training.command import config_from_args, print_record
    from pipelines.tune.config import TuneConfig
    from pipelines.tune.run import run_tune

    config = config_from_args(args, TuneConfig, {"shards": "shards", "out": "out"})
    connect_ray(address=args.address)
    return print_record(run_tune(config, force=args.force))
