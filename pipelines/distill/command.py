"""`vitpose distill`: knowledge-token + output distillation of a trained ViTPose into a smaller student.

    vitpose distill --config pipelines/configs/distill_tiny.yaml --shards DIR_OR_URI --out DIR_OR_URI
                    [--teacher models:/vitpose@champion | runs:/... | CHECKPOINT_DIR] [--set KEY=VALUE]

The config file is the distill stage's section (`pipelines.distill.config.DistillConfig`: the finetune
sections, with `model` = the student, plus `teacher`, `student`, `distill`). Switches:
`--set distill.knowledge_token=false`, `--set distill.output_weight=0`. Rerunning resumes both Train
runs from their checkpoints. Prints the record (teacher, student checkpoint, val AP); `vitpose register`
registers the student.
"""

from __future__ import annotations

import argparse

from pipelines.training.command import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("distill", help="knowledge-token distillation of a teacher into a small student",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config="distill_tiny.yaml")
    parser.add_argument("--shards", help="shard stage output (local path or s3://)")
    parser.add_argument("--out", help="output directory or s3:// prefix")
    parser.add_argument("--teacher", help="models:/name@alias, models:/name/version, runs:/... or a checkpoint dir")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.distill.config import DistillConfig
    from pipelines.distill.run import run_distill
    from pipelines.session import connect_ray
    from pipelines.training.command import config_from_args, print_record

    config = config_from_args(args, DistillConfig, {"out": "out", "teacher": "teacher", "shards": "data.shards"})
    connect_ray(address=args.address)
    return print_record(run_distill(config))
