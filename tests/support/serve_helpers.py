"""Shared setup of the Serve tests: a tiny random-init checkpoint and a real Serve app on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A vitpose-tiny with random weights (seeded), saved in the project's format."""
    import torch

    from vitpose_core.checkpoint import save_checkpoint
    from vitpose_core.models.vitpose import build_model

    torch.manual_seed(seed)
    model = build_model("vitpose-tiny")
    return save_checkpoint(model, directory, metadata={"purpose": "serve tests"})


@contextlib.contextmanager
def running_app(config: dict[str, Any], port: int, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Start Serve on 127.0.0.1:`port` with `build_app(config)`; yield the base URL; shut Serve down."""
    from ray import serve

    from pipelines.serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="vitpose", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, startup_timeout_s)
        yield url
    finally:
        serve.shutdown()


def wait_healthy(url: str, timeout_s: float) -> float:
    """Poll /healthz until 200; returns the seconds waited."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{url} not healthy after {timeout_s} s")
        time.sleep(0.25)
