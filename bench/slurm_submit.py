"""How long `drray submit` takes to get a job running and its Ray cluster ready, on a real
2-node SLURM cluster on this machine (slurm/local-cluster.sh), against plain baselines measured
in the same run:

    python bench/slurm_submit.py [--repeats 3]

- to running: from just before the submitting command to the job's first line of work.
  Baseline: `sbatch --nodes 2 --wrap "date > FILE; srun true"` (the scheduler's own latency).
  Measured: `drray submit prepare --nodes 2` (config, profile and partition checks, submitit's
  pickling and sbatch, then the job's start-up in Python), up to its `started` event.
- to Ray ready: from the job's start to a 2-node Ray cluster over the allocation (head,
  worker, rendezvous, token). Baseline: `ray.init()` of a local one-node Ray in a fresh process.
Needs slurm-wlm and munge (apt-get install slurm-wlm munge) and root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).with_name("out") / "slurm"
CLUSTER = Path("/tmp/drray-bench-slurm")  # short: munge's socket path


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.is_file() or not path.read_text().strip():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def plain_sbatch(i: int) -> float:
    stamp = OUT / f"plain-{i}.txt"
    started = time.time()
    subprocess.run(["sbatch", "--nodes", "2", f"--output={OUT}/plain-{i}.log",
                    "--wrap", f"date +%s.%N > {stamp}; srun true"], check=True, capture_output=True)
    wait_for(stamp)
    return float(stamp.read_text()) - started


def drray_submit(i: int) -> tuple[float, float]:
    run = OUT / f"drray-{i}"
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "prepare", "--config", "configs/ci.yaml",
                          "--set", f"run.dir={run}", "--profile", "local", "--nodes", "2", "--wait"],
                         cwd=REPO, check=True, capture_output=True, text=True).stdout
    job_id = next(line.split(" as job ")[1].split()[0] for line in out.splitlines() if " as job " in line)
    events = [json.loads(line) for line in (run / "slurm" / f"{job_id}_events.jsonl").read_text().splitlines()]
    first = {e["event"]: e for e in reversed(events)}
    return first["started"]["time"] - started, first["ray_ready"]["seconds"]


def local_ray_init() -> float:
    code = ("import time, ray; t = time.perf_counter(); ray.init(include_dashboard=False); "
            "print(time.perf_counter() - t); ray.shutdown()")
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    subprocess.run(["bash", str(REPO / "slurm/local-cluster.sh"), "start", str(CLUSTER), "--nodes", "2",
                    "--cpus", "2"], check=True)
    os.environ.update(SLURM_CONF=str(CLUSTER / "slurm.conf"), DRRAY_HOME=str(OUT / "home"))
    try:
        plain = [plain_sbatch(i) for i in range(args.repeats)]
        drray = [drray_submit(i) for i in range(args.repeats)]
        local = [local_ray_init() for _ in range(args.repeats)]
    finally:
        subprocess.run(["bash", str(REPO / "slurm/local-cluster.sh"), "stop", str(CLUSTER)], check=False)
    med = statistics.median
    to_running, ray_ready = med(d[0] for d in drray), med(d[1] for d in drray)
    body = "\n".join([
        f"Machine: {machine()}; slurm/local-cluster.sh with 2 nodes x 2 CPUs on this host. Command: "
        f"`python bench/slurm_submit.py --repeats {args.repeats}` (medians of {args.repeats}).", "",
        "| step | baseline | s | drray | s | ratio |", "|---|---|---|---|---|---|",
        f"| submit -> job running | plain `sbatch --nodes 2` | {med(plain):.2f} | `drray submit prepare --nodes 2` "
        f"| {to_running:.2f} | {to_running / med(plain):.1f}x |",
        f"| job start -> Ray ready | local `ray.init()` (1 node) | {med(local):.2f} | Ray over the 2-node "
        f"allocation | {ray_ready:.2f} | {ray_ready / med(local):.1f}x |",
        f"| submit -> Ray ready | | | | {to_running + ray_ready:.2f} | |", "",
        "drray's submit -> running includes the checks before submission (config, profile, `sinfo` for the "
        "partition), submitit's pickling and `sbatch`, SLURM's scheduling, and the job's Python start-up "
        "(torch and Ray imports) up to its first event.",
    ])
    write_section("SLURM submission (bench/slurm_submit.py)", body)
    print(body)


if __name__ == "__main__":
    main()
