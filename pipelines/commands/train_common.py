"""Arguments and helpers shared by the training commands (`pretrain`, `finetune`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def add_training_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=str(CONFIG_DIR / default_config),
                        help=f"stage YAML (default: pipelines/configs/{default_config})")
    parser.add_argument("--section", default=None,
                        help="read one top-level section of a pipeline YAML (e.g. 'finetune' of local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.lr=5e-4 (repeatable)")
    parser.add_argument("--shards", default=None, help="shorthand for --set data.shards=URI")
    parser.add_argument("--name", default=None, help="Ray run name (default: <stage>-<config hash>; reuse to resume)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")


def load_stage_config(cls: type, args: argparse.Namespace) -> Any:
    from pipelines.config import load_config

    overrides = list(args.overrides) + ([f"data.shards={args.shards}"] if args.shards else [])
    return load_config(cls, args.config, overrides, section=args.section)


def connect_ray(args: argparse.Namespace) -> None:
    """Join a cluster (`--address` / RAY_ADDRESS) or start a private local one with token auth off."""
    import ray

    if ray.is_initialized():
        return
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # private local cluster on 127.0.0.1
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(include_dashboard=False)


def summarise(result: Any) -> dict[str, Any]:
    checkpoint = result.checkpoint
    return {"metrics": result.metrics, "return_value": result.return_value,
            "checkpoint": checkpoint.path if checkpoint is not None else None}
