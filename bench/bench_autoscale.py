"""Autoscaling shown: a load ramp takes the pose deployment from its minimum to several replicas and back.

    .venv/bin/python bench/bench_autoscale.py [--phases 20:1,75:8,100:0] [--max-replicas 4]

A local multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head node and two worker nodes, each
its own raylet, own temp dir, free ports; the model replicas can only run on the workers, which
declare a `pose_worker` resource) serves the app built by `bind_app` around a random-init
vitpose-tiny. Closed-loop HTTP clients on 127.0.0.1 only (each sends its next request when the
previous one answers; a phase `SECONDS:CLIENTS` runs that many) ramp the load up and stop it. Every
second the script records the model deployment's replicas from `serve.status()`, the nodes they run
on, and the requests finished in that second (p50/p99 latency, non-2xx). The autoscaling delays are
short (upscale 2 s, downscale 10 s, look-back 12 s: Serve wants it above its 10 s metrics interval) so the run takes a few minutes.

Writes bench/results/autoscale.md (timeline summary + per-5 s table) and autoscale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_phases(text: str) -> list[tuple[float, int]]:
    phases = []
    for part in text.split(","):
        seconds, clients = part.split(":")
        phases.append((float(seconds), int(clients)))
    if not phases or any(s <= 0 or c < 0 or c > 64 for s, c in phases):
        raise SystemExit(f"--phases must be SECONDS:CLIENTS,... with 0 <= CLIENTS <= 64, got {text!r}")
    return phases


def request_body() -> tuple[bytes, str]:
    """A 320x240 synthetic image (PNG) and one person box: one crop per request."""
    from pipelines.serve.client import encode_png
    from vitpose_core.synthetic import SyntheticConfig, render_image

    image_bgr, people = render_image(0, SyntheticConfig(width=320, height=240, min_people=1, max_people=1, seed=5))
    return encode_png(np.ascontiguousarray(image_bgr[..., ::-1])), json.dumps([people[0]["bbox"]])


class Recorder:
    """Finished requests (end time, latency s, status) from all client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished: list[tuple[float, float, int]] = []

    def add(self, end: float, latency: float, status: int) -> None:
        with self.lock:
            self.finished.append((end, latency, status))


def client_loop(url: str, body: bytes, boxes: str, recorder: Recorder, stop: threading.Event) -> None:
    import requests

    session = requests.Session()
    while not stop.is_set():
        start = time.monotonic()
        try:
            status = session.post(f"{url}/v1/pose", data=body, params={"boxes": boxes},
                                  headers={"Content-Type": "image/png"}, timeout=60).status_code
        except requests.RequestException:
            status = -1
        recorder.add(time.monotonic(), time.monotonic() - start, status)


def replica_nodes() -> dict[str, int]:
    """node id (short) -> live PoseModel replica actors on it, from the GCS actor table (the state API
    needs a dashboard, which this cluster does not run)."""
    from ray._private.state import actors

    nodes: dict[str, int] = {}
    for actor in actors().values():
        if actor.get("State") == "ALIVE" and "PoseModel" in actor.get("ActorClassName", ""):
            node = actor["Address"]["NodeID"][:8]
            nodes[node] = nodes.get(node, 0) + 1
    return nodes


