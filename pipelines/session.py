"""The one place that connects to Ray and points MLflow at its tracking store.

* `connect_ray` is the only `ray.init` in pipelines/: it joins the cluster of a `ray job submit` job
  (RAY_ADDRESS, or an explicit address) or starts a private local cluster, and sets the auth mode and
  the dashboard explicitly (Ray 2.60 turns token auth on for local clusters).
* `resolve_tracking_uri` turns a configured URI (or MLFLOW_TRACKING_URI, or a SQLite file under the
  workdir) into an absolute one, once, on the driver; `use_tracking_uri` is the only
  `mlflow.set_tracking_uri` (for MLflow's fluent API in Train workers); `mlflow_client` builds a client
  for an explicit URI, so nothing depends on a process-global default.
* `own_placement_groups` / `release_placement_groups` free what a finished stage left reserved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

from pipelines import storage

logger = logging.getLogger(__name__)


def connect_ray(*, address: str | None = None, num_cpus: int | None = None, include_dashboard: bool = False,
                log_to_driver: bool = False, auth_mode: str | None = None) -> str:
    """Join a cluster (`address`, else RAY_ADDRESS) or start a private local one; returns where.

    `num_cpus`, `include_dashboard` and `auth_mode` apply to a local cluster only: a joined cluster
    decides its own. The local default is token auth off, since the private cluster binds 127.0.0.1 and
    lives as long as the command (an explicit RAY_AUTH_MODE in the environment wins).
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
    else:
        os.environ.setdefault("RAY_AUTH_MODE", auth_mode or "disabled")
        # address="local": a new private cluster, never one that a `ray start` on this machine left recorded
        # in /tmp/ray/ray_current_cluster (ray.init() alone would attach to it, and refuse num_cpus)
        kwargs = {"address": "local", "num_cpus": num_cpus, "include_dashboard": include_dashboard,
                  "log_to_driver": log_to_driver}
    # Ray Data's per-operator bars redraw with carriage returns (a flood in job logs); the pipeline draws its
    # own per-stage bars. The executors run in worker processes (Train's SplitCoordinator, Tune trials):
    # a private cluster's workers inherit this process's environment, a joined cluster's get it only
    # through the job's runtime env
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if address:
        quiet = quiet_workers_env()
        if quiet:
            kwargs["runtime_env"] = {"env_vars": quiet}
    ray.init(configure_logging=False, **kwargs)
    stop_on_signals()
    if address:
        return address
    return f"local ({ray.get_runtime_context().gcs_address}, {int(ray.cluster_resources().get('CPU', 0))} CPUs)"


