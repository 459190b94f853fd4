"""Jobs on SLURM through submitit: submission, the job as it runs on the allocation, and what
``drray jobs / logs / cancel`` know of it afterwards.

A submitted job is a ``ClusterJob``: the same job function ``drray run`` calls, with its
(already validated) config. On the allocation it forms a Ray cluster over the nodes
(drray.launch.ray_cluster), runs the function on the head task against it, and tears Ray down
on every exit path. SLURM's warning signal before a time limit or preemption (USR2, sent
``signal_delay_s`` early) makes submitit call ``checkpoint``, which requeues the same job: no
state travels in the pickle; the requeued attempt finds its resume point on disk (finished
stages in the stage cache, Ray Train's latest checkpoint of the stage it was in).

Job states: this suite runs without SLURM accounting (``sacct``): many clusters' users cannot
rely on it, and a database is a heavy thing for a test cluster. States come from ``squeue``
while the job is queued or running, from ``scontrol show job`` while slurmctld still knows it
(MinJobAge), and after that from the job's own event file (``RUN/slurm/<job>_events.jsonl``:
started, ray_ready, requeued, finished, failed), which also gives the timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import submitit

from drray.distributed.runtime import release_frames
from drray.launch.profiles import Profile
from drray.launch.ray_cluster import NodeTask, ray_node_count, ray_on_allocation
from drray.progress import configure_logging

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "ENDED"}


def drray_home() -> Path:
    return Path(os.environ.get("DRRAY_HOME", "~/.drray")).expanduser()


def registry_path() -> Path:
    return drray_home() / "jobs.jsonl"


# --- the job on the allocation -----------------------------------------------------------------


def events_path(folder: Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}_events.jsonl"


def add_event(folder: Path, job_id: str, event: str, **fields) -> None:
    """One line per event, appended (O_APPEND lines of this size are not interleaved)."""
    line = json.dumps({"event": event, "time": time.time(), **fields}) + "\n"
    with events_path(folder, job_id).open("a") as f:
        f.write(line)


def read_events(folder: Path, job_id: str) -> list[dict]:
    path = events_path(folder, job_id)
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written (on a network file system)
            continue
    return events


class ClusterJob(submitit.helpers.Checkpointable):
    """``fn(*args)`` on the allocation's Ray cluster; requeued on SLURM's warning signal."""

    def __init__(self, fn: Callable, *args, ray_timeout_s: float = 300.0):
        self.fn = fn
        self.args = args
        self.ray_timeout_s = ray_timeout_s

    def __call__(self):
        self._requeueing = False  # set by checkpoint(); travels in the requeued pickle, so reset here
        configure_logging()  # drray's own lines in the job's log, as `drray run` shows them
        logging.getLogger("submitit").propagate = False  # it prints its own lines already
        env = submitit.JobEnvironment()
        folder, job_id = env.paths.folder, env.job_id
        if env.cluster != "slurm":  # --executor local: a local Ray, as `drray run` would start
            return self._recorded(folder, job_id, {"node": "local", "started": time.time()}, lambda: self.fn(*self.args))
        task = NodeTask.from_slurm()
        meta = {"node": task.node, "attempt": task.attempt, "nodes": task.num_nodes}
        if task.rank != 0:  # a worker node: it serves Ray until the head is done
            with ray_on_allocation(folder, task, timeout_s=self.ray_timeout_s):
                return None
        add_event(folder, job_id, "started", **meta)
        return self._recorded(folder, job_id, meta, lambda: self._on_ray(folder, job_id, task, meta))

    def _on_ray(self, folder: Path, job_id: str, task: NodeTask, meta: dict):
        started = time.time()
        with ray_on_allocation(folder, task, timeout_s=self.ray_timeout_s) as address:
            add_event(folder, job_id, "ray_ready", address=address, seconds=round(time.time() - started, 2),
                      ray_nodes=ray_node_count(), **meta)
            try:
                result = self.fn(*self.args)
            except BaseException as exc:
                release_frames(exc)  # before the allocation's Ray shuts down (the traceback still formats)
                raise
            # done: a warning signal during Ray's teardown must not requeue a finished job
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            return result

    def _recorded(self, folder: Path, job_id: str, meta: dict, body: Callable):
        """``body()`` with its end in the job's events: finished, or failed with the error (Ray's
        start-up included). The SystemExit submitit raises after requeueing is neither, nor is
        the KeyboardInterrupt of a job `drray cancel` stopped (it recorded ``cancelled`` first)."""
        try:
            result = body()
        except BaseException as exc:
            requeued = isinstance(exc, SystemExit) and self._requeueing
            cancelled = isinstance(exc, (KeyboardInterrupt, SystemExit)) and any(
                e["event"] == "cancelled" for e in read_events(folder, job_id))
            if not (requeued or cancelled):
                add_event(folder, job_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                          traceback=traceback.format_exc()[-4000:], **meta)
            release_frames(exc)  # a local job's Ray shuts down at exit: before it
            raise
        add_event(folder, job_id, "finished", **meta)
        return result

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The resume point is on disk already (stage cache, Ray Train checkpoints): requeue the
        job as it was submitted."""
        env = submitit.JobEnvironment()
        self._requeueing = True
        add_event(env.paths.folder, env.job_id, "requeued", attempt=int(os.environ.get("SLURM_RESTART_COUNT", "0")))
        print("[drray] SLURM's time-limit / preemption signal: requeueing; the next attempt resumes from the "
              "stage cache and the latest checkpoint", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# --- submission --------------------------------------------------------------------------------


@dataclass
class Submission:
    """What the registry keeps of a submitted job (one line of DRRAY_HOME/jobs.jsonl)."""

    job_id: str
    name: str  # drray job (pipeline, sweep-trial, ...)
    cluster: str  # slurm | local
    folder: str  # submitit's folder: logs, events, pickles
    run_dir: str
    submitted: float
    nodes: int = 1
    config: str = ""
    depends_on: str | None = None
    slurm_conf: str | None = None

    @property
    def stdout(self) -> Path:
        return Path(self.folder) / f"{self.job_id}_0_log.out"

    @property
    def stderr(self) -> Path:
        return Path(self.folder) / f"{self.job_id}_0_log.err"

    def logs(self, stream: str = "both") -> list[Path]:
        """The first task's log files: stream "out", "err" or "both"."""
        return {"out": [self.stdout], "err": [self.stderr], "both": [self.stdout, self.stderr]}[stream]


def make_executor(folder: Path, profile: Profile, cluster: str, name: str, depends_on: str | None = None):
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=profile.max_requeues)
    params: dict = {"timeout_min": profile.time_minutes, "name": f"drray-{name}",
                    "cpus_per_task": profile.cpus_per_node or 1}
    if profile.gpus_per_node:
        params["gpus_per_node"] = profile.gpus_per_node
    if cluster == "slurm":
        params.update(nodes=profile.nodes, tasks_per_node=1, slurm_signal_delay_s=profile.signal_delay_s,
                      slurm_array_parallelism=profile.array_parallelism)
        if profile.mem_gb is not None:
            params["mem_gb"] = profile.mem_gb
        for key in ("partition", "account", "qos"):
            if getattr(profile, key):
                params[f"slurm_{key}"] = getattr(profile, key)
        if profile.setup:
            params["slurm_setup"] = list(profile.setup)
        extra = dict(profile.sbatch)
        if depends_on:  # a dependency that can no longer be met cancels the job (not pending forever)
            extra.update({"dependency": depends_on, "kill-on-invalid-dep": "yes"})
        if extra:
            params["slurm_additional_parameters"] = extra
    elif profile.nodes > 1:
        raise ValueError("--executor local runs on this machine: --nodes must be 1")
    executor.update_parameters(**params)
    return executor


