"""Serve the configured model with Ray Serve and prove it answers (the serve stage of `vitpose run`).

It deploys `pipelines.serve.app:bind_app`, waits for `/healthz`, posts one synthetic image to
`/v1/pose`, and returns the endpoint URL. On a local cluster the endpoint lives as long as the driver
process (`vitpose run --keep-serving`); on a remote cluster Serve keeps it running.
"""

from __future__ import annotations

import time

from pipelines.contract import StageOutput
from pipelines.serve.config import ServeConfig


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


def run_serve(config: ServeConfig) -> StageOutput:
    """Deploy the app, wait for /healthz, answer one sample request; the record names the endpoint."""
    import requests
    from ray import serve

    from pipelines.serve.app import bind_app

    port = config.port if _port_free(config.host, config.port) or not config.find_free_port else _free_port(config.host)
    if port != config.port:
        print(f"      serve: port {config.port} is taken on {config.host}; serving on {port}", flush=True)
    serve.start(http_options={"host": config.host, "port": port, "request_timeout_s": config.request_timeout_s + 5})
    serve.run(bind_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    url = f"http://{config.host}:{port}{config.route_prefix.rstrip('/')}"
    wait_healthy(url, config.startup_timeout_s)

    started = time.perf_counter()
    response = requests.post(f"{url}/v1/pose", data=_sample_jpeg(), headers={"content-type": "image/jpeg"},
                             timeout=60)
    latency_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"sample request to {url}/v1/pose failed: HTTP {response.status_code} {response.text[:300]}")
    body = response.json()
    persons = len(body.get("persons", []))
    return StageOutput(outputs={"url": url, "model": body.get("model"), "version": body.get("version")},
                       metrics={"sample_latency_ms": latency_ms, "sample_persons": float(persons)},
                       summary=f"{url}/v1/pose answered ({persons} person, {latency_ms:.0f} ms)")
