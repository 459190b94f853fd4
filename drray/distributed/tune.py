"""A fixed grid of trials on Ray Tune: concurrency limit, retries, resumption, console progress.

Ray 2.60 (Train V2) runs Train jobs inside Tune as a trial *function* that builds and fits
``TorchTrainer``s itself (``Tuner(TorchTrainer(...))`` raises); the function reports with
``ray.tune.report``. Tune reserves only the trial function's own resources: the Train workers
it launches ask the cluster separately, so the caller checks that ``concurrent`` trials' peak
demand fits (drray.distributed.resources) and limits concurrency to that.

Resumption: the experiment lives in ``storage/experiment``; when that holds an earlier run,
it is restored (``Tuner.restore(resume_errored=True)``): finished trials keep their results
and are not run again, unfinished and errored ones run again. A trial's own work is resumable
too (drray's stage cache), so a rerun trial redoes only its unfinished stages.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from drray.progress import say


@dataclass(frozen=True)
class TrialOutcome:
    name: str
    status: str  # "finished" | "failed"
    error: str | None = None


def run_grid(trainable: Callable, trials: list[dict], *, storage: Path, experiment: str, trial_cpus: float,
             concurrent: int, max_failures: int, trial_gpus: float = 0.0) -> list[TrialOutcome]:
    """Run ``trainable(config)`` once per entry of ``trials`` (each a dict with a unique
    ``"name"``; ``config["trial"]`` is that dict). Returns one outcome per trial, in order."""
    names = [t["name"] for t in trials]
    if len(set(names)) != len(names):
        raise ValueError(f"trial names must be unique: {names}")
    # Tune's own console tables would bury drray's one line per event (ProgressPrinter);
    # verbose=0 silences them only with the legacy reporter.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    resources = {"cpu": trial_cpus, **({"gpu": trial_gpus} if trial_gpus else {})}
    fn = tune.with_resources(trainable, resources)
    path = (storage / experiment).resolve()
    if tune.Tuner.can_restore(str(path)):
        say("sweep", f"resuming {path}: finished trials keep their results")
        tuner = tune.Tuner.restore(str(path), trainable=fn, resume_errored=True)
    else:
        tuner = tune.Tuner(
            fn,
            param_space={"trial": tune.grid_search(trials)},
            # reuse_actors: the next trial runs in the finished one's process, which has torch,
            # Ray Data and the models' code loaded already (~5 s a trial here)
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name, reuse_actors=True),
            run_config=tune.RunConfig(name=experiment, storage_path=str(storage.resolve()), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      callbacks=[ProgressPrinter(len(trials))]),
        )
    results = tuner.fit()
    by_name = {}
    for result in results:
        name = result.config["trial"]["name"]
        by_name[name] = TrialOutcome(name, "failed" if result.error else "finished",
                                     _first_line(result.error) if result.error else None)
    return [by_name.get(n, TrialOutcome(n, "failed", "Tune has no result for this trial")) for n in names]


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


class ProgressPrinter(tune.Callback):
    """One line per event on the driver's stderr: a trial started, reached a stage, finished,
    failed or is retried; with how many are done. (Restored with the experiment, so it keeps
    no counts of its own.)"""

    def __init__(self, total: int):
        self.total = total
        self.started = time.time()

    def setup(self, **info):
        self.started = time.time()

    def _say(self, trials, trial, text: str) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        say(f"sweep {done}/{self.total} done, {time.time() - self.started:.0f} s", f"{_trial_name(trial)}: {text}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(trials, trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "stage" in result:
            self._say(trials, trial, f"{result['stage']} {result.get('status', '')}".strip())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._say(trials, trial, "finished")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._say(trials, trial, "failed; retrying (sweep.max_failures)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(trials, trial, "FAILED after its retries (see its trial.log)")
