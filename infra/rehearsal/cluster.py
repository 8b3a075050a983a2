"""The rehearsal cluster: what a platform team runs, on 127.0.0.1, with real parts.

- PostgreSQL (the Debian server binaries) in a private data dir on a free port: MLflow's backend store;
- moto's standalone S3 server on a free port: the only storage the nodes share;
- `mlflow server` on PostgreSQL with artifacts proxied to `s3://<bucket>/mlartifacts`;
- a Ray cluster of one head (`ray start --head`) and N worker nodes (`ray start --address`), each with its
  own `--temp-dir` (with a shared one, a `ray job submit --working-dir` job whose driver calls `ray.init()`
  loses its working directory) and its own free ports. Worker nodes carry a custom resource standing in for
  the node type a cluster config asks for (`{"gpu_node": 1}` where it asks for GPUs); the head carries
  none, so work placed by that resource really runs on another node than the driver.

Addresses: PostgreSQL, moto, MLflow and the dashboard listen on 127.0.0.1. Ray's GCS and raylets listen on
all interfaces and advertise the machine's own address: `ray start` replaces a loopback --node-ip-address
by it (`resolve_ip_for_localhost`), so the rehearsal does not pass one.

Every node gets the storage and tracking environment (AWS_*, MLFLOW_*) in its own environment, as nodes of a
real cluster get it from their image and instance profile, so jobs need no runtime_env to reach S3 or MLflow.

Teardown ends exactly what was started: every process is started in its own session with
VITPOSE_REHEARSAL_ROOT=<root> in its environment, which Ray passes on to raylets, workers and job drivers;
`stop()` signals each service's process group, then SIGKILLs every process still carrying that mark.

    python -m infra.rehearsal.cluster up [--root DIR]     # starts, writes DIR/env.sh, prints the exports
    python -m infra.rehearsal.cluster status [--root DIR]
    python -m infra.rehearsal.cluster down [--root DIR]
    python -m infra.rehearsal.cluster run -- CMD ...       # up, CMD with the exports, down (also on Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BIN = Path(sys.executable).parent  # ray, mlflow and moto_server of the interpreter running this module
ROOT_MARK = "VITPOSE_REHEARSAL_ROOT"  # in the environment of every process of one rehearsal
NODE_MARK = "VITPOSE_REHEARSAL_NODE"  # which Ray node (head, worker1, ...) a process belongs to
DEFAULT_CLI_ROOT = Path("/tmp/vitpose-rehearsal")
STATE_FILE = "rehearsal.json"
ENV_FILE = "env.sh"
MLFLOW_DB = "mlflow"
S3_REGION = "us-east-1"
# a loaded 2-core box: the head died once waiting for its dashboard agent under the default timeout
# Ray's memory monitor also off: it compares the whole machine's memory with its threshold, so on a box
# shared with other work it killed the rehearsal's job supervisor and workers for memory others used
# (the kernel's OOM killer still guards the machine)
# Ray Train's 60 s for a worker group to start was too short after a node loss on the loaded box (two new
# worker processes importing torch): the restart timed out and was retried again and again
NODE_SLOW_BOX_ENV = {"RAY_agent_register_timeout_ms": "600000", "RAY_memory_monitor_refresh_ms": "0",
                     "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
WORKER_PORTS_PER_NODE = 64  # --min/--max-worker-port range: one port per worker process of the node
JOB_AGENT_NOT_READY = ("Connection aborted", "Failed to get head node agent", "No available agent to submit job")


class RehearsalError(RuntimeError):
    """The rehearsal could not start (the message names the service and its log file)."""


class ServiceExited(RehearsalError):
    """A service's process ended while it was starting."""


