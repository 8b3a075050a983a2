"""`vitpose plan`: every stage's effective config (after derivation and `--set`) and its resources, no compute.

    vitpose plan [--config pipelines/configs/cocoaic_vitpose_b_8gpu.yaml] [--set finetune.optim.lr=1e-3] [--json]

Fails, naming the stage and the key, on an inconsistency it can see before running (see pipelines/plan.py).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help="show every stage's effective config and resources; run nothing",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_config_arguments(parser)
    parser.add_argument("--cluster", default=None, help="Ray cluster YAML whose node types must fit every worker "
                        "(default: ray_cluster.yaml of this checkout)")
    parser.add_argument("--json", action="store_true", help='print {"stages": {stage: effective config}, ...}')
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.pipeline import load_pipeline_config
    from pipelines.plan import DEFAULT_CLUSTER, build_plan

    config = load_pipeline_config(args.config, args.overrides, args.overlays)
    plan = build_plan(config, args.cluster or DEFAULT_CLUSTER)
    if args.json:
        print(json.dumps(plan, indent=1))
        return 0
    for name, stage_config in plan["stages"].items():
        print(f"== {name}   resources: {json.dumps(plan['resources'][name])}")
        print(yaml.safe_dump(stage_config, sort_keys=False, default_flow_style=None).rstrip())
    print(f"== models   {json.dumps(plan['models'])}")
    return 0


def add_pipeline_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--overlay` and `--set` of the commands that take a pipeline file (`run`, `plan`)."""
    parser.add_argument("--config", help="pipeline YAML (default: the embedded pipelines/configs/local.yaml)")
    parser.add_argument("--overlay", dest="overlays", action="append", default=[], metavar="YAML",
                        help="a YAML file deep-merged over the config before --set (repeatable), e.g. "
                        "infra/rehearsal/overlay.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set finetune.schedule.epochs=2 (repeatable)")
