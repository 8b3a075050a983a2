"""What a person sees while `vitpose run` works: a header, one line per stage as it starts and ends
(state, wall time, a one-line result), and a closing table plus where everything lives.

Long stages draw their own progress bars (tqdm in the generators and training loops); this module
only prints whole lines, so it reads the same in a terminal, in `ray job logs` and in CI logs.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

STATE_MARK = {"done": "ok", "skipped": "skip", "failed": "FAIL", "not-selected": "-"}


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s"


class Reporter:
    """Prints pipeline progress to `stream` (stdout by default), flushing each line."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.started = time.time()
        self.summary_lines: list[str] = []

    def _print(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def start(self, config: Any, selected: list[str], *, workdir: str, tracking_uri: str, ray: str) -> None:
        self.started = time.time()
        self._print(f"vitpose run: pipeline {config.name!r}, stages {' -> '.join(selected)}")
        self._print(f"  workdir  {workdir}")
        self._print(f"  mlflow   {tracking_uri}")
        self._print(f"  ray      {ray}")

    def stage_started(self, name: str, index: int, total: int) -> None:
        self._print(f"[{index + 1}/{total}] {name:<9} running ...")

    def stage_finished(self, result: Any, index: int, total: int) -> None:
        how = "skipped (same config and inputs)" if result.state == "skipped" else f"done in {format_seconds(result.seconds)}"
        detail = f"  {result.summary}" if result.summary else ""
        self._print(f"[{index + 1}/{total}] {result.name:<9} {how}{detail}")

    def stage_failed(self, name: str, seconds: float, error: BaseException, index: int, total: int) -> None:
        self._print(f"[{index + 1}/{total}] {name:<9} FAILED after {format_seconds(seconds)}: "
                    f"{type(error).__name__}: {error}")

    def add_summary(self, line: str) -> None:
        """Stages add closing lines (endpoint URL, champion AP) to print under the table."""
        self.summary_lines.append(line)

    def finish(self, results: list[Any], *, parent_run_id: str, ok: bool) -> None:
        rows = [("stage", "state", "time", "result")]
        rows += [(r.name, STATE_MARK.get(r.state, r.state), format_seconds(r.seconds) if r.state == "done" else "",
                  r.summary) for r in results]
        widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
        self._print()
        for row in rows:
            self._print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
        total = format_seconds(time.time() - self.started)
        self._print(f"\npipeline {'finished' if ok else 'FAILED'} in {total} (MLflow parent run {parent_run_id})")
        for line in self.summary_lines:
            self._print(line)
