"""The rehearsal submission of a pipeline config: `vitpose run --config X --overlay infra/rehearsal/overlay.yaml`.

The overlay file (overlay.yaml, next to this module) shrinks sizes only; what depends on the running
rehearsal (its bucket, its free Serve port) is given with `--set`, so the overlay is the same file for every
config and every rehearsal. The workdir is `s3://<bucket>/<config name>`: each config keeps the storage
layout it has on a cluster, in a prefix of its own.

    python -m infra.rehearsal.overlay --config pipelines/configs/vitpose_h_fsdp.yaml   # prints the ray job submit line
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OVERLAY = Path(__file__).with_name("overlay.yaml")
# the shipped configs written for a cluster (S3 workdir, GPU workers); local.yaml takes the overlay too
CLUSTER_CONFIGS = ("pipelines/configs/cocoaic_vitpose_b_8gpu.yaml", "pipelines/configs/vitpose_h_fsdp.yaml")


def config_name(config: str | Path) -> str:
    from pipelines.config import load_yaml

    path = Path(config) if Path(config).is_absolute() else REPO / config
    return str(load_yaml(path).get("name") or path.stem)


def workdir(config: str | Path, bucket: str, name: str | None = None) -> str:
    return f"s3://{bucket}/{name or config_name(config)}"


def run_command(config: str | Path, bucket: str, serve_port: int, *, name: str | None = None,
                overrides: Sequence[str] = (), stages: str | None = None) -> list[str]:
    """The `vitpose run` entrypoint of the rehearsal job (paths relative to the repository, the job's
    working dir); `name` gives the workdir another prefix (a second rehearsal of the same config)."""
    command = ["vitpose", "run", "--config", str(config), "--overlay", str(OVERLAY.relative_to(REPO)),
               "--set", f"workdir={workdir(config, bucket, name)}", "--set", f"serve.port={serve_port}"]
    for override in overrides:
        command += ["--set", override]
    if stages:
        command += ["--stages", stages]
    return [*command, "--no-keep-serving"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.rehearsal.overlay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="pipeline YAML, relative to the repository")
    parser.add_argument("--bucket", default=os.environ.get("VITPOSE_REHEARSAL_BUCKET", "vitpose-rehearsal"))
    parser.add_argument("--serve-port", type=int, default=int(os.environ.get("VITPOSE_REHEARSAL_SERVE_PORT", "8000")))
    args = parser.parse_args(argv)
    entrypoint = run_command(args.config, args.bucket, args.serve_port)
    print(shlex.join(["ray", "job", "submit", "--working-dir", ".", "--", *entrypoint]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