def record(submission: Submission) -> None:
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(dataclasses.asdict(submission)) + "\n")


@contextlib.contextmanager
def _interruptible_children():
    """A shell's background job (``nohup ... &``, cron) starts with SIGINT ignored, and an
    ignored signal stays ignored across exec: the local job and submitit's controller would
    ignore the SIGINT ``drray cancel`` sends (seen in CI run that way: a cancelled job trained
    on). A Python handler is reset to the default on exec, so the children start interruptible."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def submit(fn: Callable, args: tuple, *, name: str, run_dir: Path, profile: Profile, cluster: str,
           config: str = "", depends_on: str | None = None) -> Submission:
    folder = (Path(run_dir) / "slurm").resolve()
    executor = make_executor(folder, profile, cluster, name, depends_on)
    with _local_start() if cluster == "local" else contextlib.nullcontext():
        job = executor.submit(ClusterJob(fn, *args, ray_timeout_s=profile.ray_start_timeout_s))
    submission = _submission(job.job_id, name, cluster, folder, run_dir, profile, config, depends_on)
    record(submission)
    return submission


@contextlib.contextmanager
def _local_start():
    """How a local job's processes are started: detached from our streams, interruptible."""
    with _std_streams_not_inherited(), _interruptible_children():
        yield


@contextlib.contextmanager
def _std_streams_not_inherited():
    """submitit's local controller inherits our stdout/stderr and outlives us (its job writes to
    its own log files): a pipe reading `drray submit` would wait for the job's end. Give the
    controller /dev/null instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def submit_array(fn: Callable, args_list: list[tuple], *, name: str, run_dir: Path, profile: Profile,
                 config: str = "", depends_on: str | None = None) -> list[Submission]:
    """One SLURM job array, a task per ``args`` (at most ``profile.array_parallelism`` at once)."""
    folder = (Path(run_dir) / "slurm").resolve()
    executor = make_executor(folder, profile, "slurm", name, depends_on)
    with executor.batch():
        jobs = [executor.submit(ClusterJob(fn, *args, ray_timeout_s=profile.ray_start_timeout_s)) for args in args_list]
    subs = [_submission(j.job_id, name, "slurm", folder, run_dir, profile, config, depends_on) for j in jobs]
    for s in subs:
        record(s)
    return subs


def _submission(job_id, name, cluster, folder, run_dir, profile, config, depends_on) -> Submission:
    return Submission(job_id=str(job_id), name=name, cluster=cluster, folder=str(folder),
                      run_dir=str(Path(run_dir).resolve()), submitted=time.time(), nodes=profile.nodes,
                      config=str(config), depends_on=depends_on, slurm_conf=os.environ.get("SLURM_CONF"))


# --- what is known of submitted jobs -----------------------------------------------------------


def submissions() -> list[Submission]:
    path = registry_path()
    if not path.is_file():
        return []
    fields = {f.name for f in dataclasses.fields(Submission)}
    return [Submission(**{k: v for k, v in json.loads(line).items() if k in fields})
            for line in path.read_text().splitlines() if line.strip()]


def find(job_id: str) -> list[Submission]:
    """The job, or every task of an array given its array id (123 -> 123_0, 123_1, ...)."""
    subs = submissions()
    exact = [s for s in subs if s.job_id == job_id]
    if exact:
        return exact[-1:]
    tasks = [s for s in subs if s.job_id.split("_")[0] == job_id]
    if not tasks:
        raise LookupError(f"job {job_id}: not among the jobs drray submitted (registry {registry_path()}); "
                          "`drray jobs` lists them")
    return tasks


def state(sub: Submission) -> tuple[str, str]:
    """(STATE, detail) from SLURM while it knows the job, else from the job's own events."""
    events = read_events(Path(sub.folder), sub.job_id)
    last = next((e for e in reversed(events) if e["event"] in ("finished", "failed", "cancelled")), None)
    if sub.cluster == "slurm":
        live = _slurm_state(sub)
        if live and live[0] == "FAILED" and last is not None and last["event"] == "failed":
            return "FAILED", last.get("error", "")  # the job's own error says more than NonZeroExitCode
        if live:
            return live
    if sub.cluster == "local" and _local_job_alive(sub.job_id):
        return ("CANCELLING", "") if last is not None and last["event"] == "cancelled" else ("RUNNING", "")
    if last is not None:
        return {"finished": ("COMPLETED", ""), "cancelled": ("CANCELLED", "")}.get(
            last["event"], ("FAILED", last.get("error", "")))
    return ("ENDED", "no longer known to SLURM and no end recorded (killed?); see `drray logs`")