def model_replicas(app_name: str) -> tuple[int, int]:
    """(running, starting) replicas of the PoseModel deployment, from serve.status()."""
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is None or "PoseModel" not in application.deployments:
        return 0, 0
    states = application.deployments["PoseModel"].replica_states
    running = int(states.get("RUNNING", 0))
    return running, int(sum(states.values()) - running)


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from pipelines.serve.app import bind_app
    from pipelines.serve.config import ServeConfig
    from vitpose_core.checkpoint import save_checkpoint
    from vitpose_core.models.vitpose import build_model

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    phases = parse_phases(args.phases)
    work = Path(tempfile.mkdtemp(prefix="bench-autoscale-"))
    checkpoint = save_checkpoint(build_model("vitpose-tiny"), work / "tiny")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "gcs_server_port": free_port(), "temp_dir": str(work / "ray"), "include_dashboard": False,
        "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port()})
    for _ in range(2):
        cluster.add_node(num_cpus=args.max_replicas // 2, resources={"pose_worker": args.max_replicas // 2},
                         metrics_export_port=free_port(), runtime_env_agent_port=free_port())
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    port = free_port()
    config = ServeConfig.model_validate({
        "model": {"checkpoint": str(checkpoint)},
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.005},
        "autoscaling": {"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": 1.5,
                        "upscale_delay_s": 2, "downscale_delay_s": 10, "look_back_period_s": 12},
        # the replicas may only run on the worker nodes (one pose_worker unit each)
        "resources": {"model_num_cpus": 1, "ingress_num_cpus": 0.5, "torch_threads": 1,
                      "model_resources": {"pose_worker": 1}},
        "max_ongoing_requests": 64, "max_queued_requests": 128, "request_timeout_s": 60, "dtype": "fp32",
    })
    app = bind_app(config)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(app, name="vitpose", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    from pipelines.serve.run import wait_healthy

    wait_healthy(url, 300)
    body, boxes = request_body()
    recorder, samples, clients = Recorder(), [], []
    start = time.monotonic()
    stop_all = threading.Event()
    try:
        for seconds, count in phases:
            while len(clients) < count:  # ramp up: start more clients
                stop = threading.Event()
                thread = threading.Thread(target=client_loop, args=(url, body, boxes, recorder, stop), daemon=True)
                thread.start()
                clients.append((thread, stop))
            while len(clients) > count:  # ramp down
                thread, stop = clients.pop()
                stop.set()
            phase_end = time.monotonic() + seconds
            while time.monotonic() < phase_end and not stop_all.is_set():
                running, starting = model_replicas("vitpose")
                samples.append({"t": time.monotonic() - start, "clients": len(clients), "running": running,
                                "starting": starting, "nodes": replica_nodes()})
                time.sleep(max(0.0, 1.0 - (time.monotonic() - start - samples[-1]["t"])))
    finally:
        for _, stop in clients:
            stop.set()
        for thread, _ in clients:
            thread.join(timeout=60)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    finished = [(end - start, latency, status) for end, latency, status in recorder.finished]
    return {"phases": phases, "samples": samples, "finished": finished, "config": config.autoscaling.model_dump(),
            "load_average": os.getloadavg()}


def windows(result: dict, width: float = 5.0) -> list[dict]:
    """Per-`width` s: clients, replicas (max running), requests, req/s, p50/p99 ms, non-2xx."""
    samples, finished = result["samples"], result["finished"]
    end = samples[-1]["t"] if samples else 0.0
    rows = []
    for left in np.arange(0.0, end, width):
        right = left + width
        inside = [s for s in samples if left <= s["t"] < right]
        done = [(latency, status) for t, latency, status in finished if left <= t < right]
        ok = sorted(latency for latency, status in done if 200 <= status < 300)
        rows.append({"t": float(left), "clients": max((s["clients"] for s in inside), default=0),
                     "replicas": max((s["running"] for s in inside), default=0),
                     "starting": max((s["starting"] for s in inside), default=0),
                     "requests": len(done), "rps": len(done) / width,
                     "p50_ms": 1000 * statistics.median(ok) if ok else None,
                     "p99_ms": 1000 * float(np.percentile(ok, 99)) if ok else None,
                     "errors": sum(1 for _, status in done if not 200 <= status < 300)})
    return rows


def summary(result: dict) -> dict:
    samples = result["samples"]
    peak = max(s["running"] for s in samples)
    first_load = next(s["t"] for s in samples if s["clients"] > 0)
    reached_two = next((s["t"] for s in samples if s["running"] >= 2), None)
    decided_two = next((s["t"] for s in samples if s["running"] + s["starting"] >= 2), None)
    load_stop = next((s["t"] for s in samples if s["t"] > first_load and s["clients"] == 0), None)
    back_to_min = next((s["t"] for s in samples if load_stop is not None and s["t"] > load_stop
                        and s["running"] == result["config"]["min_replicas"] and s["starting"] == 0), None)
    peak_nodes = max((s["nodes"] for s in samples), key=lambda nodes: sum(nodes.values()))
    statuses = [status for _, _, status in result["finished"]]
    return {"initial_replicas": samples[0]["running"], "peak_replicas": peak, "peak_nodes": peak_nodes,
            "final_replicas": samples[-1]["running"], "load_start_s": first_load, "decided_2_s": decided_two, "reached_2_s": reached_two,
            "load_stop_s": load_stop, "back_to_min_s": back_to_min, "requests": len(statuses),
            "non_2xx": sum(1 for status in statuses if not 200 <= status < 300)}


def plot(rows: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].step([s["t"] for s in samples], [s["running"] for s in samples], where="post", label="running replicas")
    axes[0].step([s["t"] for s in samples], [s["clients"] for s in samples], where="post", label="clients",
                 linestyle="--")
    axes[0].set_ylabel("count")
    axes[0].legend(loc="upper right")
    mids = [row["t"] + 2.5 for row in rows]
    axes[1].plot(mids, [row["p50_ms"] for row in rows], marker="o", label="p50")
    axes[1].plot(mids, [row["p99_ms"] for row in rows], marker="o", label="p99")
    axes[1].set_ylabel("latency ms (5 s windows)")
    axes[1].legend(loc="upper right")
    axes[2].bar(mids, [row["rps"] for row in rows], width=4, label="req/s")
    axes[2].bar(mids, [row["errors"] for row in rows], width=4, color="red", label="non-2xx")
    axes[2].set_ylabel("per 5 s window")
    axes[2].set_xlabel("seconds since the Serve app was healthy")
    axes[2].legend(loc="upper right")
    fig.suptitle("vitpose-tiny on a local 3-node Ray cluster: replicas follow the load")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_markdown(rows: list[dict], result: dict, facts: dict, args: argparse.Namespace, path: Path) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [
        "# Autoscaling under a load ramp (bench/bench_autoscale.py)",
        "",
        f"Command: `.venv/bin/python bench/bench_autoscale.py --phases {args.phases} "
        f"--max-replicas {args.max_replicas}`",
        "",
        "A local multi-node Ray cluster (head: ingress, proxy, controller; two worker nodes that alone carry the "
        "`pose_worker` resource the model replicas need), closed-loop HTTP clients on 127.0.0.1. Autoscaling: "
        f"`{json.dumps(result['config'])}`. vitpose-tiny (random init) fp32, 1 torch thread per replica, "
        f"one 320x240 PNG with one box per request. Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with other jobs (load average at the end "
        f"{', '.join(f'{v:.1f}' for v in result['load_average'])}): latencies say how the replicas kept up here, "
        "not what the model costs.",
        "",
        "The head node runs no replica; each worker declares 2 CPUs and 2 `pose_worker`, but the ingress "
        "(0.5 CPU, no custom resource) may land on a worker, which then fits one replica: so 3 of the 4 allowed "
        "replicas can run, and the 4th waits for resources (counted as not running).",
        "",
        "## Timeline",
        "",
        f"- replicas at the start: {facts['initial_replicas']}; load starts at {facts['load_start_s']:.0f} s",
        f"- Serve starts more replicas at {ms(facts['decided_2_s'])} s (running + starting >= 2: Serve decided to scale up); they run "
        f"(>= 2 RUNNING) at {ms(facts['reached_2_s'])} s: replica start-up (process, torch import, model load, "
        "warm-up) is what takes the time on this box",
        f"- peak {facts['peak_replicas']} running replicas, on "
        f"nodes {facts['peak_nodes']}",
        f"- load stops at {ms(facts['load_stop_s'])} s; back to {result['config']['min_replicas']} replica at "
        f"{ms(facts['back_to_min_s'])} s; {facts['final_replicas']} at the end",
        f"- {facts['requests']} requests, {facts['non_2xx']} non-2xx",
        "",
        "![replicas, latency and throughput over time](autoscale.png)",
        "",
        "| t (s) | clients | running replicas (max) | not running: starting or stopping (max) | requests | req/s | p50 ms | p99 ms | non-2xx |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['t']:.0f} | {row['clients']} | {row['replicas']} | {row['starting']} | {row['requests']} | "
                     f"{row['rps']:.1f} | {ms(row['p50_ms'])} | {ms(row['p99_ms'])} | {row['errors']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="20:1,150:8,100:0", help="SECONDS:CLIENTS,... run in order")
    parser.add_argument("--max-replicas", type=int, default=4, choices=(2, 4, 6))
    parser.add_argument("--out", type=Path, default=RESULTS / "autoscale.md")
    args = parser.parse_args()
    result = run(args)
    rows = windows(result)
    facts = summary(result)
    print(json.dumps(facts, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (args.out.with_suffix(".json")).write_text(json.dumps({"summary": facts, "windows": rows,
                                                           "samples": result["samples"]}, indent=1))
    plot(rows, result, args.out.with_suffix(".png"))
    write_markdown(rows, result, facts, args, args.out)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
