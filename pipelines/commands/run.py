"""`vitpose run`: raw data -> served champion, every stage in one command.

    vitpose run                                   # embedded default: synthetic data, local Ray, ./vitpose_runs
    vitpose run --config pipelines/configs/cocoaic_vitpose_b_8gpu.yaml
    vitpose run --set finetune.schedule.epochs=2 --from finetune
    vitpose run --stages shard,finetune --force

A stage whose record matches its config and inputs is skipped; `--force` reruns the selected stages.
See docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.commands.plan import add_pipeline_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the whole pipeline (shard -> ... -> serve)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_config_arguments(parser)
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--stages", help="comma-separated stages to run, e.g. shard,finetune")
    selection.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and the ones after it")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages even if up to date")
    serving = parser.add_mutually_exclusive_group()
    serving.add_argument("--keep-serving", dest="keep_serving", action="store_true", default=None,
                         help="after the summary, keep the endpoint up until Ctrl-C (default on a terminal)")
    serving.add_argument("--no-keep-serving", dest="keep_serving", action="store_false")
    parser.set_defaults(func=run)


def summary_lines(results: list[Any], config: Any, tracking_uri: str) -> list[str]:
    """Where things are and how to reach them, from the stage records."""
    by_name = {r.name: (r.record or {}) for r in results}
    outputs = {name: record.get("outputs", {}) for name, record in by_name.items()}
    lines = [f"  data         {outputs.get('shard', {}).get('shards', '(shard not run)')}"]
    for name in ("pretrain", "finetune", "tune", "distill"):
        if outputs.get(name, {}).get("checkpoint"):
            lines.append(f"  {name:<12} {outputs[name]['checkpoint']}")
    detect = by_name.get("detect", {})
    if detect:
        lines.append(f"  detector     {detect.get('outputs', {}).get('model_uri')} = v{detect.get('outputs', {}).get('version')}, "
                     f"box AP {detect.get('metrics', {}).get('champion_box_ap', float('nan')):.3f} on the val images "
                     "(serves box-free requests)")
    lines.append(f"  mlflow       {tracking_uri}")
    if tracking_uri.startswith("sqlite:"):
        lines.append(f"  mlflow ui    mlflow ui --backend-store-uri {tracking_uri} --port 5000  "
                     "(then open http://127.0.0.1:5000)")
    register = by_name.get("register", {})
    if register:
        out = register.get("outputs", {})
        scores = ", ".join(f"{name} {value:.3f}" for name, value in (out.get("scores") or {}).items())
        how = f"from {out.get('winner')}" if out.get("promoted") else \
            f"kept: this run's best ({out.get('winner')}) did not beat it"
        lines.append(f"  champion     {out.get('model_uri')} = v{out.get('version')} ({how}), "
                     f"AP {register.get('metrics', {}).get('ap', float('nan')):.3f} on the val split")
        if scores:
            lines.append(f"  candidates   {scores} (same val split, flip test)")
        metrics = register.get("metrics", {})
        if "ap_detected_boxes" in metrics:  # the pipeline has a detect stage
            lines.append(f"  person boxes champion AP {metrics['ap_detected_boxes']:.3f} with detected boxes, "
                         f"{metrics['ap_gt_boxes']:.3f} with ground-truth boxes (val images, flip test)")
        for name, uri in (out.get("pictures") or {}).items():
            lines.append(f"  picture      {uri}  ({name.replace('_', ' ')})")
    if register and config.shard.get("synthetic") is not None and not config.shard.get("sources"):
        lines.append("  note         this champion has seen only synthetic people (stick figures on noise): on real "
                     "photos use official or Hugging Face ViTPose weights (`vitpose predict --checkpoint vitpose-b.pth`, "
                     "docs/weights.md) or train on COCO/AIC with a cluster config (docs/cluster.md)")
    if outputs.get("serve", {}).get("url"):
        url = outputs["serve"]["url"]
        lines.append(f"  endpoint     {url}/v1/pose   (health {url}/healthz, API docs {url}/docs)")
        if not os.environ.get("RAY_ADDRESS"):
            lines.append("               up while this command runs: `vitpose run --keep-serving` keeps it until Ctrl-C")
        lines.append(f"  try it       curl -s -H 'content-type: image/jpeg' --data-binary @person.jpg {url}/v1/pose")
    return lines


def run(args: argparse.Namespace) -> int:
    from pipelines.pipeline import load_pipeline_config, run_pipeline
    from pipelines.progress import Reporter
    from pipelines.session import disconnect_ray, prints_to_log, resolve_tracking_uri, send_logs_to_file

    config = load_pipeline_config(args.config, args.overrides, args.overlays)
    # `--stages ,` or `--stages ''` is an empty selection (an error), not "every stage"
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages is not None else None
    log_file = send_logs_to_file(_log_path(config.workdir_uri), verbose=args.verbose)
    # the console is ours (stage lines, table, summary); what libraries print from any thread while the
    # command runs (Ray's "(raylet)" messages arrive until the cluster stops) goes to the log file
    console = sys.stdout
    reporter = Reporter(stream=console, log_file=str(log_file))
    with prints_to_log():
        try:
            results = run_pipeline(config, stages=stages, start=args.start, force=args.force, reporter=reporter)
            tracking_uri, _ = resolve_tracking_uri(config.mlflow.tracking_uri, config.workdir_uri)
            print("\n".join(summary_lines(results, config, tracking_uri)), file=console, flush=True)

            served = any(r.name == "serve" and r.state == "done" for r in results)
            keep = args.keep_serving if args.keep_serving is not None else console.isatty()
            if served and keep and not os.environ.get("RAY_ADDRESS"):
                print("serving until Ctrl-C ...", file=console, flush=True)
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    print("stopped", file=console, flush=True)
        finally:
            disconnect_ray()  # Ctrl-C, SIGTERM or an error: a private cluster's processes stop with the command
    return 0


def _log_path(workdir: str) -> Path:
    """`<workdir>/logs/run-<time>.log`; a workdir on S3 logs to ./vitpose-logs (a log file is appended to)."""
    from pipelines import storage

    root = Path("vitpose-logs") if storage.is_s3(workdir) else Path(workdir) / "logs"
    return (root / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log").resolve()