class RehearsalConfig(BaseModel):
    """Sizes of the rehearsal cluster; defaults fit a 2-core machine with ~20 GB of memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    worker_nodes: int = Field(2, ge=1, le=8)
    head_cpus: int = Field(2, ge=1)  # the job driver, Train/Tune controllers and Ray Data's ListFiles run here
    worker_cpus: int = Field(2, ge=1)
    worker_gpus: int = Field(0, ge=0)  # 0 also on a GPU box: the stand-in resource places the work
    worker_resources: dict[str, float] = {"gpu_node": 1.0}
    object_store_mb: int = Field(512, ge=100)
    bucket: str = Field("vitpose-rehearsal", pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    auth_mode: Literal["token", "disabled"] = "token"  # clusters run token auth; so does the rehearsal
    ready_timeout_s: float = Field(300.0, gt=0)


class Service(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pid: int  # also the process group id: every service is started in a session of its own
    log: str
    stop_signal: int = int(signal.SIGTERM)


class NodeInfo(BaseModel):
    """One Ray node of the rehearsal; `raylet_pid` is what a node-loss test SIGKILLs."""

    model_config = ConfigDict(extra="forbid")

    name: str
    temp_dir: str
    raylet_pid: int | None
    node_id: str | None
    resources: dict[str, float]


class RehearsalState(BaseModel):
    """Everything `down`/`status` need, written to <root>/rehearsal.json as the rehearsal starts."""

    model_config = ConfigDict(extra="forbid")

    root: str
    config: RehearsalConfig
    ports: dict[str, int]
    services: dict[str, Service] = {}
    nodes: dict[str, dict[str, float]] = {}  # node name -> custom resources
    env: dict[str, str] = {}  # what clients export
    node_env: dict[str, str] = {}  # what every Ray node (and so every task and job driver) gets
    timings_s: dict[str, float] = {}  # seconds from the start of `start()` to each milestone; stop tiers


# ---------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(size: int, taken: set[int]) -> int:
    """The first port of `size` consecutive free ports (Ray's worker ports of one node)."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        start = rng.randrange(20000, 32000 - size)
        candidates = range(start, start + size)
        if not taken.intersection(candidates) and all(_port_is_free(p) for p in candidates):
            return start
    raise RehearsalError(f"found no {size} consecutive free ports between 20000 and 32000")


def _process_is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited already; only its parent's wait() is missing


def _process_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def marked_processes(root: str, node: str | None = None) -> list[int]:
    """Pids of running processes carrying this rehearsal's mark (and node's, if given), not ours."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        env = _process_env(int(entry.name))
        if env.get(ROOT_MARK) == root and (node is None or env.get(NODE_MARK) == node) \
                and _process_is_running(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - 127.0.0.1 only
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _postgres_bindir() -> Path:
    """The PostgreSQL server binaries (Debian keeps them outside PATH, under /usr/lib/postgresql/<v>/bin)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name)
                      if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise RehearsalError("PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/postgres, no "
                         "`postgres` on PATH): install them with `apt-get install -y postgresql`")


# ---------------------------------------------------------------------------------------------- the rehearsal


