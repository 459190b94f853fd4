"""What the sweep's shared pretraining saves: a K-fraction sweep (one seed) against K
independent pipelines at the same scale, each of which pretrains for itself.

    python bench/sweep.py [--config configs/sweep-ci.yaml] [--fractions 0.1 0.25 0.5] [--set k=v ...]

Baseline: `drray run pipeline` once per fraction, each in a fresh run directory (so each runs
SimCLR). Measured: `drray run sweep` over the same fractions in a fresh run directory. The
issue's target, from the pipelines' own stage records: sweep <= pretraining + K x downstream
+ 10%, where pretraining is the pipelines' mean pretrain time and downstream each pipeline's
time after pretraining (teacher ... report). Wall times are whole commands (Python and Ray
start-up included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402

OUT = Path(__file__).with_name("out") / "sweep"


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/sweep-ci.yaml")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    drray = [sys.executable, "-m", "jobs.cli", "run"]
    sets = [x for o in args.overrides for x in ("--set", o)]
    k = len(args.fractions)

    pipelines = []
    for f in args.fractions:
        run = OUT / f"pipeline-{f:g}"
        wall = timed(drray + ["pipeline", "--config", args.config, *sets, "--set", f"run.dir={run}",
                              "--set", "labels.count=null", "--set", f"labels.fraction={f}"])
        stages = json.loads((run / "pipeline.json").read_text())["invocations"][-1]["stages"]
        seconds = {s["stage"]: s["seconds"] for s in stages}
        pretrain = seconds.pop("pretrain")
        pipelines.append({"fraction": f, "wall": wall, "pretrain": pretrain, "downstream": sum(seconds.values())})
        print(f"pipeline {f:g}: {wall:.0f} s (pretrain {pretrain:.0f} s)", flush=True)

    fractions = "[" + ", ".join(f"{f:g}" for f in args.fractions) + "]"
    sweep_wall = timed(drray + ["sweep", "--config", args.config, *sets, "--set", f"run.dir={OUT / 'sweep'}",
                                "--set", f"sweep.fractions={fractions}", "--set", "sweep.seeds=[0]",
                                "--set", "sweep.concurrent_trials=1"])
    print(f"sweep: {sweep_wall:.0f} s", flush=True)
    pretrain = sum(p["pretrain"] for p in pipelines) / k
    target = 1.10 * (pretrain + sum(p["downstream"] for p in pipelines))
    pipelines_wall = sum(p["wall"] for p in pipelines)
    write_section("Label-fraction sweep (bench/sweep.py)", _table(args, pipelines, sweep_wall, pretrain, target))
    print(f"K={k}: {k} pipelines {pipelines_wall:.0f} s, sweep {sweep_wall:.0f} s "
          f"({sweep_wall / pipelines_wall:.2f}x); target <= {target:.0f} s: {'met' if sweep_wall <= target else 'MISSED'}")


def _table(args, pipelines: list[dict], sweep_wall: float, pretrain: float, target: float) -> str:
    k = len(pipelines)
    pipelines_wall = sum(p["wall"] for p in pipelines)
    lines = [f"Machine: {machine()}. Command: `python bench/sweep.py --config {args.config} --fractions "
             f"{' '.join(f'{f:g}' for f in args.fractions)}{''.join(f' --set {o}' for o in args.overrides)}` "
             "(one seed; sweep.concurrent_trials 1).", "",
             "| run | wall s | pretrain s | after pretrain s |", "|---|---|---|---|"]
    for p in pipelines:
        lines.append(f"| pipeline, fraction {p['fraction']:g} | {p['wall']:.0f} | {p['pretrain']:.0f} | "
                     f"{p['downstream']:.0f} |")
    lines += [f"| **{k} pipelines (baseline)** | **{pipelines_wall:.0f}** | | |",
              f"| **sweep over the {k} fractions** | **{sweep_wall:.0f}** | | |", "",
              f"Sweep / {k} pipelines: **{sweep_wall / pipelines_wall:.2f}x**. Target: sweep <= (mean pretrain "
              f"{pretrain:.0f} s + the pipelines' downstream {sum(p['downstream'] for p in pipelines):.0f} s) x 1.10 = "
              f"{target:.0f} s: **{'met' if sweep_wall <= target else 'MISSED'}** "
              f"({sweep_wall / target:.2f} of the target)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
