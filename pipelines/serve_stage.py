"""The pipeline's last stage: serve the registered champion with Ray Serve and prove it answers.

It deploys `pipelines.serve.app:build_app` with the model source set to the registry alias the
register stage moved (`models:/<name>@<alias>`), waits for `/healthz`, posts one synthetic image to
`/v1/pose`, and returns the endpoint URL. On a local cluster the endpoint lives as long as the
`vitpose run` process (see `--keep-serving`); on a remote cluster Serve keeps it running.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from pipelines.config import StrictConfig
from pipelines.pipeline import StageContext, StageOutput


class ServeStageSection(StrictConfig):
    """Where to serve; `app` holds `ServeConfig` keys (batching, autoscaling, resources, ...)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "vitpose"
    startup_timeout_s: float = Field(180.0, gt=0)
    find_free_port: bool = Field(True, description="when `port` is taken (another Serve on the machine), use a free one")
    app: dict[str, Any] = {}


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _sample_jpeg() -> bytes:
    """One synthetic image with people in it (no dataset needed), JPEG-encoded."""
    import cv2

    from vitpose_core.synthetic import SyntheticConfig, render_image

    image, _ = render_image(0, SyntheticConfig(seed=12345))
    ok, encoded = cv2.imencode(".jpg", image)
    if not ok:
        raise RuntimeError("could not encode the sample image")
    return encoded.tobytes()


def wait_healthy(url: str, timeout_s: float) -> None:
    import requests

    deadline, last = time.time() + timeout_s, "no answer"
    while time.time() < deadline:
        try:
            response = requests.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except requests.RequestException as error:
            last = str(error)
        time.sleep(1.0)
    raise TimeoutError(f"the Serve app at {url} was not healthy after {timeout_s:.0f} s ({last})")


def run_serve_stage(context: StageContext, section: ServeStageSection) -> StageOutput:
    import requests
    from ray import serve

    from pipelines.serve.app import build_app

    registered = context.inputs["register"]["config"]
    args = dict(section.app)
    args["model"] = {**args.get("model", {}), "registered_model": registered.get("model_name", "vitpose"),
                     "alias": registered.get("alias", "champion"), "tracking_uri": context.tracking_uri}
    port = section.port if _port_free(section.host, section.port) or not section.find_free_port else _free_port(section.host)
    if port != section.port:
        print(f"      serve: port {section.port} is taken on {section.host}; serving on {port}", flush=True)
    serve.start(http_options={"host": section.host, "port": port})
    serve.run(build_app(args), name=section.app_name, route_prefix="/", blocking=False)
    url = f"http://{section.host}:{port}"
    wait_healthy(url, section.startup_timeout_s)

    started = time.perf_counter()
    response = requests.post(f"{url}/v1/pose", data=_sample_jpeg(), headers={"content-type": "image/jpeg"},
                             timeout=60)
    latency_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"sample request to {url}/v1/pose failed: HTTP {response.status_code} {response.text[:300]}")
    body = response.json()
    persons = len(body.get("persons", []))
    return StageOutput(outputs={"url": url, "model": body.get("model"), "version": body.get("version")},
                       metrics={"sample_latency_ms": latency_ms},
                       summary=f"{url}/v1/pose answered ({persons} person, {latency_ms:.0f} ms)")
