"""`vitpose distill`: knowledge-token + output distillation of a trained ViTPose into a smaller student.

    vitpose distill --config pipelines/configs/distill_tiny.yaml --shards DIR_OR_URI --out DIR_OR_URI
                    [--teacher models:/vitpose@champion | runs:/... | CHECKPOINT_DIR] [--set KEY=VALUE]

The config's `distill:` section is `pipelines.distill.DistillConfig` (the finetune sections, with
`model` = the student, plus `teacher`, `student`, `distill`, `registry`). Switches:
`--set distill.knowledge_token=false`, `--set distill.output_weight=0`. Rerunning resumes both Train
runs from their checkpoints. Prints the record (teacher version, student checkpoint, val AP, registry).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("distill", help="knowledge-token distillation of a teacher into a small student",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML whose `distill:` section is the stage config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. distill.output_weight=0 (repeatable)")
    parser.add_argument("--shards", help="shard stage output (local path or s3://)")
    parser.add_argument("--out", help="output directory or s3:// prefix")
    parser.add_argument("--teacher", help="models:/name@alias, models:/name/version, runs:/... or a checkpoint dir")
    parser.set_defaults(func=run)


def build_distill_config(args: argparse.Namespace):
    from pipelines.config import build_config, load_yaml
    from pipelines.distill import DistillConfig

    data = dict((load_yaml(args.config).get("distill") or {}) if args.config else {})
    for key in ("shards", "out", "teacher"):
        if getattr(args, key):
            data[key] = getattr(args, key)
    overrides = [o.removeprefix("distill.") if o.startswith("distill.distill.") else o for o in args.overrides]
    return build_config(DistillConfig, data, overrides, source=args.config or "<command line>")


def run(args: argparse.Namespace) -> int:
    import ray

    from pipelines.distill import run_distill
    from pipelines.train import local_ray_init_kwargs

    config = build_distill_config(args)
    if not ray.is_initialized():
        ray.init(configure_logging=False, **local_ray_init_kwargs())  # joins RAY_ADDRESS if set
    print(json.dumps(run_distill(config), indent=1, default=str))
    return 0
