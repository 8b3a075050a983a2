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

    def __init__(self, stream: TextIO | None = None, log_file: str | None = None) -> None:
        self.stream = stream or sys.stdout
        self.log_file = log_file
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
        if self.log_file:
            self._print(f"  log      {self.log_file}  (Ray, Tune and MLflow messages; `vitpose -v run` shows them here)")

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
            self._print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
        total = format_seconds(time.time() - self.started)
        self._print(f"\npipeline {'finished' if ok else 'FAILED'} in {total} (MLflow parent run {parent_run_id})")
        for line in self.summary_lines:
            self._print(line)


class StageProgress:
    """A progress bar for a running training stage, fed from MLflow on the driver.

    Every Train run (pretrain, finetune, each tune trial, both distill runs) logs `total_steps` as a
    param and `train_loss` every few steps from rank 0, as a descendant of the stage's MLflow run. A
    thread here polls those runs and shows steps done / steps planned over all of them, with the latest
    loss and val AP. Reading MLflow instead of hooking the training loop keeps the stage modules
    unaware of the pipeline, and it works the same for a local cluster and a remote one.

    On a terminal it is a tqdm bar on stderr; otherwise (logs, `ray job logs`, CI) one line every
    `line_every_s` seconds, so a log file does not fill with carriage-return redraws.

    It also says when the stage's workers wait for resources: a placement group of this job pending for
    `wait_note_after_s` gets a line every `wait_line_every_s` (what it asks, for how long, and whether any
    alive node could hold it), so a cluster short of a node type is not a silent hang.
    """

    def __init__(self, client: Any, experiment_id: str, stage: str, stage_run_id: str,
                 stream: TextIO | None = None, poll_s: float = 5.0, line_every_s: float = 15.0,
                 wait_note_after_s: float = 30.0, wait_line_every_s: float = 60.0) -> None:
        import threading

        self.client, self.experiment_id, self.stage, self.root = client, experiment_id, stage, stage_run_id
        self.stream = stream or sys.stderr
        self.poll_s, self.line_every_s = poll_s, line_every_s
        self.wait_note_after_s, self.wait_line_every_s = wait_note_after_s, wait_line_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{stage}", daemon=True)
        self._bar: Any = None
        self._last_line = time.time()
        self._pending_since: dict[str, float] = {}
        self._last_wait_line = 0.0

    def __enter__(self) -> StageProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._bar is not None:
            self._bar.close()

    def snapshot(self) -> dict[str, float] | None:
        """Steps done and planned over the stage's Train runs, plus the latest loss and val AP."""
        runs = self.client.search_runs([self.experiment_id], max_results=500)
        children: dict[str, list[Any]] = {}
        for run in runs:
            children.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
        todo, training = [self.root], []
        while todo:  # the stage run's descendants (tune: stage -> sweep -> trials)
            for run in children.get(todo.pop(), []):
                todo.append(run.info.run_id)
                if "total_steps" in run.data.params:
                    training.append(run)
        if not training:
            return None
        done = sum(_latest_step(self.client, run) for run in training)
        total = sum(int(run.data.params["total_steps"]) for run in training)
        latest = max(training, key=lambda run: run.info.start_time)
        return {"done": min(done, total), "total": total, "runs": len(training),
                "loss": latest.data.metrics.get("train_loss"), "val_AP": latest.data.metrics.get("val_AP")}

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._note_waiting()
            except Exception:  # noqa: BLE001 - best effort, as below; Ray may be shutting down
                pass
            try:
                state = self.snapshot()
            except Exception:  # noqa: BLE001 - progress is best effort; a busy SQLite store must not fail a stage
                continue
            if state is not None:
                self._show(state)

    def waiting_note(self) -> str | None:
        """One line about this job's placement groups pending for ``wait_note_after_s`` or more; None if none."""
        import ray

        from pipelines.session import format_resources, pending_placement_groups

        if not ray.is_initialized():
            return None
        now = time.time()
        pending = pending_placement_groups()
        self._pending_since = {pg: self._pending_since.get(pg, now) for pg in pending}
        waiting = {pg: now - since for pg, since in self._pending_since.items() if now - since >= self.wait_note_after_s}
        if not waiting:
            return None
        longest = max(waiting, key=waiting.get)
        bundles = pending[longest]["bundles"]
        asks = (f"{len(bundles)} x {format_resources(bundles[0])}" if all(b == bundles[0] for b in bundles)
                else " + ".join(format_resources(b) for b in bundles))
        why = "no alive node has them" if pending[longest]["infeasible"] else "in use or not free on one node"
        others = f" (and {len(waiting) - 1} more groups)" if len(waiting) > 1 else ""
        return f"{self.stage}: waiting {waiting[longest]:.0f} s for Ray to place {asks}: {why}{others}"

    def _note_waiting(self) -> None:
        note = self.waiting_note()
        if note is None or time.time() - self._last_wait_line < self.wait_line_every_s:
            return
        self._last_wait_line = time.time()
        if self._bar is not None:
            self._bar.write(f"      {note}", file=self.stream)
        else:
            print(f"      {note}", file=self.stream, flush=True)

    def _show(self, state: dict[str, float]) -> None:
        extra = ", ".join(f"{key} {state[key]:.4g}" for key in ("loss", "val_AP") if state.get(key) is not None)
        runs = f"{state['runs']} runs, " if state["runs"] > 1 else ""
        if self.stream.isatty():
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=state["total"], desc=f"      {self.stage}", unit="step", file=self.stream,
                                 leave=False, dynamic_ncols=True)
            self._bar.total = state["total"]
            self._bar.n = state["done"]
            self._bar.set_postfix_str(f"{runs}{extra}")
        elif time.time() - self._last_line >= self.line_every_s:
            self._last_line = time.time()
            percent = 100 * state["done"] / max(state["total"], 1)
            print(f"      {self.stage}: step {state['done']:.0f}/{state['total']:.0f} ({percent:.0f}%) {runs}{extra}",
                  file=self.stream, flush=True)


def _latest_step(client: Any, run: Any) -> int:
    history = client.get_metric_history(run.info.run_id, "train_loss")
    return max((point.step for point in history), default=0)


class CountProgress:
    """Progress over a known number of items (images, frames) that a driver loop counts off.

    On a terminal a tqdm bar on stderr; otherwise (logs, `ray job logs`, CI) one line every
    `line_every_s` seconds and one at the end, so a log file does not fill with carriage-return redraws.
    """

    def __init__(self, total: int, label: str, unit: str = "image", stream: TextIO | None = None,
                 line_every_s: float = 15.0) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.line_every_s = line_every_s
        self.done = 0
        self.started = self._last_line = time.time()
        self._bar: Any = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"      {label}", unit=unit, file=self.stream, leave=False,
                             dynamic_ncols=True)

    def update(self, count: int, note: str = "") -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            if note:
                self._bar.set_postfix_str(note)
        elif time.time() - self._last_line >= self.line_every_s:
            self._last_line = time.time()
            self._line(note)

    def _line(self, note: str = "") -> None:
        elapsed = max(time.time() - self.started, 1e-9)
        percent = 100 * self.done / max(self.total, 1)
        extra = f", {note}" if note else ""
        print(f"      {self.label}: {self.done}/{self.total} {self.unit}s ({percent:.0f}%), "
              f"{self.done / elapsed:.2f} {self.unit}s/s{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.done:
            self._line()
