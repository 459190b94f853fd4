"""``drray run table1``: every row of the paper's Table 1 on the same data, labels and evaluation.

    the pipeline with pipeline.baselines = fixmatch, mixmatch  (stages found done are skipped)
    + the supervised baseline on 100% of the labels            -> RUN/models/supervised_100
    -> evaluate (all six models, both test sets) -> RUN/table1.md, RUN/table1.parquet
    -> report (RUN/report.md with the table and whether the paper's claim holds)

One row per method and test set: labels, architecture, AUC with its 95% CI, the paper's AUC,
and DeLong's p of the method against the distilled student on the same images.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from drray import report
from drray.artifacts import atomic_write_text
from drray.config import Config, run_dir
from jobs import common, stages
from jobs.runner import Step, pipeline_steps, run_steps

# (model name in RUN/models, the paper's row): Table 1's order
ROWS = tuple((name, "100%" if name == "supervised_100" else "subset") for name in stages.MODEL_ORDER)
REFERENCE = "student"  # DeLong p-values against the method the paper proposes


def full_labels(cfg: Config) -> Config:
    """The config of the 100%-labels supervised row: every labeled train image left after the
    validation hold-out (the same hold-out as the other rows)."""
    return dataclasses.replace(cfg, labels=dataclasses.replace(cfg.labels, fraction=1.0, count=None))


def _supervised_100(cfg: Config) -> dict:
    full = full_labels(cfg)
    manifest, r = common.resolved(full, "supervised")
    result = r.stage.function()(full)
    common.publish_model(cfg, "supervised_100", r.dir, manifest)
    return {**result, "stage": "supervised_100"}


def steps() -> list[Step]:
    """The pipeline's steps with the 100% row before the evaluation, and the table before the report."""
    out = []
    for step in pipeline_steps():
        if step.name == "evaluate":
            out.append(Step("supervised_100", "the supervised baseline on 100% of the labels", _supervised_100))
        if step.name == "report":
            out.append(Step("table1", "RUN/table1.md and RUN/table1.parquet", lambda cfg: write_table(run_dir(cfg))))
        out.append(step)
    return out


def run(cfg: Config) -> dict:
    cfg = dataclasses.replace(cfg, pipeline=dataclasses.replace(cfg.pipeline, baselines=stages.BASELINES))
    result = run_steps(cfg, steps())
    return {**result, "table1": str(run_dir(cfg).resolve() / "table1.md")}


def rows(run) -> list[dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    models = {p.parent.name: json.loads(p.read_text()) for p in sorted((run / "models").glob("*/meta.json"))}
    by = {(r["model"], r["test_set"]): r for r in report.rows_at(metrics)}  # Table 1 is per image, as the paper's
    stages = report.stage_entries(run)
    subset, full = report.labels_text(run, stages), report.labels_text(run, stages, "supervised_100")
    delong = {(d["test_set"], frozenset((d["model_a"], d["model_b"]))): d["p"] for d in report.delong_at(metrics)}
    out = []
    for name, labels in ROWS:
        paper = report.PAPER.get(name)
        for column, test_set in enumerate(report.TEST_SETS):
            r = by.get((name, test_set))
            if r is None:
                continue
            out.append({
                "method": name, "labels": full if labels == "100%" else subset, "architecture": models.get(name, {}).get("spec", {}).get(
                    "backbone", "?"), "test_set": test_set, "n": r["n"], "auc": r["auc"], "ci_low": r["auc_ci"][0],
                "ci_high": r["auc_ci"][1], "paper_auc": paper[2 + column] if paper else None,
                "p_vs_student": None if name == REFERENCE else delong.get((test_set, frozenset((name, REFERENCE)))),
            })
    return out


def write_table(run) -> dict:
    table = rows(run)
    tmp = run / f".table1.parquet.tmp-{os.getpid()}"
    pq.write_table(pa.Table.from_pylist(table), tmp)
    os.replace(tmp, run / "table1.parquet")
    atomic_write_text(run / "table1.md", markdown(table))
    return {"stage": "table1", "path": str(run / "table1.md"), "rows": len(table)}


def markdown(table: list[dict]) -> str:
    return report.markdown([("h1", "Table 1 (drray)")] + report.table1_blocks(table) + report.paper_blocks())