class SlurmUnreachable(RuntimeError):
    pass


def _slurm_state(sub: Submission) -> tuple[str, str] | None:
    """The job's state from squeue, else scontrol; None when SLURM no longer knows the job. A
    controller that does not answer is UNKNOWN (not an end: `--wait` keeps waiting)."""
    try:
        squeue = _slurm(sub, ["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", sub.job_id.split("_")[0]])
        for line in squeue.splitlines():
            jid, st, reason = (line.split("|") + ["", ""])[:3]
            if jid == sub.job_id:
                return st, ("" if reason in ("None", "") else reason)
        shown = _slurm(sub, ["scontrol", "show", "job", sub.job_id, "-o"])
    except SlurmUnreachable as exc:
        return "UNKNOWN", str(exc)
    fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
    if fields.get("JobState"):
        return fields["JobState"], fields.get("Reason", "") if fields.get("Reason") != "None" else ""
    return None


def _slurm(sub: Submission, cmd: list[str]) -> str:
    """A SLURM client command against the cluster the job was submitted to (its SLURM_CONF).
    An unknown job id is an empty answer; any other failure raises SlurmUnreachable."""
    env = {**os.environ, **({"SLURM_CONF": sub.slurm_conf} if sub.slurm_conf else {})}
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmUnreachable(f"{cmd[0]}: {exc}") from exc
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return ""
        raise SlurmUnreachable(f"{cmd[0]}: {result.stderr.strip()[:300]}")
    return result.stdout


