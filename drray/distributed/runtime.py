"""Starting (or joining) Ray the same way everywhere: tests, CLI jobs and SLURM allocations."""

from __future__ import annotations

import logging
import os
import re

from drray.progress import keep_off_console

log = logging.getLogger(__name__)

# Ray Train's fixed cost per fit is 15-19 s with its defaults and 10-12 s with these
# (DESIGN.md section 7); none of them changes what a run computes. Processes that start Ray
# nodes (drray.launch.ray_cluster) pass them on too: Ray's actors inherit the raylet's environment.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_DEDUP_LOGS": "1",
}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once: join ``RAY_ADDRESS`` when set (a cluster), else start a local one."""
    import ray

    if ray.is_initialized():  # in the driver after a first call, or inside a Ray task/actor (a Tune trial)
        _quiet_ray_data()
        return
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # "local", not None: given None, ray.init joins whatever cluster `ray start` last started on
    # this machine (another user's, another job's, a dead one's leftover address file)
    address = os.environ.get("RAY_ADDRESS") or "local"
    # Worker and actor logs stay in Ray's log files (/tmp/ray/session_latest/logs) unless
    # DRRAY_RAY_LOGS=1: without the dashboard, Ray Train's placement-group cleaner warns every
    # second that the state API is unavailable. Errors still reach the driver as exceptions, and
    # training progress is shown from each stage's metrics.jsonl (see distributed.train).
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING,
              "log_to_driver": os.environ.get("DRRAY_RAY_LOGS") == "1"}
    if address == "local" and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    log.info("starting Ray (%s)", address)
    for name in RAY_NOTICES:
        keep_off_console(name)
    keep_off_console(*RAY_DATA_NO_CPU)
    ray.init(address=address, **kwargs)
    _quiet_ray_data()


# Ray's loggers whose notices are about Ray, not the work (token authentication enabled by
# default, Ray Data's progress bars off because drray prints its own): kept in RUN/drray.log.
RAY_NOTICES = ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress")
# Ray Data warns that a dataset "will hang" whenever no CPU is free when it starts, which is every
# epoch of a stage whose training loop holds the CPUs it reserved while the data tasks run on the
# fractions set aside for them (drray.distributed.resources); drray checks its placement itself.
RAY_DATA_NO_CPU = ("ray.data.dataset", "Warning: The Ray cluster currently does not have any available CPUs")


def release_frames(exc: BaseException) -> None:
    """Let go, now, of what a failed job's frames hold, while Ray still runs. A traceback keeps
    every frame of the failure alive, and with them the job's half-read Ray Data iterators. Left
    to the end of the process, those were finalized after Ray had shut down, and Ray Data's
    clean-up then started a new local Ray: warnings, and once a process that never exited
    (2026-12-02: a FixMatch stage failed in its first step on the demo, and the CLI hung for
    10 minutes in ray.init; a SLURM job would hold its nodes to its time limit). Call it once
    the traceback is recorded: the frames' local variables are gone afterwards (the traceback
    still formats, with its lines)."""
    import gc
    import traceback

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()


def root_cause(exc: BaseException) -> BaseException:
    """The exception a user can act on, out of Ray's wrappers: a failed training worker's own
    error (the lowest rank's), a controller's, a remote task's or a Ray Data map's."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    for _ in range(8):  # wrappers nest a few deep at most
        if isinstance(exc, WorkerGroupError) and exc.worker_failures:
            exc = exc.worker_failures[min(exc.worker_failures)]
        elif isinstance(exc, ControllerError):
            exc = exc.controller_failure
        elif isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
            exc = exc.cause
        elif type(exc).__name__ == "UserCodeException" and exc.__cause__ is not None:  # Ray Data
            exc = exc.__cause__
        else:
            break
    return exc


def describe(exc: BaseException) -> str:
    """``Type: message`` in one line. Some of Ray's errors carry their cause only as text (an
    actor that died in ``__init__`` holds the remote traceback in its message): then the
    traceback's last line, the error raised over there, is the one to show."""
    text = str(exc).strip()
    if type(exc).__module__.startswith("ray.") and "\n" in text:
        raised = [m for m in _RAISED.finditer(text)]
        if raised:
            return raised[-1].group(0).strip()
    return f"{type(exc).__name__}: {(text.splitlines() or [''])[0]}"


# The last line of a Python traceback: "ValueError: ...", "ray.exceptions.X: ...".
_RAISED = re.compile(r"^[ \t]*[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)\b:[^\n]*$", re.MULTILINE)


def _quiet_ray_data() -> None:
    """drray shows its own one-line progress; Ray Data's per-operator bars and INFO lines would
    bury it. (Per process: the DataContext is not shared with Ray's worker processes.)"""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
