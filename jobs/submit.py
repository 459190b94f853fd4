"""``drray submit JOB``: the job ``drray run JOB`` runs, as a SLURM job (submitit); a sweep also
as a job array. Everything that can be wrong (config, profile, partition, sweep grid) is
checked here, before anything reaches the cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from drray.config import Config, run_dir
from drray.launch import slurm
from drray.launch.profiles import Profile, check_partition, check_profile
from jobs import sweep


def submit(job: str, fn: Callable, cfg: Config, config_path: Path, profile: Profile, source: str, *,
           cluster: str, array: bool) -> list[slurm.Submission]:
    """Submit; returns the submissions (several for a sweep as a job array)."""
    check_profile(profile, source)
    if cluster == "slurm":
        check_partition(profile, source)
    if job == "sweep":
        sweep.grid(cfg)  # a bad grid fails now, not on the cluster
    elif array:
        raise ValueError("--array applies to `drray submit sweep` only (one array task per trial)")
    out = run_dir(cfg).resolve()
    if array:
        if cluster != "slurm":
            raise ValueError("--array needs SLURM (job arrays and dependencies); drop --executor local")
        return submit_sweep_array(cfg, config_path, profile)
    return [slurm.submit(fn, (cfg,), name=job, run_dir=out, profile=profile, cluster=cluster,
                         config=str(config_path))]


def submit_sweep_array(cfg: Config, config_path: Path, profile: Profile) -> list[slurm.Submission]:
    """Three steps that meet in the stage cache on the shared file system: the shared stages
    (prepare, pretraining); when they succeeded, one array task per trial; when the array has
    ended (however), the results (table, figure, report) of the trials that finished."""
    out = run_dir(cfg).resolve()
    n = len(sweep.grid(cfg))
    common = {"run_dir": out, "profile": profile, "config": str(config_path)}
    shared = slurm.submit(sweep.array_shared, (cfg,), name="sweep-shared", cluster="slurm", **common)
    trials = slurm.submit_array(sweep.array_trial, [(cfg, i) for i in range(n)], name="sweep-trial",
                                depends_on=f"afterok:{shared.job_id}", **common)
    array_id = trials[0].job_id.split("_")[0]
    results = slurm.submit(sweep.array_results, (cfg,), name="sweep-results", cluster="slurm",
                           depends_on=f"afterany:{array_id}", **common)
    return [shared, *trials, results]


def describe(subs: list[slurm.Submission]) -> str:
    first = subs[0]
    lines = []
    for s in subs:
        after = f", after {s.depends_on}" if s.depends_on else ""
        lines.append(f"submitted {s.name} as job {s.job_id} ({s.cluster}, {s.nodes} node(s){after})")
    out, err = first.logs("both")
    ids = " ".join(dict.fromkeys(s.job_id.split("_")[0] for s in subs))  # an array by its array id
    lines += [f"logs: {out} and {err.name}" + (" (each job has its own pair in that folder)" if len(subs) > 1 else ""),
              f"follow: drray logs {first.job_id} --follow    state: drray jobs    stop: drray cancel {ids}",
              f"run dir: {first.run_dir}"]
    return "\n".join(lines)
