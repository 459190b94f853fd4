"""``drray run pipeline``: the paper's method end to end, plus the supervised baseline, then
the evaluation and the report.

    prepare -> pretrain -> teacher -> supervised -> baselines -> pseudolabel -> distill
            -> student -> models -> evaluate -> report

Each stage's output is keyed by its config and inputs (see jobs.common), and a finished stage
is skipped: a rerun after a crash redoes only what is missing, a changed downstream setting
reuses the upstream stages. ``RUN/pipeline.json`` records every invocation: which stages ran,
which were skipped, and how long each took.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from drray.artifacts import atomic_write_json, write_resolved_config
from drray.config import Config, run_dir
from jobs import (
    common,
    distill,
    evaluate,
    finetune,
    prepare,
    pretrain,
    pseudolabel,
    report,
    semisupervised,
)

log = logging.getLogger(__name__)


def _prepare(cfg: Config) -> dict:
    datasets = prepare.run(cfg)
    return {"stage": "prepare", "datasets": datasets, "skipped": all(d["reused"] for d in datasets.values())}


def _baselines(cfg: Config) -> dict:
    """The semi-supervised baselines named in ``pipeline.baselines`` (none by default)."""
    results = [semisupervised.run(cfg, method) for method in cfg.pipeline.baselines]
    return {"stage": "baselines", "skipped": all(r.get("skipped") for r in results),
            "dirs": {r["stage"]: r["dir"] for r in results}}


def _models(cfg: Config) -> dict:
    """Publish the final models as RUN/models/{teacher,student,supervised, and the baselines}."""
    manifest = common.prepared_eyepacs(cfg)
    published = {}
    for section, name in (("finetune", "teacher"), ("student_finetune", "student"), ("supervised", "supervised")):
        published[name] = str(common.publish_model(cfg, name, finetune.output_dir(cfg, section, manifest), manifest))
    for method in cfg.pipeline.baselines:
        published[method] = str(common.publish_model(cfg, method, semisupervised.output_dir(cfg, method, manifest),
                                                     manifest))
    return {"stage": "models", "models": published}


# (name, what it does, function)
STAGES: list[tuple[str, str, Callable[[Config], dict]]] = [
    ("prepare", "synthesise (where configured) and prepare the data sets",
     _prepare),
    ("pretrain", "SimCLR on the unlabeled pool", pretrain.run),
    ("teacher", "fine-tune the SimCLR backbone on the labeled subset", finetune.run),
    ("supervised", "baseline: the same labels, no pretraining", finetune.run_supervised),
    ("baselines", "pipeline.baselines: FixMatch / MixMatch on the same labels and pool", _baselines),
    ("pseudolabel", "the teacher labels the pool", pseudolabel.run),
    ("distill", "the student learns the pseudo-labels", distill.run),
    ("student", "fine-tune the student on the labeled subset", finetune.run_student),
    ("models", "publish RUN/models/{teacher,student,supervised}", _models),
    ("evaluate", "AUC with CIs, operating points, DeLong, ROC and t-SNE", evaluate.run),
    ("report", "RUN/report.md and RUN/report.html", lambda cfg: report.build(run_dir(cfg))),
]


def run(cfg: Config, on_stage: Callable[[str, str], None] | None = None, stages: list | None = None) -> dict:
    """Every stage in order (``stages``: another list of (name, what, function), e.g. table1's);
    ``on_stage(name, status)`` hears of each start and end (a sweep's trial passes them on to
    Ray Tune)."""
    stages = STAGES if stages is None else stages
    on_stage = on_stage or (lambda name, status: None)
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg)
    record = Invocations(out / "pipeline.json")
    for number, (name, what, stage) in enumerate(stages, start=1):
        print(f"[pipeline] stage {number}/{len(stages)}: {name}: {what}", file=sys.stderr, flush=True)
        started = time.time()
        record.stage(name, "running", started)
        on_stage(name, "running")
        try:
            result = stage(cfg)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a SLURM job requeueing itself
            record.stage(name, "interrupted", started)
            record.finish("interrupted")
            raise
        except BaseException:
            record.stage(name, "failed", started)
            record.finish("failed")
            raise
        status = "skipped" if result.get("skipped") else "ran"
        record.stage(name, status, started, result)
        on_stage(name, status)
        print(f"[pipeline] {name}: {status} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    record.finish("complete")
    report = out / "report.md"
    print(f"[pipeline] done: {report.resolve()} (and report.html, metrics.json, models/)", file=sys.stderr, flush=True)
    return {"run_dir": str(out.resolve()), "report": str(report.resolve()),
            "stages": record.current["stages"]}


class Invocations:
    """RUN/pipeline.json: one entry per invocation of the pipeline, rewritten atomically after
    every stage (a killed invocation keeps the stages it finished and the one it was in)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
        self.current = {"started": time.time(), "status": "running", "stages": []}
        self.data["invocations"].append(self.current)

    def stage(self, name: str, status: str, started: float, result: dict | None = None) -> None:
        stages = self.current["stages"]
        if stages and stages[-1]["stage"] == name:
            stages.pop()
        entry = {"stage": name, "status": status, "seconds": round(time.time() - started, 2)}
        if result:
            entry.update({k: result[k] for k in ("dir", "path", "images_per_s", "images", "positives") if k in result})
        stages.append(entry)
        atomic_write_json(self.path, self.data)

    def finish(self, status: str) -> None:
        self.current.update(status=status, finished=time.time())
        atomic_write_json(self.path, self.data)