def _local_job_alive(pid: str) -> bool:
    """Whether the --executor local job (submitit's controller process) still runs: the pid
    exists, is not a zombie, and is submitit's (not a later process that got the same pid)."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (ValueError, OSError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"submitit" in cmdline


def timings(sub: Submission) -> dict:
    """Seconds from submission to the first start and to the first Ray cluster, attempts."""
    events = read_events(Path(sub.folder), sub.job_id)
    first = lambda name: next((e["time"] for e in events if e["event"] == name), None)  # noqa: E731
    # a local job records one event, its end, with the time it started
    local = next((e["started"] for e in events if e["event"] in ("finished", "failed") and "started" in e), None)
    started, ready = first("started") or local, first("ray_ready")
    return {"to_running": round(started - sub.submitted, 1) if started else None,
            "to_ray_ready": round(ready - sub.submitted, 1) if ready else None,
            "attempts": sum(e["event"] == "started" for e in events) or int(local is not None)}


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "ENDED")


def cancel(sub: Submission) -> None:
    """Cancel a queued or running job; a job that has ended is an error that says so."""
    now, _ = state(sub)
    if now in ENDED:
        raise RuntimeError(f"job {sub.job_id} ({sub.name}) had already ended: {now}; nothing to cancel")
    if sub.cluster == "slurm":
        try:
            _slurm(sub, ["scancel", sub.job_id])
        except SlurmUnreachable as exc:
            raise RuntimeError(f"scancel {sub.job_id}: {exc}") from exc
    elif _local_job_alive(sub.job_id):
        # SIGINT, as submitit's LocalJob.cancel: its job process ignores SIGTERM (submitit's handler)
        add_event(Path(sub.folder), sub.job_id, "cancelled")
        _interrupt_local_job(sub.job_id)


LOCAL_CANCEL_GRACE_S = 20.0  # for the first SIGINT to end the job before the next two are sent


def _interrupt_local_job(pid: str) -> None:
    """SIGINT the job; if it still runs after LOCAL_CANCEL_GRACE_S, twice more. Ray Train's own
    SIGINT handler (installed while a stage trains) turns the first into a "graceful abort" of
    the run's controller, which a controller not yet running ignores: seen in CI, a job
    cancelled while its stage started trained all 50 epochs and finished. Its third SIGINT
    exits the process."""
    os.kill(int(pid), signal.SIGINT)
    deadline = time.time() + LOCAL_CANCEL_GRACE_S
    while _local_job_alive(pid) and time.time() < deadline:
        time.sleep(0.5)
    for _ in range(2):
        if _local_job_alive(pid):
            os.kill(int(pid), signal.SIGINT)
            time.sleep(1.0)


class LogTail:
    """New lines of a growing log file (a file that shrank was started again: read it anew)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def new_lines(self, complete_only: bool = True) -> list[str]:
        if not self.path.is_file():
            return []
        if self.path.stat().st_size < self.offset:
            self.offset = 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1 if complete_only else len(chunk)
        self.offset += end
        return chunk[:end].decode(errors="replace").splitlines()


def follow(subs: list[Submission], streams: str = "both", poll_s: float = 2.0) -> Iterator[str]:
    """Lines to show while the jobs run, one job after another: its state changes and its log
    lines. Ends when every job has ended (``state`` then gives each one's final state)."""
    for sub in subs:
        tails = [LogTail(p) for p in sub.logs(streams)]
        last = None
        while True:
            st, detail = state(sub)
            if (st, detail) != last:
                yield f"[drray] job {sub.job_id} ({sub.name}): {st}{f' ({detail})' if detail else ''}"
                last = (st, detail)
            ended = st in TERMINAL
            if ended:
                time.sleep(1.0)  # the log's last lines
            for tail in tails:
                yield from tail.new_lines(complete_only=not ended)
            if ended:
                break
            time.sleep(poll_s)
