"""`vitpose serve`: run the pose service (Ray Serve) until interrupted, or deploy it and return.

    vitpose serve [--config pipelines/configs/serve.yaml] [--set model.alias=challenger ...]
                  [--checkpoint DIR | --run-id ID | --model-alias ALIAS] [--address auto] [--detach]

Without `--address` a local Ray instance is started (token auth off, as for every local run of this
project; RAY_AUTH_MODE set in the environment wins). The HTTP proxy listens on the config's host and
port (default 127.0.0.1:8000). For a cluster, prefer `serve deploy infra/serve/serve_config.yaml`
or the KubeRay RayService in infra/kuberay: they build the same app from the same keys.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the champion model over HTTP (Ray Serve)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="ServeConfig YAML: the serve section of a pipeline file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. batching.max_batch_size=32 (repeatable)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="serve this checkpoint (own format dir or official .pth)")
    source.add_argument("--run-id", help="serve the model logged by this MLflow run")
    source.add_argument("--model-alias", help="serve registered model @ this alias (default: champion)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    parser.add_argument("--detach", action="store_true", help="deploy and return instead of blocking")
    parser.set_defaults(func=run)


def source_overrides(args: argparse.Namespace) -> list[str]:
    """The --checkpoint/--run-id/--model-alias/--tracking-uri flags as config overrides."""
    overrides = []
    if args.checkpoint:
        overrides.append(f"model.checkpoint={Path(args.checkpoint).resolve()}")
    if args.run_id:
        overrides.append(f"model.run_id={args.run_id}")
    if args.model_alias:
        overrides.append(f"model.alias={args.model_alias}")
    if args.tracking_uri:
        overrides.append(f"model.tracking_uri={args.tracking_uri}")
    return overrides


def run(args: argparse.Namespace) -> int:
    from pipelines.serve.app import bind_app, load_serve_config

    config = load_serve_config({"config_file": str(args.config),
                                "overrides": [*args.overrides, *source_overrides(args)]})

    from ray import serve

    from pipelines.session import connect_ray, interrupt_taken

    connect_ray(address=args.address)
    serve.start(http_options={"host": config.host, "port": config.port,
                              "request_timeout_s": config.request_timeout_s + 5})
    serve.run(bind_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    print(f"serving {config.model.uri} at {url}  (POST {url}/v1/pose, docs at {url}/docs)", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        interrupt_taken()  # Ctrl-C or SIGTERM: shutting down, not to be interrupted again
        print("shutting down", flush=True)
        serve.shutdown()
    return 0
