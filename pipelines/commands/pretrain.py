"""`vitpose pretrain`: MAE-pretrain the ViT backbone on crop shards with Ray Train (see pipelines/pretrain.py)."""

from __future__ import annotations

import argparse
import json

from pipelines.commands.train_common import add_training_arguments, connect_ray, summarise


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pretrain", help="MAE pretraining of the ViT backbone (Ray Train)")
    add_training_arguments(parser, default_config="pretrain_tiny.yaml")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.commands.train_common import load_stage_config
    from pipelines.pretrain import PretrainConfig, run_pretrain

    config = load_stage_config(PretrainConfig, args)
    connect_ray(args)
    result = run_pretrain(config, name=args.name)
    print(json.dumps(summarise(result), indent=1))
    return 0
