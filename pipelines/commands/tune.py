"""`vitpose tune`: Ray Tune over the finetune stage (resolution, attention, lr, layer decay, drop path; ASHA).

    vitpose tune --config pipelines/configs/tune_tiny.yaml --shards DIR_OR_URI --out DIR_OR_URI [--set KEY=VALUE]

The config's `tune:` section is `pipelines.tune.TuneConfig`. Rerunning after the driver died restores
the experiment (`Tuner.restore`) and continues it; rerunning a finished sweep prints its winner;
--force starts the sweep again. Prints the winner record (trial, params, val AP, registry) as JSON.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="Ray Tune over finetune with ASHA; registers the winner",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML whose `tune:` section is the stage config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. asha.grace_period=2 (repeatable)")
    parser.add_argument("--shards", help="shard stage output (local path or s3://)")
    parser.add_argument("--out", help="output directory or s3:// prefix")
    parser.add_argument("--force", action="store_true", help="start the sweep again instead of restoring it")
    parser.set_defaults(func=run)


def build_tune_config(args: argparse.Namespace):
    from pipelines.config import build_config, load_yaml
    from pipelines.tune import TuneConfig

    data = dict((load_yaml(args.config).get("tune") or {}) if args.config else {})
    for key in ("shards", "out"):
        if getattr(args, key):
            data[key] = getattr(args, key)
    overrides = [o.removeprefix("tune.") for o in args.overrides]
    return build_config(TuneConfig, data, overrides, source=args.config or "<command line>")


def run(args: argparse.Namespace) -> int:
    import ray

    from pipelines.train import local_ray_init_kwargs
    from pipelines.tune import run_tune

    config = build_tune_config(args)
    if not ray.is_initialized():
        ray.init(configure_logging=False, **local_ray_init_kwargs())  # joins RAY_ADDRESS if set
    record = run_tune(config, force=args.force)
    print(json.dumps({k: v for k, v in record.items() if k not in ("finetune_config", "trials")}, indent=1, default=str))
    return 0
