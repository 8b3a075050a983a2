"""The serve stage: Ray Serve application for ViTPose (see docs/serving.md).

`build_app` is the Serve application builder; it is re-exported lazily so
`import_path: pipelines.serve:build_app` works without importing Ray Serve until it is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from pipelines.serve.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
