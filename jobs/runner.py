"""Running stages in order, and the record of it: the pipeline's steps (from the stage table),
``RUN/pipeline.json``, progress on the console. ``drray run pipeline``, ``table1`` and every sweep
trial run their steps through here.

    prepare -> pretrain -> teacher -> supervised -> baselines -> pseudolabel -> distill
            -> student -> oof -> models -> evaluate -> report

``baselines`` runs the stages ``pipeline.baselines`` names (FixMatch, MixMatch; none by
default); ``models`` publishes every trained stage's final model as ``RUN/models/<stage>``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drray.artifacts import atomic_write_json, write_resolved_config
from drray.config import Config, run_dir
from drray.progress import say
from jobs import common, stages


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    run: Callable[[Config], dict]


NOT_CONFIGURED = "not configured"  # a step the config does not ask for


def _baselines(cfg: Config) -> dict:
    """The semi-supervised baselines named in ``pipeline.baselines`` (none by default)."""
    if not cfg.pipeline.baselines:  # told apart from "found done" in pipeline.json and the report
        return {"stage": "baselines", "status": NOT_CONFIGURED, "dirs": {}}
    results = [stages.STAGES[name].function()(cfg) for name in cfg.pipeline.baselines]
    return {"stage": "baselines", "skipped": all(r.get("skipped") for r in results),
            "dirs": {r["stage"]: r["dir"] for r in results}}


def _models(cfg: Config) -> dict:
    """Publish the final model of every stage this config trains and publishes, as RUN/models/<stage>."""
    manifest = common.prepared_eyepacs(cfg)
    resolved = stages.resolve(cfg, manifest)
    published = {s.name: str(common.publish_model(cfg, s.name, resolved[s.name].dir, manifest))
                 for s in stages.training_stages(cfg) if s.publishes}
    return {"stage": "models", "models": published}


def stage_step(name: str) -> Step:
    s = stages.STAGES[name]
    return Step(s.name, s.what, lambda cfg: s.function()(cfg))


def pipeline_steps() -> list[Step]:
    """The stage table in order, the baselines as one step, the models published before the evaluation."""
    steps = []
    for s in stages.STAGES.values():
        if s.name in stages.BASELINES:
            if s.name == stages.BASELINES[0]:
                steps.append(Step("baselines", "pipeline.baselines: FixMatch / MixMatch on the same labels and pool",
                                  _baselines))
            continue
        if s.name == "evaluate":
            steps.append(Step("models", "publish RUN/models/<stage> for every trained stage", _models))
        steps.append(stage_step(s.name))
    return steps


def run_steps(cfg: Config, steps: list[Step], on_stage: Callable[[str, str], None] | None = None,
              record_name: str = "pipeline.json") -> dict:
    """Every step in order; ``on_stage(name, status)`` hears of each start and end (a sweep's
    trial passes them on to Ray Tune). A step found complete is recorded as skipped."""
    on_stage = on_stage or (lambda name, status: None)
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg)
    record = Invocations(out / record_name)
    for number, step in enumerate(steps, start=1):
        say("pipeline", f"stage {number}/{len(steps)}: {step.name}: {step.what}")
        started = time.time()
        record.stage(step.name, "running", started)
        on_stage(step.name, "running")
        try:
            result = step.run(cfg)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a SLURM job requeueing itself
            record.stage(step.name, "interrupted", started)
            record.finish("interrupted")
            raise
        except BaseException:
            record.stage(step.name, "failed", started)
            record.finish("failed")
            raise
        status = result.get("status") or ("skipped" if result.get("skipped") else "ran")
        record.stage(step.name, status, started, result)
        on_stage(step.name, status)
        say("pipeline", f"{step.name}: {status} ({time.time() - started:.0f} s)")
    record.finish("complete")
    report = out / "report.md"
    say("pipeline", f"done: {report.resolve()} (and report.html, metrics.json, models/)")
    return {"run_dir": str(out.resolve()), "report": str(report.resolve()), "stages": record.current["stages"]}


class Invocations:
    """RUN/pipeline.json: one entry per invocation of the pipeline, rewritten atomically after
    every stage (a killed invocation keeps the stages it finished and the one it was in)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
        self.current = {"started": time.time(), "status": "running", "stages": []}
        self.data["invocations"].append(self.current)

    def stage(self, name: str, status: str, started: float, result: dict | None = None) -> None:
        stages_ = self.current["stages"]
        if stages_ and stages_[-1]["stage"] == name:
            stages_.pop()
        entry = {"stage": name, "status": status, "seconds": round(time.time() - started, 2)}
        if result:
            entry.update({k: result[k] for k in ("dir", "path", "images_per_s", "images", "positives") if k in result})
        stages_.append(entry)
        atomic_write_json(self.path, self.data)

    def finish(self, status: str) -> None:
        self.current.update(status=status, finished=time.time())
        atomic_write_json(self.path, self.data)
