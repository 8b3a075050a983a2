"""`vitpose finetune`: fine-tune ViTPose on crop shards with Ray Train (see pipelines/finetune.py)."""

from __future__ import annotations

import argparse
import json

from pipelines.commands.train_common import add_training_arguments, connect_ray, summarise


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune ViTPose on the shard stage's crops (Ray Train)")
    add_training_arguments(parser, default_config="finetune_tiny.yaml")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.commands.train_common import load_stage_config
    from pipelines.finetune import FinetuneConfig, run_finetune

    config = load_stage_config(FinetuneConfig, args)
    connect_ray(args)
    result = run_finetune(config, name=args.name)
    print(json.dumps(summarise(result), indent=1))
    return 0
