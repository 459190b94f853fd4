"""A Ray cluster over a SLURM allocation: one task per node; task 0 starts the head, the others
start workers that join it; task 0 waits for every node, runs the job, and everyone tears down.

The tasks meet through files in a directory all nodes see (the job's log folder on the shared
file system): the head publishes its address there under this attempt's number (a requeued job
runs again with the same job id, and must not join the previous attempt's dead head), and
writes ``done`` when the job has ended, which sends the workers home. Ray's own traps on
shared machines (DESIGN.md section 7) are avoided here:

- ports: the head's GCS port and every node's agent port are picked free on the node, so two jobs
  on one node do not collide; raylet and worker ports are Ray's random ones;
- token auth: a fresh token per job in the rendezvous directory (mode 600), and the same
  ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH`` on every node and in the driver;
- a short ``--temp-dir`` (Unix socket paths are limited to 107 bytes);
- teardown by pid (``ray stop`` would kill every Ray on the node, other jobs' included).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from drray.artifacts import atomic_write_json
from drray.distributed.runtime import RAY_ENV_DEFAULTS

log = logging.getLogger(__name__)

NODE_RESOURCE_PREFIX = "slurm-node-"  # a custom resource per node tells which SLURM node joined


@dataclass(frozen=True)
class NodeTask:
    """This task's place in the allocation (from the SLURM environment, see ``from_slurm``)."""

    rank: int  # 0 on the head node
    num_nodes: int
    node: str  # the SLURM node name (n1, gpu017, ...)
    nodes: tuple[str, ...]  # every node of the allocation
    job_id: str
    attempt: int  # SLURM_RESTART_COUNT: 0, then 1, 2, ... after requeues
    cpus: int
    gpus: int

    @staticmethod
    def from_slurm(env: dict | None = None) -> NodeTask:
        env = os.environ if env is None else env
        nodes = tuple(expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURMD_NODENAME", "localhost"))))
        return NodeTask(
            rank=int(env.get("SLURM_NODEID", env.get("SLURM_PROCID", "0"))),
            num_nodes=int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1"))),
            node=env.get("SLURMD_NODENAME", socket.gethostname()),
            nodes=nodes,
            job_id=env.get("SLURM_JOB_ID", str(os.getpid())),
            attempt=int(env.get("SLURM_RESTART_COUNT", "0")),
            cpus=int(env.get("SLURM_CPUS_ON_NODE", os.cpu_count() or 1)),
            gpus=gpus_visible(env),
        )


def gpus_visible(env) -> int:
    devices = env.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        return len([d for d in devices.split(",") if d.strip()])
    return int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)


def expand_nodelist(nodelist: str) -> list[str]:
    """``n[1-3],gpu05`` -> [n1, n2, n3, gpu05], by ``scontrol show hostnames`` (SLURM's own
    parser); a plain name where scontrol is not there (a local run)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out or [nodelist]
    except (OSError, subprocess.SubprocessError):
        return [nodelist]


def node_address(node: str) -> str:
    """The address other nodes reach this one at: SLURM's NodeAddr for it (what slurmctld itself
    uses), resolved; this host name's address where SLURM does not know the node."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        address = dict(f.split("=", 1) for f in out.split() if "=" in f).get("NodeAddr")
        if address:
            return socket.gethostbyname(address)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return socket.gethostbyname(socket.gethostname())


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RendezVous:
    """Files in the job's shared folder through which the tasks of one attempt meet."""

    def __init__(self, folder: Path, task: NodeTask):
        self.folder = Path(folder)
        self.task = task
        self.prefix = f"ray-{task.job_id}-attempt{task.attempt}"

    @property
    def token(self) -> Path:
        return self.folder / f"{self.prefix}.token"

    @property
    def head(self) -> Path:
        return self.folder / f"{self.prefix}.head.json"

    @property
    def done(self) -> Path:
        return self.folder / f"{self.prefix}.done"

    def joined(self, node: str) -> Path:
        return self.folder / f"{self.prefix}.worker-{node}.json"


def ray_environment(rendezvous: RendezVous) -> dict[str, str]:
    """What every Ray process of the job (nodes and driver) needs in its environment."""
    return {**RAY_ENV_DEFAULTS, **{k: v for k, v in os.environ.items() if k.startswith("RAY_")},
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(rendezvous.token),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


@contextlib.contextmanager
def ray_on_allocation(folder: Path, task: NodeTask, *, timeout_s: float = 300.0) -> Iterator[str | None]:
    """On the head task: start the head, wait for all ``task.num_nodes`` nodes, yield the
    cluster's address (RAY_ADDRESS is set to it), tear down on exit. On the other tasks: join
    the head, serve until the head says done, and yield None afterwards (nothing to run)."""
    rendezvous = RendezVous(folder, task)
    if task.rank == 0:
        with _head(rendezvous, timeout_s) as address:
            yield address
    else:
        _serve_as_worker(rendezvous, timeout_s)
        yield None


def _ray_start(args: list[str], rendezvous: RendezVous, log_name: str) -> subprocess.Popen:
    """``ray start --block`` as our child: it lives as long as the node does, and stopping it
    (SIGTERM, by pid) stops that node's Ray processes and nothing else. SIGUSR2 is ignored in
    it and in the Ray processes it starts (they inherit that): SLURM sends its time-limit warning
    to every process of the job, and the default action would kill Ray under the job while
    submitit, in the job's own process, checkpoints and requeues."""
    env = {**os.environ, **ray_environment(rendezvous)}
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", "--block", "--disable-usage-stats", *args]
    log.info("starting a Ray node: %s", " ".join(cmd))
    with (rendezvous.folder / f"{rendezvous.prefix}.{log_name}.log").open("ab") as log_file:
        return subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))


