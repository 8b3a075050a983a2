"""Arguments and helpers the training commands share (`vitpose pretrain`, `vitpose finetune`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """`--config FILE` (a stage file, or a pipeline file with `--section`) and repeatable `--set`."""
    parser.add_argument("--config", default=str(CONFIG_DIR / default_config) if default_config else None,
                        help="the stage's YAML: its section of a pipeline file, or a whole pipeline file with "
                             f"--section (default: {'pipelines/configs/' + default_config if default_config else 'none'})")
    parser.add_argument("--section", default=None,
                        help="read the stage from this section of a pipeline YAML (e.g. `finetune` of local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=5e-4 (repeatable)")


def add_training_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    add_config_arguments(parser, default_config)
    parser.add_argument("--shards", default=None, help="shorthand for --set data.shards=URI")
    parser.add_argument("--name", default=None, help="Ray run name (default: <stage>-<config hash>; reuse to resume)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")


def stage_section(args: argparse.Namespace) -> dict[str, Any]:
    """The stage's section from `--config` (whole file, or `--section` of a pipeline file), `--set` applied."""
    from pipelines.config import ConfigError, apply_overrides, load_yaml

    data = load_yaml(args.config) if args.config else {}
    if args.section is not None:
        if args.section not in data:
            raise ConfigError(f"{args.config} has no section {args.section!r}; its sections: {', '.join(data) or 'none'}")
        data = data[args.section] or {}
    return apply_overrides(data, args.overrides)


def config_from_args(args: argparse.Namespace, config_class: type, flags: dict[str, str]) -> Any:
    """The stage's config from `--config`/`--section`/`--set`, each given flag (`flags`: argument name ->
    dotted config key, e.g. {"shards": "data.shards"}) written over the file's value."""
    from pipelines.config import build_config

    section = stage_section(args)
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value:
            *parents, last = key.split(".")
            node = section
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
    return build_config(config_class, section, source=args.config or "<command line>")


def print_record(output: Any) -> int:
    """A stage's record on stdout, as JSON (what `vitpose run` writes to stage.json)."""
    import json

    print(json.dumps({"outputs": output.outputs, "metrics": output.metrics, "summary": output.summary},
                     indent=1, default=str))
    return 0


def summarise(result: Any) -> dict[str, Any]:
    checkpoint = result.checkpoint
    return {"metrics": result.metrics, "return_value": result.return_value,
            "checkpoint": checkpoint.path if checkpoint is not None else None}


def run_training_command(args: argparse.Namespace, config_class: type, run_function: Any) -> int:
    """Load the stage config, join or start Ray, train (resuming a run of the same name), print the record."""
    from pipelines.session import connect_ray

    config = config_from_args(args, config_class, {"shards": "data.shards"})
    connect_ray(address=args.address)
    return print_record(run_function(config, name=args.name))