QUIET_WORKER_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def quiet_workers_env() -> dict[str, str]:
    """What the driver adds to the job's runtime env so every worker keeps Ray Data's bars off: the keys the
    submitted job's own runtime env does not set (Ray refuses to merge a key set in both, and a value the
    submitter chose wins)."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job_env: dict[str, str] = {}
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
        job_env = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    return {key: value for key, value in QUIET_WORKER_ENV.items() if key not in job_env}


# the signal that stopped this process, kept because Ray Train and Tune re-raise a bare KeyboardInterrupt
# (the message naming the signal is lost on the way up to the CLI)
STOPPED_BY: str | None = None


# seconds between repeated interrupts of a driver that has not taken the first one (see stop_on_signals)
REINTERRUPT_S = 5.0
_INTERRUPT_TAKEN = threading.Event()


def stop_on_signals() -> None:
    """SIGTERM, SIGHUP and SIGINT interrupt the driver as Ctrl-C does, so its `finally` blocks run: the stage's
    MLflow run ends KILLED, no record is written (the rerun resumes from checkpoints), and `disconnect_ray`
    stops a private cluster. Ray's own SIGTERM handler exits without them and left its processes behind.

    A KeyboardInterrupt raised by a signal handler lands wherever the main thread is; in a weakref callback
    or a `__del__` Python prints "Exception ignored" and carries on (seen: a SIGTERM swallowed by importlib's
    module-lock callback, and the run went on training for minutes). So the first signal also starts a
    thread that interrupts the main thread again every REINTERRUPT_S until the driver has taken the
    interrupt (`interrupt_taken`: a stage's handler, `disconnect_ray`, the CLI).
    """
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        global STOPPED_BY
        first = STOPPED_BY is None
        STOPPED_BY = signal.Signals(signum).name
        if first:
            threading.Thread(target=_interrupt_until_taken, args=(signum,), daemon=True,
                             name="vitpose-reinterrupt").start()
        raise KeyboardInterrupt(f"stopped by signal {STOPPED_BY}")

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, interrupt)


def _interrupt_until_taken(signum: int) -> None:
    import _thread

    while not _INTERRUPT_TAKEN.wait(REINTERRUPT_S):
        _thread.interrupt_main(signum)  # runs the handler above in the main thread: a fresh KeyboardInterrupt


def interrupt_taken() -> None:
    """The driver is handling the interrupt (its cleanup is under way): interrupt it no more."""
    _INTERRUPT_TAKEN.set()


def disconnect_ray() -> None:
    """Leave the cluster; a private local cluster started by `connect_ray` stops with it."""
    import ray

    if STOPPED_BY is not None:
        interrupt_taken()  # no repeated interrupt in the middle of stopping the cluster
    if ray.is_initialized():
        ray.shutdown()


# the libraries whose INFO chatter (cluster start, Tune/Train/Data set-up, MLflow warnings) goes to the log file
CHATTY_LOGGERS = ("ray", "mlflow", "alembic", "py.warnings", "urllib3", "filelock", "pipelines", "vitpose_core")


# the run's log file handler and whether the console keeps INFO lines (set by send_logs_to_file)
_LOG_FILE: Any = None
_VERBOSE = False


def send_logs_to_file(path: Path, verbose: bool = False) -> Path:
    """Everything logged (ours, Ray's, Tune's, MLflow's, Python warnings) goes to `path`; the console keeps the
    stage lines and progress bars the command prints itself, plus errors. `verbose` keeps the console's
    INFO lines too (`vitpose -v run`)."""
    import logging

    global _LOG_FILE, _VERBOSE
    if _LOG_FILE is not None:  # a second command in the same process (tests): the earlier file stops here
        for logger in [logging.getLogger(), *map(logging.getLogger, logging.Logger.manager.loggerDict)]:
            if _LOG_FILE in logger.handlers:
                logger.removeHandler(_LOG_FILE)
        _LOG_FILE.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    _LOG_FILE, _VERBOSE = handler, verbose
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)  # MLflow's and Ray's UserWarnings: into the file, not between stage lines
    if not verbose:
        for console in [h for h in root.handlers if h is not handler]:
            console.setLevel(logging.ERROR)
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    # Ray ("ray", "ray.data") and MLflow ("mlflow") give their loggers console handlers of their own and
    # stop propagation when they are imported: import them now and route those loggers too
    import mlflow  # noqa: F401
    import ray.data  # noqa: F401
    import ray.serve  # noqa: F401  (its "ray.serve" logger gets a stderr handler on import)

    route_library_logs()
    return path


def quiet_console(log_file: Path, verbose: bool, task_errors_to_console: bool = True):
    """`send_logs_to_file` for one command, undone when it ends (the CLI may run in a longer process, as in
    tests): returns the function that restores the console handlers.

    `task_errors_to_console=False`: Ray Data's own ERROR records (a failed task's traceback, "please open an
    issue on the Ray project") go to the log file only. The command raises that error itself, so the CLI
    still shows it: one line for a user error (an S3 outage), the traceback for a bug.
    """
    import logging

    root = logging.getLogger()
    saved = [(handler, handler.level) for handler in root.handlers]
    send_logs_to_file(log_file, verbose=verbose)
    added = [handler for handler in root.handlers if handler not in dict(saved)]
    silenced: list[tuple[logging.Handler, int]] = []
    if not task_errors_to_console and not verbose:
        for name in ["ray.data", *logging.Logger.manager.loggerDict]:
            if name == "ray.data" or name.startswith("ray.data."):
                for console in logging.getLogger(name).handlers:
                    if not isinstance(console, logging.FileHandler):
                        silenced.append((console, console.level))
                        console.setLevel(logging.CRITICAL + 1)

    def restore() -> None:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        for handler, level in [*saved, *silenced]:
            handler.setLevel(level)
        logging.captureWarnings(False)

    return restore


def route_library_logs() -> None:
    """Loggers that do not propagate to the root (Ray's, Ray Data's, MLflow's) also write to the run's log
    file, and their own console handlers show errors only (unless verbose). Called again when a library
    configures its loggers late (idempotent)."""
    import logging

    if _LOG_FILE is None:
        return
    for name in [*CHATTY_LOGGERS, *logging.Logger.manager.loggerDict]:
        logger = logging.getLogger(name)
        if not name.startswith(CHATTY_LOGGERS) or logger.propagate or not logger.handlers:
            continue
        if _LOG_FILE not in logger.handlers:
            logger.addHandler(_LOG_FILE)
        if not _VERBOSE:
            for console in logger.handlers:
                if console is not _LOG_FILE and not isinstance(console, logging.FileHandler):
                    console.setLevel(logging.ERROR)


@contextlib.contextmanager
def prints_to_log():
    """What libraries print (not log) goes to the run's log file: Tune's experiment table and 'View detailed
    results' lines (printed whatever `verbose` says), MLflow's "Successfully registered model" and its
    download bars (stderr), and the "(raylet)" messages Ray's driver thread prints. The pipeline's own stage
    lines and bars keep the console: its Reporter holds the stream it was given before this redirect."""
    if _LOG_FILE is None or _VERBOSE:
        yield
        return
    _LOG_FILE.flush()
    with (open(_LOG_FILE.baseFilename, "a", buffering=1) as log, contextlib.redirect_stdout(log),
          contextlib.redirect_stderr(log)):
        yield


def resolve_tracking_uri(configured: str | None, workdir: str) -> tuple[str, str | None]:
    """(absolute tracking URI, artifact location for a new experiment, or None for the server's default).

    `configured`, else MLFLOW_TRACKING_URI, else `sqlite:///<workdir>/mlflow.db` with artifacts in
    `<workdir>/mlartifacts`. A relative SQLite path is pinned to the driver's cwd now, before any Ray
    worker chdirs into its run directory. A workdir on S3 needs a tracking server: a SQLite file on one
    node is invisible to the others.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if storage.is_s3(workdir):
            raise ValueError(f"the workdir {workdir} is on S3 but no MLflow tracking server is set: give "
                             "mlflow.tracking_uri or MLFLOW_TRACKING_URI (a SQLite file cannot be shared between nodes)")
        local = Path(storage.normalize(workdir)).resolve()
        local.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{local / 'mlflow.db'}", (local / "mlartifacts").as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri, None


def use_tracking_uri(uri: str) -> None:
    """Point MLflow's fluent API (`mlflow.start_run`, `log_*`) of this process at `uri`."""
    import mlflow

    mlflow.set_tracking_uri(uri)


def mlflow_client(uri: str) -> Any:
    """An MlflowClient for `uri` (tracking and registry on the same store)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name`, created (with `artifact_location`) when missing.

    This is every command's first request to the tracking store: a server that cannot be reached after
    MLflow's own retries with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default: minutes) is a
    ServiceError naming its URI, one line at the CLI instead of MLflow's traceback.
    """
    from mlflow.exceptions import MlflowException

    try:
        experiment = client.get_experiment_by_name(name)
    except MlflowException as error:
        if not _is_connection_failure(error):
            raise
        from vitpose_core.errors import ServiceError

        raise ServiceError(f"cannot reach the MLflow tracking server at {client.tracking_uri} (after MLflow's "
                           f"retries with backoff): {str(error).splitlines()[0][:300]}") from None
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another stage or trial
        return client.get_experiment_by_name(name).experiment_id


def _is_connection_failure(error: BaseException) -> bool:
    """Whether MLflow's error comes from the HTTP layer (refused, reset, timed out, retries exhausted) rather
    than from an answer of the server (MLflow raises it while handling the requests exception)."""
    import requests

    return any(isinstance(inner, requests.exceptions.RequestException) for inner in (error.__cause__, error.__context__))


def _own_placement_group_table() -> dict[str, dict[str, Any]]:
    """Ray's placement group table, this job's entries only (job id = the id's last 4 bytes)."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    return {pg_id: info for pg_id, info in ray.util.placement_group_table().items() if pg_id.endswith(job)}


def own_placement_groups() -> set[str]:
    """Ids of this job's placement groups that still hold resources."""
    return {pg_id for pg_id, info in _own_placement_group_table().items() if info["state"] != "REMOVED"}


def format_resources(resources: dict[str, float]) -> str:
    """``{CPU: 0.5, gpu_node: 0.5}``: Ray resources as a person reads them (no per-node or memory entries)."""
    shown = {k: v for k, v in sorted(resources.items())
             if not k.startswith(("node:", "accelerator_type:")) and k not in ("memory", "object_store_memory")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}"


def pending_placement_groups() -> dict[str, dict[str, Any]]:
    """This job's placement groups that wait for resources: id -> ``{"bundles": [...], "infeasible": bool}``
    (infeasible: no alive node could ever hold a bundle, e.g. the node type is gone)."""
    return {pg_id: {"bundles": list(info["bundles"].values()),
                    "infeasible": info.get("stats", {}).get("scheduling_state") == "INFEASIBLE"}
            for pg_id, info in _own_placement_group_table().items() if info["state"] == "PENDING"}


def release_placement_groups(before: set[str]) -> None:
    """Remove the placement groups a finished stage left behind.

    Tune trials that ASHA stops (and finished trials) leave their Train run's placement group reserved
    in Ray 2.60: Train's PlacementGroupCleaner asks the state API, which needs a dashboard and a unique
    cluster address, and without them it dies. On 2 cores the two leaked 0.45-CPU groups starved the
    next stage's Ray Data reads forever. Stages run one after another and hand over only records, so
    nothing a stage created may outlive it; only this job's groups are touched.
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id in sorted(own_placement_groups() - before):
        logger.info("removing placement group %s left behind by the stage", pg_id)
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
