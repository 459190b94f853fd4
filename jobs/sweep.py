"""``drray run sweep``: how much does each labeled image buy, and how much does
self-supervision save? The pipeline's label-dependent stages repeated over label fractions (or
counts) x seeds with Ray Tune, all from ONE SimCLR pretraining.

    prepare, pretrain (once, shared)  ->  Ray Tune: one trial per (fraction, seed):
        teacher -> supervised -> pseudolabel -> distill -> student -> evaluate -> report
    ->  RUN/sweep.parquet, RUN/sweep.md, RUN/figures/sweep_auc.png, RUN/report.{md,html}

Every trial is a pipeline run of its own in ``RUN/trials/<trial>/`` (models, metrics.json,
report, pipeline.json, trial.log) whose stage outputs live in the sweep's stage cache
(``run.stages``, by default RUN itself): the pretraining each trial asks for is the one the
sweep ran before Tune started, found by its key, never run again. Labeled subsets are nested
across fractions for a seed (drray.data.splits), so a larger fraction adds images to a smaller
one's. Rerunning the same command resumes: finished trials are restored from Tune's experiment
(not rerun), unfinished ones continue from their finished stages and Ray Train checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

from drray import report
from drray.artifacts import atomic_write_json, atomic_write_text, write_resolved_config
from drray.config import ClusterShare, Config, run_dir, stages_dir
from drray.distributed.resources import Demand, inference_demand, training_demand
from drray.distributed.scaling import (
    ClusterShape,
    cluster_shape,
    inference_actors,
    training_workers,
)
from jobs import common, stages
from jobs.runner import Invocations, pipeline_steps, run_steps, say

INFERENCE_STAGES = ("pseudolabel", "evaluate")  # a trial's Ray Data inference (InferenceConfig sections)
SHARED_STAGES = ("prepare", "pretrain")  # run once for every trial: they read no labels


# --- the grid ----------------------------------------------------------------------------------


def grid(cfg: Config) -> list[dict]:
    """One trial per (fraction or count, seed), each with a readable unique name."""
    s = cfg.sweep
    if bool(s.fractions) == bool(s.counts):
        raise ValueError("sweep: give exactly one of sweep.fractions (e.g. [0.01, 0.02, 0.05]) and sweep.counts")
    if not s.seeds:
        raise ValueError("sweep.seeds is empty: give at least one seed, e.g. [0, 1, 2]")
    for f in s.fractions:
        if not 0 < f <= 1:
            raise ValueError(f"sweep.fractions: {f} is not in (0, 1]")
    if s.concurrent_trials < 1:
        raise ValueError("sweep.concurrent_trials must be at least 1")
    trials = []
    for seed in s.seeds:
        for f in s.fractions:
            trials.append({"name": f"frac{f:g}-seed{seed}", "fraction": f, "count": None, "seed": seed})
        for n in s.counts:
            trials.append({"name": f"n{n}-seed{seed}", "fraction": None, "count": n, "seed": seed})
    return trials


def trial_config(base: Config, trial: dict, share: ClusterShare | None = None) -> Config:
    """The base config with the trial's labels, its own run dir and the sweep's stage cache."""
    labels = dataclasses.replace(base.labels, fraction=trial["fraction"], count=trial["count"], seed=trial["seed"])
    run = dataclasses.replace(base.run, dir=str(trial_dir(base, trial["name"])),
                              stages=str(stages_dir(base).resolve()))
    # ``share``: a Tune trial's part of the cluster (tune_share); a SLURM array task has a cluster
    # of its own. "auto" worker counts take it, as check_sweep_fits counts.
    return dataclasses.replace(base, labels=labels, run=run, share=share or ClusterShare())


def tune_share(cfg: Config) -> ClusterShare:
    """A Tune trial's part of the cluster: one of the concurrent trials' equal parts, less the
    CPUs its own actor holds (sweep.trial_cpus)."""
    return ClusterShare(cfg.sweep.concurrent_trials, cfg.sweep.trial_cpus)


def trial_dir(base: Config, name: str) -> Path:
    return (run_dir(base) / "trials" / name).resolve()


def experiment_name(cfg: Config, trials: list[dict]) -> str:
    """Same grid and settings -> same Tune experiment (restored on a rerun); a changed setting
    starts a new one (its trials still reuse every stage the change leaves valid). Where the
    run lives, how many trials run at once and table1's seeds (another job's) do not count."""
    return "tune-" + stages.key_of(trials, stages.settings_part(cfg, ("run", "sweep", "table1")), cfg.run.seed)


# --- resources ---------------------------------------------------------------------------------


def trial_demand(cfg: Config, shape: ClusterShape) -> Demand:
    """A trial's peak: its own process plus the largest of the stages it runs one after another
    ("auto" counts resolved from one trial's ``shape`` of the cluster)."""
    demands = []
    for s in stages.training_stages(cfg):
        section = s.config(cfg)
        scaling = training_workers(section.scaling, section.batch_size, s.section, shape)
        demands.append(training_demand(scaling.num_workers, scaling.cpus_per_worker, scaling.use_gpu,
                                       f"{s.section}.scaling"))
    for name in INFERENCE_STAGES:
        section = stages.STAGES[name].config(cfg)
        actors = inference_actors(section.concurrency, section.cpus_per_actor, section.use_gpu, name, shape)
        demands.append(inference_demand(actors, section.cpus_per_actor, section.use_gpu, name))
    largest = max(demands, key=lambda d: (d.cpus, d.gpus))
    return Demand(cfg.sweep.trial_cpus + largest.cpus, max(d.gpus for d in demands), largest.what)


def check_sweep_fits(cfg: Config, cluster: ClusterShape) -> None:
    """Fail before Tune starts, saying what is missing: Tune would wait forever for trials
    (or their Train workers) that the cluster cannot place."""
    n = cfg.sweep.concurrent_trials
    one = trial_demand(cfg, cluster.share(tune_share(cfg)))
    capacity = cluster.capacity
    need = one.times(n)
    fit = int(min(capacity.cpus // one.cpus if one.cpus else n,
                  capacity.gpus // one.gpus if one.gpus else n))
    if need.cpus <= capacity.cpus and need.gpus <= capacity.gpus:
        return
    what = (f"a trial needs {one.cpus:g} CPUs{f' and {one.gpus:g} GPUs' if one.gpus else ''} at its peak "
            f"(sweep.trial_cpus {cfg.sweep.trial_cpus:g} + its largest stage, {one.what}, with its data tasks)")
    have = f"the Ray cluster has {capacity.cpus:g} CPUs and {capacity.gpus:g} GPUs"
    if fit < 1:
        raise ValueError(f"sweep: {what}; {have}. Lower that stage's scaling or sweep.trial_cpus, or add nodes.")
    raise ValueError(f"sweep: {n} concurrent trials need {need.cpus:g} CPUs and {need.gpus:g} GPUs: {what}; "
                     f"{have}. Set sweep.concurrent_trials={fit} or add nodes.")


# --- the trial (runs in a Ray Tune actor) ------------------------------------------------------


def trial(config: dict, base: Config, cwd: str, experiment: str) -> dict:
    """One Ray Tune trial: ``run_trial`` with each stage's start and end reported to Tune (and
    so to the sweep's console)."""
    from ray import tune

    os.chdir(cwd)  # Tune starts trials in a directory of their own; the config's paths are relative to cwd
    finished = run_trial(base, config["trial"], experiment, share=tune_share(base),
                         on_stage=lambda name, status: tune.report({"stage": name, "status": status}))
    return {"stage": "trial", "status": "finished", "seconds": finished["seconds"]}


def run_trial(base: Config, spec: dict, experiment: str, on_stage=None, share: ClusterShare | None = None) -> dict:
    """The pipeline at the trial's labels; its progress goes to trial.log. A trial that already
    finished for this experiment (its trial.json says so) returns at once: Tune saves its own
    state every ~10 s, so a sweep killed just after a trial ended would otherwise run that trial
    again (and a SLURM array task may be requeued after it finished)."""
    cfg = trial_config(base, spec, share)
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    finished = finished_trial(out, experiment)
    with (out / "attempts.jsonl").open("a") as attempts:  # one line per attempt: retries are visible
        attempts.write(json.dumps({"pid": os.getpid(), "started": time.time(), "experiment": experiment,
                                   "already_finished": finished is not None}) + "\n")
    if finished is None:
        with (out / "trial.log").open("a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
            run_steps(cfg, pipeline_steps(), on_stage)
        finished = {**trial_record(cfg, spec), "experiment": experiment}
        atomic_write_json(out / "trial.json", finished)
    return finished


def finished_trial(out: Path, experiment: str) -> dict | None:
    """The trial's record if it finished under this experiment (the same settings), else None."""
    path = out / "trial.json"
    record = json.loads(path.read_text()) if path.is_file() else None
    return record if record and record.get("experiment") == experiment else None


def trial_record(cfg: Config, spec: dict) -> dict:
    """What the sweep table keeps of a finished trial (from the files its pipeline wrote)."""
    out = run_dir(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    subset = common.labeled_subset(cfg)
    invocations = json.loads((out / "pipeline.json").read_text())["invocations"]
    seconds = sum(s["seconds"] for inv in invocations for s in inv["stages"])
    results = [{"method": r["model"], "test_set": r["test_set"], "auc": r["auc"], "ci_low": r["auc_ci"][0],
                "ci_high": r["auc_ci"][1], "n": r["n"], "positives": r["positives"]} for r in report.rows_at(metrics)]
    return {**spec, "labeled": subset.used, "validation": len(subset.validation), "available": subset.available, "seconds": round(seconds, 1),
            "attempts": len((out / "attempts.jsonl").read_text().splitlines()), "results": results}


# --- the sweep ---------------------------------------------------------------------------------


def run(cfg: Config) -> dict:
    """The whole sweep in one Ray cluster (a laptop, or one multi-node SLURM allocation)."""
    from drray.distributed.tune import run_grid

    trials = grid(cfg)
    record = run_shared_stages(cfg, "sweep.json", trials)
    check_sweep_fits(cfg, cluster_shape())
    out = run_dir(cfg).resolve()
    started = time.time()
    record.stage("trials", "running", started)
    from ray import tune

    experiment = experiment_name(cfg, trials)
    outcomes = run_grid(tune.with_parameters(trial, base=cfg, cwd=os.getcwd(), experiment=experiment), trials,
                        storage=out / "tune", experiment=experiment,
                        trial_cpus=cfg.sweep.trial_cpus, concurrent=cfg.sweep.concurrent_trials,
                        max_failures=cfg.sweep.max_failures)
    failed = [o for o in outcomes if o.status != "finished"]
    record.stage("trials", "failed" if failed else "ran", started)
    return _results(cfg, trials, outcomes, experiment, record)


def run_shared_stages(cfg: Config, record_name: str, trials: list[dict]) -> Invocations:
    """prepare and pretrain, once for every trial; and every trial's labels checked (a fraction
    or count the data cannot give fails here, not in a trial)."""
    out = run_dir(cfg).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg)
    record = Invocations(out / record_name)
    _say(f"{len(trials)} trials ({', '.join(t['name'] for t in trials)}) from one pretraining")
    for name in SHARED_STAGES:
        _say(f"shared stage: {name}")
        started = time.time()
        record.stage(name, "running", started)
        result = stages.STAGES[name].function()(cfg)
        record.stage(name, "skipped" if result.get("skipped") else "ran", started, result)
    for spec in trials:
        common.labeled_subset(trial_config(cfg, spec))
    return record


def _say(text: str) -> None:
    say("sweep", text)


def _results(cfg: Config, trials: list[dict], outcomes, experiment: str, record: Invocations) -> dict:
    out = run_dir(cfg).resolve()
    failed = [o for o in outcomes if o.status != "finished"]
    table = write_results(cfg, trials, outcomes, experiment)
    record.finish("failed" if failed else "complete")
    if failed:
        raise ValueError(f"sweep: {len(failed)} of {len(trials)} trials failed after their retries: "
                         + "; ".join(f"{o.name} ({o.error}, log {trial_dir(cfg, o.name) / 'trial.log'})" for o in failed)
                         + f". The others' results are in {out}/sweep.md; rerun the same command to retry the failed.")
    return {"run_dir": str(out), "trials": len(trials), "rows": table, "sweep": str(out / "sweep.md"),
            "report": str(out / "report.md")}


# --- the sweep as SLURM jobs: shared stages, then a job array of trials, then the results --------
# (drray submit sweep --array; each is a ClusterJob with a Ray cluster of its own, and they meet
# in the stage cache on the shared file system)


def array_shared(cfg: Config) -> dict:
    run_shared_stages(cfg, "sweep.json", grid(cfg)).finish("complete")
    return {"stage": "shared", "run_dir": str(run_dir(cfg).resolve())}


def array_trial(cfg: Config, index: int) -> dict:
    trials = grid(cfg)
    spec = trials[index]
    _say(f"array task {index}: trial {spec['name']}")
    finished = run_trial(cfg, spec, experiment_name(cfg, trials))
    return {"stage": "trial", "trial": spec["name"], "seconds": finished["seconds"]}


def array_results(cfg: Config) -> dict:
    """After the array: the sweep's table, figure and report from the trials that finished."""
    from drray.distributed.tune import TrialOutcome

    trials = grid(cfg)
    experiment = experiment_name(cfg, trials)
    outcomes = [TrialOutcome(t["name"], "finished") if finished_trial(trial_dir(cfg, t["name"]), experiment)
                else TrialOutcome(t["name"], "failed", "its array task did not finish (see its log in RUN/slurm/)")
                for t in trials]
    record = Invocations(run_dir(cfg).resolve() / "sweep.json")
    return _results(cfg, trials, outcomes, experiment, record)


def write_results(cfg: Config, trials: list[dict], outcomes, experiment: str) -> int:
    """RUN/sweep.parquet (one row per trial x method x test set), RUN/sweep.md, the figure and
    the run report, from the finished trials' trial.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = run_dir(cfg).resolve()
    rows = []
    for spec in trials:
        t = finished_trial(trial_dir(cfg, spec["name"]), experiment)
        if t is None:
            continue
        fraction = t["fraction"] if t["fraction"] is not None else t["labeled"] / t["available"]
        for r in t["results"]:
            rows.append({"trial": t["name"], "fraction": fraction, "count": t["labeled"], "seed": t["seed"], **r,
                         "trial_seconds": t["seconds"]})
    table = pa.Table.from_pylist(rows, schema=report.SWEEP_SCHEMA)
    tmp = out / f".sweep.parquet.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "sweep.parquet")
    atomic_write_json(out / "sweep_trials.json", [dataclasses.asdict(o) for o in outcomes])
    atomic_write_text(out / "sweep.md", report.sweep_markdown(out))
    report.build(out)
    return len(rows)