def _node_args(task: NodeTask, ip: str) -> list[str]:
    resources = json.dumps({f"{NODE_RESOURCE_PREFIX}{task.node}": 1})
    return ["--node-ip-address", ip, "--num-cpus", str(task.cpus), "--num-gpus", str(task.gpus),
            "--resources", resources, "--dashboard-agent-listen-port", str(free_port(ip))]


@contextlib.contextmanager
def _head(rendezvous: RendezVous, timeout_s: float) -> Iterator[str]:
    task = rendezvous.task
    rendezvous.folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(rendezvous.token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    ip = node_address(task.node)
    port = free_port(ip)
    address = f"{ip}:{port}"
    temp_dir = f"/tmp/r-{task.job_id}-{task.attempt}"
    proc = _ray_start(["--head", "--port", str(port),
                       "--include-dashboard", "false", "--temp-dir", temp_dir, *_node_args(task, ip)],
                      rendezvous, f"head-{task.node}")
    started = time.time()
    previous = {k: os.environ.get(k) for k in ("RAY_ADDRESS", *ray_environment(rendezvous))}
    ok = False
    try:
        _wait_for_port(ip, port, proc, timeout_s)
        atomic_write_json(rendezvous.head, {"address": address, "node": task.node, "started": started})
        os.environ.update(ray_environment(rendezvous))
        os.environ["RAY_ADDRESS"] = address
        _reread_ray_config()
        joined = _wait_for_nodes(rendezvous, proc, timeout_s)
        print(f"[drray] Ray cluster ready at {address} after {time.time() - started:.1f} s: {len(joined)} node(s) "
              f"({', '.join(sorted(joined))})", file=sys.stderr, flush=True)
        yield address
        ok = True
    finally:
        rendezvous.done.touch()
        _disconnect()
        _stop(proc)
        if ok:  # Ray's session logs stay in /tmp only when something went wrong
            shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reread_ray_config()


def _wait_for_port(ip: str, port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Ray head exited with status {proc.returncode} before it listened on "
                               f"{ip}:{port}; see its log in the job folder")
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the Ray head did not listen on {ip}:{port} within {timeout_s:.0f} s")


def _wait_for_nodes(rendezvous: RendezVous, proc: subprocess.Popen, timeout_s: float) -> set[str]:
    """Block until every node of the allocation has joined; else name the ones that did not."""
    import ray

    task = rendezvous.task
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING,
             log_to_driver=os.environ.get("DRRAY_RAY_LOGS") == "1")  # as drray.distributed.runtime.ensure_ray
    deadline = time.time() + timeout_s
    joined: set[str] = set()
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Ray head exited with status {proc.returncode} while waiting for the nodes")
        joined = {key[len(NODE_RESOURCE_PREFIX):] for n in ray.nodes() if n["Alive"]
                  for key in n["Resources"] if key.startswith(NODE_RESOURCE_PREFIX)}
        if len(joined) >= task.num_nodes:
            return joined
        time.sleep(0.5)
    missing = [n for n in task.nodes if n not in joined] or ["(unknown)"]
    started = [n for n in missing if rendezvous.joined(n).exists()]
    raise TimeoutError(
        f"Ray cluster incomplete after {timeout_s:.0f} s: {len(joined)} of {task.num_nodes} nodes joined "
        f"({', '.join(sorted(joined)) or 'none'}); missing: {', '.join(missing)}"
        + (f" (their Ray workers started but did not join: {', '.join(started)})" if started else
           " (their tasks never started a Ray worker)")
        + f". Logs: {rendezvous.folder}/{rendezvous.prefix}.*.log and the job's task logs")


def ray_node_count() -> int:
    """Alive nodes of the Ray cluster this process is connected to (what Ray itself reports)."""
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def _serve_as_worker(rendezvous: RendezVous, timeout_s: float) -> None:
    task = rendezvous.task
    deadline = time.time() + timeout_s
    while not rendezvous.head.exists():
        if rendezvous.done.exists():  # the head gave up (or failed) before publishing its address
            return
        if time.time() > deadline:
            raise TimeoutError(f"node {task.node}: the Ray head did not publish its address "
                               f"({rendezvous.head}) within {timeout_s:.0f} s")
        time.sleep(0.2)
    address = json.loads(rendezvous.head.read_text())["address"]
    ip = node_address(task.node)
    proc = _ray_start(["--address", address, *_node_args(task, ip)], rendezvous, f"worker-{task.node}")
    atomic_write_json(rendezvous.joined(task.node), {"node": task.node, "ip": ip, "pid": proc.pid})
    try:
        # until the head is done, or this node's Ray has died (it does when the head is gone)
        while not rendezvous.done.exists() and proc.poll() is None:
            time.sleep(0.5)
    finally:
        _stop(proc)


def _reread_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its C++ config when it is imported: a process that imported
    Ray before the job's token was set (a test session, a user's script) must have it read again,
    as Ray's own token set-up does (authentication_token_setup._enable_token_auth)."""
    import ray._raylet

    ray._raylet.Config.initialize("")


def _disconnect() -> None:
    import ray

    if ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.shutdown()


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
