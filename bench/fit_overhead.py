"""Where a training stage's fixed cost goes: from the stage's start to its first training step,
and from its last step to its end, for one short ci-scale stage (the supervised baseline, one
epoch) on Ray Train (``scaling.runtime=ray``, one worker) against the same stage with the fit
loop in the driver (``scaling.runtime=driver``, the plain baseline: same loop, same Ray Data
streams), in the same run.

    python bench/fit_overhead.py [--fits 3]

Each fit of a stage is timed from the driver (before ``fit_stage``, after it returns) and from
the worker's own timeline (``workers/rank0.timeline.json``: fit started in the worker, model
ready, wait for the first batch), so the phases add up:

    stage start -> fit started     the job's own preparation, then (Ray) controller, placement
                                   group, worker process, imports, process group
    fit started -> model ready     model built (and resumed)
    model ready -> first batch     the Ray Data stream's start-up in the worker
    last epoch -> fit returned     teardown (workers, controller, the stream)

Written to bench/RESULTS.md (section "Ray Train fit: fixed costs").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402

OUT = Path(__file__).with_name("out") / "fit_overhead"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ci.yaml"
SETTINGS = ["supervised.epochs=1", "supervised.patience=null"]

CHILD = r"""
import json, sys, time
from pathlib import Path
from drray.config import load_config
from jobs import common, stages

cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
fits = int(sys.argv[3])
started = time.time()
manifest, _ = common.resolved(cfg, "supervised")  # prepares (once) and starts Ray
ray_ready = time.time()
out = []
for i in range(fits):
    import dataclasses
    run = dataclasses.replace(cfg.run, seed=cfg.run.seed + i)  # a fresh stage (key) every fit
    c = dataclasses.replace(cfg, run=run)
    r = stages.resolve(c, manifest)["supervised"]
    t0 = time.time(); r.stage.function()(c); t1 = time.time()
    timeline = r.dir.timeline()
    last = [x for x in r.dir.metrics() if "epoch" in x][-1]
    out.append({"driver_start": t0, "driver_end": t1, **timeline, "last_epoch_end": last["time"]})
print(json.dumps({"ray_start_s": ray_ready - started, "fits": out}))
"""


def measure(kind: str, fits: int, run_dir: Path) -> dict:
    settings = SETTINGS + [f"run.dir={run_dir / kind}", f"supervised.scaling.runtime={kind}"]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(CONFIG), json.dumps(settings), str(fits)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def phases(fit: dict) -> dict:
    to_worker = fit["fit_started"] - fit["driver_start"]
    model = fit["model_ready"] - fit["fit_started"]
    first_step = fit["model_ready"] - fit["driver_start"] + fit["first_batch_s"]
    return {"to_worker_s": to_worker, "model_s": model, "first_batch_s": fit["first_batch_s"],
            "to_first_step_s": first_step, "teardown_s": fit["driver_end"] - fit["last_epoch_end"],
            "total_s": fit["driver_end"] - fit["driver_start"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=3, help="fits per kind (the first pays the worker imports)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {kind: measure(kind, args.fits, OUT / stamp) for kind in ("ray", "driver")}
    rows = {kind: [phases(f) for f in r["fits"]] for kind, r in results.items()}
    (OUT / f"{stamp}.json").write_text(json.dumps({"raw": results, "phases": rows}, indent=2))
    lines = [f"Machine: {machine()}. `python bench/fit_overhead.py --fits {args.fits}`: the supervised stage of "
             f"`configs/ci.yaml` for one epoch, {args.fits} fits per kind in one process (each a new stage); "
             "seconds per phase (see the script's docstring). `ray`: `scaling.runtime=ray` (Ray Train's "
             "TorchTrainer, 1 worker); `driver`: `scaling.runtime=driver` (the same loop in the job's process over "
             "the same Ray Data streams; what `auto` picks for one CPU worker).", "",
             "| runtime | fit | to fit loop | model | first batch | **to first step** | teardown | total |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, fits in rows.items():
        for i, p in enumerate(fits):
            lines.append(f"| {kind} | {i + 1} | {p['to_worker_s']:.1f} | {p['model_s']:.1f} | {p['first_batch_s']:.1f} "
                         f"| **{p['to_first_step_s']:.1f}** | {p['teardown_s']:.1f} | {p['total_s']:.1f} |")
    later = lambda kind, key: sum(p[key] for p in rows[kind][1:]) / max(1, len(rows[kind]) - 1)  # noqa: E731
    ray, driver = later("ray", "to_first_step_s"), later("driver", "to_first_step_s")
    lines += ["", f"Fits after the first: to first step {ray:.1f} s on Ray Train against {driver:.1f} s in the "
                  f"driver ({ray / max(driver, 1e-9):.1f}x); teardown {later('ray', 'teardown_s'):.1f} s against "
                  f"{later('driver', 'teardown_s'):.1f} s."]
    text = "\n".join(lines)
    print(text)
    write_section("Ray Train fit: fixed costs (bench/fit_overhead.py)", text)


if __name__ == "__main__":
    main()
