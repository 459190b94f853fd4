"""Wall time of the demo pipeline per stage, as `make demo` runs it, from a fresh run directory
(and, with --fresh-data, fresh synthetic data: what a new clone pays).

    python bench/demo.py [--fresh-data] [--config configs/demo.yaml]

The stage times come from the pipeline's own record (RUN/pipeline.json); the total is the
command's wall time, Python and Ray start-up included. There is no baseline to divide by: the
figure to compare is the issue's target, 10 minutes on a 2-core machine.
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
from drray import report  # noqa: E402

OUT = Path(__file__).with_name("out") / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--fresh-data", action="store_true", help="delete the demo's data first (synthesis included)")
    args = parser.parse_args()

    from drray.config import load_config

    cfg = load_config(args.config)
    if args.fresh_data:
        for ds in (cfg.data.eyepacs, cfg.data.external):
            if ds is not None and ds.synthetic is not None:
                shutil.rmtree(ds.images, ignore_errors=True)
                shutil.rmtree(ds.prepared, ignore_errors=True)
    shutil.rmtree(OUT, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.cli", "run", "pipeline", "--config", args.config,
                    "--set", f"run.dir={OUT}"], check=True)
    total = time.perf_counter() - started
    stages = json.loads((OUT / "pipeline.json").read_text())["invocations"][-1]["stages"]
    metrics = report.rows_at(json.loads((OUT / "metrics.json").read_text()))
    write_section("Demo pipeline (bench/demo.py)", _table(args, stages, metrics, total))
    print(f"demo pipeline: {total:.0f} s")


def _table(args, stages: list[dict], metrics: list[dict], total: float) -> str:
    lines = [f"Machine: {machine()}. Command: `python bench/demo.py{' --fresh-data' if args.fresh_data else ''}` "
             f"(= `make demo` after the install{', synthetic data made anew' if args.fresh_data else ''}).", "",
             "| stage | status | wall s | share |", "|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {s['seconds'] / total:.0%} |")
    lines += [f"| **total (command wall time)** | | **{total:.0f}** ({total / 60:.1f} min) | |", "",
              "| model | test set | AUC [95% CI] |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['test_set']} | {r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] |"
              for r in metrics if r["test_set"] != "validation"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
