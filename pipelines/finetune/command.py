"""`vitpose finetune`: fine-tune ViTPose on crop shards with Ray Train (pipelines/finetune/run.py)."""

from __future__ import annotations

import argparse

from pipelines.training.command import add_training_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune ViTPose on the shard stage's crops (Ray Train)")
    add_training_arguments(parser, default_config="finetune_tiny.yaml")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.finetune.config import FinetuneConfig
    from pipelines.finetune.run import run_finetune
    from pipelines.training.command import run_training_command

    return run_training_command(args, FinetuneConfig, run_finetune)
