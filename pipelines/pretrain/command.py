"""`vitpose pretrain`: MAE pretraining of the ViT backbone on crop shards with Ray Train (pipelines/pretrain/run.py)."""

from __future__ import annotations

import argparse

from pipelines.training.command import add_training_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pretrain", help="MAE-pretrain the ViT backbone on the shard stage's crops (Ray Train)")
    add_training_arguments(parser, default_config="pretrain_tiny.yaml")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.pretrain.config import PretrainConfig
    from pipelines.pretrain.run import run_pretrain
    from pipelines.training.command import run_training_command

    return run_training_command(args, PretrainConfig, run_pretrain)