class Rehearsal:
    """A running rehearsal cluster. `Rehearsal.start()` returns one that is up, or raises after tearing down."""

    def __init__(self, state: RehearsalState) -> None:
        self.state = state
        self.root = Path(state.root)
        self._children: dict[str, subprocess.Popen] = {}  # only in the process that started them

    # ---- addresses and environment
    @property
    def config(self) -> RehearsalConfig:
        return self.state.config

    @property
    def dashboard_url(self) -> str:
        """The job submission address (`ray job submit --address`, RAY_ADDRESS for clients)."""
        return f"http://127.0.0.1:{self.state.ports['head.dashboard']}"

    @property
    def gcs_address(self) -> str:
        """For `ray.init(address=...)` from a process outside the cluster's jobs: the address the head
        advertises (`ray start` replaces 127.0.0.1 by the machine's own address, see the module doc)."""
        advertised = self._node_temp_dir("head") / "ray_current_cluster"
        if advertised.is_file():
            return advertised.read_text().strip()
        return f"127.0.0.1:{self.state.ports['head.gcs']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.state.ports['s3']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.state.ports['mlflow']}"

    @property
    def bucket(self) -> str:
        return self.config.bucket

    @property
    def postgres_uri(self) -> str:
        """The MLflow backend store, for checks that read PostgreSQL directly."""
        return (f"postgresql://{MLFLOW_DB}:{self.state.env['VITPOSE_REHEARSAL_PG_PASSWORD']}"
                f"@127.0.0.1:{self.state.ports['postgres']}/{MLFLOW_DB}")

    @property
    def env(self) -> dict[str, str]:
        """What a platform engineer exports before `ray job submit`: RAY_ADDRESS, auth, MLflow, S3."""
        return dict(self.state.env)

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: os.environ) with the rehearsal's exports on top, for subprocesses."""
        env = dict(os.environ if base is None else base)
        for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(key, None)  # a token from the caller's environment would not match this cluster's
        env.update(self.state.env)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    # ---- nodes
    def node_names(self) -> list[str]:
        return list(self.state.nodes)

    def raylet_pid(self, node: str) -> int | None:
        for pid in marked_processes(self.state.root, node):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                return pid
        return None

    def node_id(self, node: str) -> str | None:
        """The Ray node id, read from the raylet's command line (`--node_id=<hex>`)."""
        pid = self.raylet_pid(node)
        if pid is None:
            return None
        with contextlib.suppress(OSError):
            for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                if arg.startswith(b"--node_id="):
                    return arg.split(b"=", 1)[1].decode()
        return None

    def kill_raylet(self, node: str) -> int:
        """SIGKILL a node's raylet (a node lost without warning); returns its pid. Its `ray start --block`
        then ends the node's other processes, as a dying machine would."""
        pid = self.raylet_pid(node)
        if pid is None:
            raise RehearsalError(f"node {node} has no running raylet")
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart_node(self, node: str) -> None:
        """Start a lost worker node again under the same name, resources and ports (a replacement machine)."""
        if not node.startswith("worker") or node not in self.state.nodes:
            raise RehearsalError(f"{node} is not a worker node of this rehearsal ({self.node_names()})")
        service = self.state.services[f"ray.{node}"]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(service.pid, signal.SIGKILL)
        for pid in marked_processes(self.state.root, node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._start_worker(node)

    def nodes(self) -> list[NodeInfo]:
        return [NodeInfo(name=name, temp_dir=str(self._node_temp_dir(name)), raylet_pid=self.raylet_pid(name),
                         node_id=self.node_id(name), resources=resources)
                for name, resources in self.state.nodes.items()]

    def alive_nodes(self) -> list[dict]:
        """Ray's own view (state API through the dashboard): the nodes it holds ALIVE."""
        status, body = _http_get(f"{self.dashboard_url}/api/v0/nodes?limit=100&detail=false", self._token())
        if status != 200:
            return []
        result = json.loads(body).get("data", {}).get("result", {}).get("result", [])
        return [node for node in result if node.get("state") == "ALIVE"]

    # ---- jobs
    def submit_job(self, entrypoint: Sequence[str], working_dir: Path, *, submission_id: str | None = None,
                   timeout_s: float = 900, extra_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir <dir> -- <entrypoint>` as a platform engineer types it, waiting for
        the end. A submit refused while the head's job agent is still registering is retried; any other
        result (success or failure) is returned as is."""
        command = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url,
                   "--working-dir", str(working_dir), *extra_args]
        if submission_id:
            command += ["--submission-id", submission_id]
        command += ["--", *entrypoint]
        deadline = time.time() + timeout_s
        while True:
            done = subprocess.run(command, cwd=working_dir, env=self.client_env(), capture_output=True, text=True,
                                  timeout=max(1.0, deadline - time.time()))
            output = done.stdout + done.stderr
            if not any(message in output for message in JOB_AGENT_NOT_READY) or time.time() > deadline - 30:
                return done
            time.sleep(5)

    # ---- lifecycle
    @classmethod
    def start(cls, config: RehearsalConfig | None = None, root: Path | None = None) -> Rehearsal:
        config = config or RehearsalConfig()
        if root is None:
            # short: Ray's unix socket paths under each node's temp dir are limited to 107 characters
            root = Path(tempfile.mkdtemp(prefix="vpr-", dir="/tmp"))
        root = Path(root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if (root / STATE_FILE).exists():
            previous = cls.load(root)
            if marked_processes(previous.state.root):
                raise RehearsalError(f"a rehearsal is already running in {root}: "
                                     f"`python -m infra.rehearsal.cluster down --root {root}` first")
            shutil.rmtree(root)
            root.mkdir(parents=True)
        root.chmod(0o755)  # the postgres user must reach its data dir below it
        rehearsal = cls(RehearsalState(root=str(root), config=config, ports=cls._pick_ports(config)))
        try:
            rehearsal._start_all()
        except BaseException:  # also KeyboardInterrupt / SystemExit: leave nothing running
            rehearsal.stop()
            raise
        return rehearsal

    @classmethod
    def load(cls, root: Path) -> Rehearsal:
        path = Path(root) / STATE_FILE
        if not path.is_file():
            raise RehearsalError(f"no rehearsal state at {path}")
        return cls(RehearsalState.model_validate_json(path.read_text()))

    def __enter__(self) -> Rehearsal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, ray_grace_s: float = 8.0, services_grace_s: float = 20.0) -> list[int]:
        """End every process of this rehearsal; returns the marked pids still running after the process
        groups were signalled (SIGKILLed then). Idempotent."""
        # Ray first (its jobs may still be writing to S3 and MLflow), then MLflow, S3, PostgreSQL. A
        # SIGTERMed `ray start --block` outlives its raylet and GCS by 20 s and more; nothing of a throwaway
        # cluster needs that long, so its group is SIGKILLed after a short grace.
        tiers = [([name for name in self.state.services if name.startswith("ray.")], ray_grace_s),
                 ([name for name in self.state.services if not name.startswith("ray.")], services_grace_s)]
        for tier, timeout_s in tiers:
            for name in tier:
                service = self.state.services[name]
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(service.pid, service.stop_signal)
            deadline = time.time() + timeout_s
            while time.time() < deadline and any(self._group_alive(name) for name in tier):
                self._reap()
                time.sleep(0.2)
            for name in tier:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.state.services[name].pid, signal.SIGKILL)
            self.state.timings_s[f"stop.{'ray' if tier is tiers[0][0] else 'services'}"] = round(
                timeout_s - max(0.0, deadline - time.time()), 1)
        killed: list[int] = []
        for _ in range(20):  # processes that left their group (Ray workers, job drivers) carry the mark
            leftover = marked_processes(self.state.root)
            if not leftover:
                break
            for pid in leftover:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.25)
        self._reap()
        return sorted(set(killed))

    def remove_files(self) -> None:
        """Delete the root (data, logs; ~50 MB) of a stopped rehearsal."""
        if marked_processes(self.state.root):
            raise RehearsalError(f"the rehearsal in {self.root} is still running: stop() it first")
        shutil.rmtree(self.root, ignore_errors=True)

    def status(self) -> dict[str, object]:
        return {
            "root": self.state.root,
            "services": {name: {"pid": svc.pid, "running": _process_is_running(svc.pid), "log": svc.log}
                         for name, svc in self.state.services.items()},
            "nodes": [node.model_dump() for node in self.nodes()],
            "ray_alive_nodes": len(self.alive_nodes()),
            "env": self.env,
        }

    def env_exports(self) -> str:
        return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in sorted(self.state.env.items()))

    # ---- internals
    @staticmethod
    def _pick_ports(config: RehearsalConfig) -> dict[str, int]:
        ports: dict[str, int] = {}

        def take(name: str) -> None:
            while True:
                port = free_port()
                if port not in ports.values():
                    ports[name] = port
                    return

        # "serve": a free port for Ray Serve's HTTP proxy (its default 8000 may be anyone's on a shared box)
        for name in ("postgres", "s3", "mlflow", "serve", "head.gcs", "head.dashboard", "head.client_server"):
            take(name)
        for node in ["head", *(f"worker{i}" for i in range(1, config.worker_nodes + 1))]:
            for name in ("node_manager", "object_manager", "agent_listen", "agent_grpc", "metrics",
                         "runtime_env_agent"):
                take(f"{node}.{name}")
            ports[f"{node}.min_worker"] = free_port_range(WORKER_PORTS_PER_NODE, set(ports.values()))
        return ports

    def _node_temp_dir(self, node: str) -> Path:
        return self.root / f"ray-{node}"

    def _token(self) -> str | None:
        return self.state.env.get("RAY_AUTH_TOKEN")

    def _save(self) -> None:
        path = self.root / STATE_FILE
        path.write_text(self.state.model_dump_json(indent=1))
        (self.root / ENV_FILE).write_text(self.env_exports())

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], *, user: str | None = None,
               stop_signal: int = signal.SIGTERM) -> subprocess.Popen:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, env={**env, ROOT_MARK: self.state.root}, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                                       start_new_session=True, user=user)
        self._children[name] = process
        self.state.services[name] = Service(pid=process.pid, log=str(log), stop_signal=int(stop_signal))
        self._save()
        return process

    def _group_alive(self, name: str) -> bool:
        pgid = self.state.services[name].pid
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError):
                    if os.getpgid(int(entry.name)) == pgid and _process_is_running(int(entry.name)):
                        return True
        return False

    def _reap(self) -> None:
        for process in self._children.values():
            process.poll()

    def _check_running(self, name: str) -> None:
        process = self._children[name]
        if process.poll() is not None:
            log = self.state.services[name].log
            tail = Path(log).read_text(errors="replace")[-2000:] if Path(log).exists() else ""
            raise ServiceExited(f"{name} exited with code {process.returncode} while starting (log: {log}):\n{tail}")

    def _wait_for(self, name: str, ready, timeout_s: float | None = None) -> None:  # noqa: ANN001 - a predicate
        deadline = time.time() + (timeout_s or self.config.ready_timeout_s)
        while time.time() < deadline:
            self._check_running(name)
            if ready():
                return
            time.sleep(0.5)
        raise RehearsalError(f"{name} was not ready after {timeout_s or self.config.ready_timeout_s:.0f} s "
                             f"(log: {self.state.services[name].log})")

    def _base_env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("RAY_", "MLFLOW_", "AWS_")) and key not in (ROOT_MARK, NODE_MARK)}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _start_all(self) -> None:
        ports, config = self.state.ports, self.config
        pg_password = secrets.token_hex(16)
        storage_env = {"AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal",
                       "AWS_DEFAULT_REGION": S3_REGION, "AWS_ENDPOINT_URL": self.s3_endpoint,
                       "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "MLFLOW_TRACKING_URI": self.mlflow_uri}
        auth_env = {"RAY_AUTH_MODE": config.auth_mode}
        if config.auth_mode == "token":
            auth_env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        self.state.env = {"RAY_ADDRESS": self.dashboard_url, **auth_env, **storage_env,
                          "VITPOSE_REHEARSAL_BUCKET": config.bucket, "VITPOSE_REHEARSAL_ROOT_DIR": self.state.root,
                          "VITPOSE_REHEARSAL_SERVE_PORT": str(ports["serve"]),
                          "VITPOSE_REHEARSAL_PG_PASSWORD": pg_password}
        # no RAY_DATA_DISABLE_PROGRESS_BARS here, although the shipped cluster configs set it: jobs must be
        # quiet by themselves (issue 14), and a rehearsal that quietened them would hide it
        self.state.node_env = {**auth_env, **storage_env, **NODE_SLOW_BOX_ENV}
        self._save()

        started = time.perf_counter()

        def milestone(name: str) -> None:
            self.state.timings_s[name] = round(time.perf_counter() - started, 1)

        # independent: PostgreSQL, S3 and the Ray head start together
        self._start_postgres(pg_password)
        self._start_s3()
        self._start_head()
        self._wait_for("postgres", self._postgres_ready)
        self._create_mlflow_database(pg_password)
        milestone("postgres")
        self._wait_for("s3", lambda: _http_get(f"{self.s3_endpoint}/")[0] == 200)
        self._create_bucket()
        milestone("s3")
        self._start_mlflow(pg_password)
        self._wait_for_head()
        milestone("ray.head")
        # one worker node at a time: on a loaded 2-core box, raylets starting together (next to MLflow's
        # start) have crashed waiting for their dashboard agent (`Timed out waiting for file
        # .../dashboard_agent_listen_port_<node id>`, a fixed ~15 s in Ray 2.60); a node that fails
        # that way is started again
        for index in range(1, config.worker_nodes + 1):
            self._start_worker(f"worker{index}")
            milestone(f"ray.worker{index}")
        self._wait_for("mlflow", lambda: _http_get(f"{self.mlflow_uri}/health")[0] == 200)
        milestone("mlflow")
        for node in self.state.nodes:  # each node's dashboard agent (the head's takes job submissions)
            url = f"http://127.0.0.1:{ports[f'{node}.agent_listen']}/api/local_raylet_healthz"
            self._wait_for(f"ray.{node}", lambda url=url: _http_get(url, self._token())[0] == 200)
        milestone("ready")
        self._save()

    # PostgreSQL: a private cluster (initdb) owned by the postgres user when we are root (it refuses root)
    def _start_postgres(self, password: str) -> None:
        bindir = _postgres_bindir()
        pg_root = self.root / "postgres"
        data = pg_root / "data"
        pg_root.mkdir()
        user = None
        if os.geteuid() == 0:
            user = "postgres"
            try:
                owner = pwd.getpwnam(user)
            except KeyError as error:
                raise RehearsalError("running as root, but there is no `postgres` user to own the PostgreSQL "
                                     "data dir (`apt-get install -y postgresql` creates it)") from error
            os.chown(pg_root, owner.pw_uid, owner.pw_gid)
        initdb = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                                 "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions"],
                                capture_output=True, text=True, user=user, cwd=pg_root, env=self._base_env())
        if initdb.returncode != 0:
            raise RehearsalError(f"initdb {data} failed: {initdb.stdout}{initdb.stderr}")
        # a throwaway cluster: durability settings off, TCP on 127.0.0.1 only, socket in its own dir
        self._spawn("postgres", [str(bindir / "postgres"), "-D", str(data), "-p", str(self.state.ports["postgres"]),
                                 "-k", str(pg_root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                    self._base_env(), user=user, stop_signal=signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown

    def _psql(self, *sql: str) -> subprocess.CompletedProcess:
        argv = [str(_postgres_bindir() / "psql"), "-h", str(self.root / "postgres"), "-p",
                str(self.state.ports["postgres"]), "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qAt"]
        for statement in sql:
            argv += ["-c", statement]
        return subprocess.run(argv, capture_output=True, text=True, env=self._base_env())

    def _postgres_ready(self) -> bool:
        return self._psql("SELECT 1").returncode == 0

    def _create_mlflow_database(self, password: str) -> None:
        done = self._psql(f"CREATE ROLE {MLFLOW_DB} LOGIN PASSWORD '{password}'",
                          f"CREATE DATABASE {MLFLOW_DB} OWNER {MLFLOW_DB}")
        if done.returncode != 0:
            raise RehearsalError(f"creating the MLflow role and database failed: {done.stderr}")

    def _start_s3(self) -> None:
        self._spawn("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.state.ports["s3"])],
                    self._base_env())

    def _create_bucket(self) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=S3_REGION,
                              aws_access_key_id="rehearsal", aws_secret_access_key="rehearsal")
        client.create_bucket(Bucket=self.bucket)

    def _start_mlflow(self, password: str) -> None:
        backend = f"postgresql+psycopg://{MLFLOW_DB}:{password}@127.0.0.1:{self.state.ports['postgres']}/{MLFLOW_DB}"
        env = {**self._base_env(), **{k: v for k, v in self.state.env.items() if k.startswith("AWS_")},
               "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               # the server's job executor (scorers, prompt optimisation) spawns more MLflow processes at
               # start; nothing here uses it
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._spawn("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", backend,
                               "--artifacts-destination", f"s3://{self.bucket}/mlartifacts",
                               "--host", "127.0.0.1", "--port", str(self.state.ports["mlflow"]), "--workers", "1"],
                    env)

    def _node_args(self, node: str) -> list[str]:
        ports, config = self.state.ports, self.config
        min_worker = ports[f"{node}.min_worker"]
        return ["--block", f"--temp-dir={self._node_temp_dir(node)}",
                f"--object-store-memory={config.object_store_mb * 1024 * 1024}", "--disable-usage-stats",
                f"--node-manager-port={ports[f'{node}.node_manager']}",
                f"--object-manager-port={ports[f'{node}.object_manager']}",
                f"--dashboard-agent-listen-port={ports[f'{node}.agent_listen']}",
                f"--dashboard-agent-grpc-port={ports[f'{node}.agent_grpc']}",
                f"--metrics-export-port={ports[f'{node}.metrics']}",
                f"--runtime-env-agent-port={ports[f'{node}.runtime_env_agent']}",
                f"--min-worker-port={min_worker}", f"--max-worker-port={min_worker + WORKER_PORTS_PER_NODE - 1}"]

    def _start_node(self, node: str, args: list[str], resources: dict[str, float]) -> None:
        self.state.nodes[node] = resources
        env = {**self._base_env(), **self.state.node_env, NODE_MARK: node}
        self._spawn(f"ray.{node}", [str(BIN / "ray"), "start", *args, *self._node_args(node),
                                    f"--resources={json.dumps(resources)}"], env)

    def _start_head(self) -> None:
        ports = self.state.ports
        self._start_node("head", ["--head", f"--port={ports['head.gcs']}", f"--num-cpus={self.config.head_cpus}",
                                  "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                  f"--dashboard-port={ports['head.dashboard']}",
                                  f"--ray-client-server-port={ports['head.client_server']}"], {})

    def _wait_for_head(self, attempts: int = 3) -> None:
        """Wait until the head's dashboard lists it alive; a head whose `ray start` died is started again."""
        for attempt in range(1, attempts + 1):
            try:
                self._wait_for("ray.head", lambda: len(self.alive_nodes()) == 1)
                return
            except ServiceExited:
                if attempt == attempts:
                    raise
                for pid in marked_processes(self.state.root, "head"):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.state.timings_s["retries.head"] = attempt
                self._start_head()

    def _start_worker(self, node: str, attempts: int = 3) -> None:
        """Start a worker node and wait until the GCS holds it alive; retried when its `ray start` dies."""
        for attempt in range(1, attempts + 1):
            before = {item["node_id"] for item in self.alive_nodes()}
            self._start_node(node, [f"--address=127.0.0.1:{self.state.ports['head.gcs']}",
                                    f"--num-cpus={self.config.worker_cpus}",
                                    f"--num-gpus={self.config.worker_gpus}"], dict(self.config.worker_resources))
            try:
                self._wait_for(f"ray.{node}",
                               lambda before=before: len({n["node_id"] for n in self.alive_nodes()} - before) == 1)
                return
            except ServiceExited:
                if attempt == attempts:
                    raise
                for pid in marked_processes(self.state.root, node):  # what the failed start left behind
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.state.timings_s[f"retries.{node}"] = attempt


@contextlib.contextmanager
def running(config: RehearsalConfig | None = None, root: Path | None = None) -> Iterator[Rehearsal]:
    """`with running() as rehearsal:` up for the block, down after it (also on errors and Ctrl-C)."""
    rehearsal = Rehearsal.start(config, root)
    try:
        yield rehearsal
    finally:
        rehearsal.stop()


# ---------------------------------------------------------------------------------------------- CLI


def _terminate_on_sigterm() -> None:
    """SIGTERM (CI timeouts, `kill`) unwinds like Ctrl-C, so the teardown in `finally` runs."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.rehearsal.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "run"])
    parser.add_argument("--root", type=Path, default=DEFAULT_CLI_ROOT, help=f"state and logs (default {DEFAULT_CLI_ROOT})")
    parser.add_argument("--worker-nodes", type=int, default=2)
    parser.add_argument("--auth-mode", choices=["token", "disabled"], default="token")
    parser.add_argument("--keep-files", action="store_true", help="down/run: keep the root's data and logs")
    argv = list(sys.argv[1:] if argv is None else argv)
    # `run -- CMD ...`: everything after the first `--` is the command, itself free to contain `--`
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    _terminate_on_sigterm()
    config = RehearsalConfig(worker_nodes=args.worker_nodes, auth_mode=args.auth_mode)

    if args.command == "up":
        started = time.perf_counter()
        rehearsal = Rehearsal.start(config, args.root)
        print(rehearsal.env_exports(), end="")
        print(f"# up in {time.perf_counter() - started:.1f} s; `source {args.root / ENV_FILE}`; "
              f"nodes: {[(n.name, n.raylet_pid) for n in rehearsal.nodes()]}; "
              f"`python -m infra.rehearsal.cluster down --root {args.root}` to stop", file=sys.stderr)
        return 0
    if args.command == "run":
        if not command:
            parser.error("run needs a command: python -m infra.rehearsal.cluster run -- CMD ...")
        with running(config, args.root) as rehearsal:
            returncode = subprocess.run(command, env=rehearsal.client_env()).returncode
        if not args.keep_files:
            rehearsal.remove_files()
        return returncode
    rehearsal = Rehearsal.load(args.root)
    if args.command == "status":
        print(json.dumps(rehearsal.status(), indent=1))
        return 0
    killed = rehearsal.stop()
    if not args.keep_files:
        rehearsal.remove_files()
    print(f"rehearsal in {args.root} stopped" + (f" ({len(killed)} leftover processes killed)" if killed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
