"""``drray run table1``: every row of the paper's Table 1 on the same data, labels and evaluation.

    the pipeline with pipeline.baselines = fixmatch, mixmatch  (stages found done are skipped)
    + the supervised baseline on 100% of the labels            -> RUN/models/supervised_100
    -> evaluate (all six models, both test sets) -> RUN/table1.md, RUN/table1.parquet
    -> report (RUN/report.md with the table and whether the paper's claim holds)

One row per method and test set: labels, architecture, AUC with its 95% CI, the paper's AUC,
and DeLong's p of the method against the distilled student (and the teacher) on the same images.

Over several label draws (``table1.seeds``): prepare and pretrain once (they read no labels),
then the rows above for each seed in ``RUN/seeds/seed-<N>/`` (a run of its own, its stage outputs
in the shared stage cache, ``run.stages``, default RUN), then RUN/table1.md / table1.parquet /
report.md over the seeds: mean +- sd per method and test set, every seed's AUC with its CI, and
the paper's ordering judged in every seed. A seed that fails is reported as failed (the others
go on); a rerun skips the seeds that finished with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from drray import report
from drray.artifacts import atomic_write_json, atomic_write_text, write_resolved_config
from drray.config import Config, run_dir, stages_dir
from drray.progress import log_only, say
from jobs import common, stages
from jobs.runner import Invocations, Step, pipeline_steps, run_steps

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
    cfg = stages.with_every_baseline(cfg)
    seeds = cfg.table1.seeds or (cfg.labels.seed,)
    if len(seeds) > 1:
        return run_seeds(cfg, seeds)
    result = run_steps(at_seed(cfg, seeds[0]), steps())
    return {**result, "table1": str(run_dir(cfg).resolve() / "table1.md")}


# --- several label draws ---------------------------------------------------------------------------

SHARED_STAGES = ("prepare", "pretrain")  # once for every seed: they read no labels


def at_seed(cfg: Config, seed: int) -> Config:
    return dataclasses.replace(cfg, labels=dataclasses.replace(cfg.labels, seed=seed))


def seed_dir(cfg: Config, seed: int) -> Path:
    return (run_dir(cfg) / "seeds" / f"seed-{seed}").resolve()


def seed_config(cfg: Config, seed: int) -> Config:
    """The seed's label draw in its own run directory, its stages in the shared stage cache."""
    run = dataclasses.replace(cfg.run, dir=str(seed_dir(cfg, seed)), stages=str(stages_dir(cfg).resolve()))
    return dataclasses.replace(at_seed(cfg, seed), run=run)


def settings_key(cfg: Config, seed: int) -> str:
    """What a seed's rows depend on: every setting but where things live and the list of seeds."""
    return stages.key_of(stages.settings_part(at_seed(cfg, seed), ("run", "table1")), cfg.run.seed)


def finished_seed(cfg: Config, seed: int) -> dict | None:
    """The seed's record if it finished under these settings, else None."""
    path = seed_dir(cfg, seed) / "seed.json"
    record = json.loads(path.read_text()) if path.is_file() else None
    return record if record and record.get("key") == settings_key(cfg, seed) else None


def run_seeds(cfg: Config, seeds: tuple[int, ...]) -> dict:
    out = run_dir(cfg).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg)
    record = Invocations(out / "table1.json")
    say("table1", f"{len(seeds)} label draws (labels.seed {', '.join(map(str, seeds))}) from one pretraining")
    shared = at_seed(cfg, seeds[0])  # the probe of pretrain.monitor_every reads the first draw's labels
    for name in SHARED_STAGES:
        started = time.time()
        record.stage(name, "running", started)
        try:
            result = stages.STAGES[name].function()(shared)
        except BaseException:  # every seed needs it: nothing to go on with
            record.stage(name, "failed", started)
            record.finish("failed")
            raise
        record.stage(name, "skipped" if result.get("skipped") else "ran", started, result)
    outcomes = [run_seed(cfg, seed, record, number, len(seeds)) for number, seed in enumerate(seeds, start=1)]
    atomic_write_json(out / report.TABLE1_SEEDS, outcomes)
    table = write_seeds_table(cfg, outcomes)
    report.build(out)
    failed = [o for o in outcomes if o["status"] == "failed"]
    record.finish("failed" if failed else "complete")
    if failed:
        raise RuntimeError(f"table1: {len(failed)} of {len(seeds)} seeds failed: "
                           + "; ".join(f"seed {o['seed']} ({o['error']})" for o in failed)
                           + f". The others' rows are in {out / 'table1.md'}; the tracebacks in {out / 'drray.log'}; "
                           "rerun the same command to retry the failed seeds (finished ones are kept).")
    return {"run_dir": str(out), "report": str(out / "report.md"), "table1": str(out / "table1.md"), "rows": table}


def run_seed(cfg: Config, seed: int, record: Invocations, number: int, of: int) -> dict:
    """One label draw's Table 1 rows; a failure is recorded and the next seed goes on."""
    name, started = f"seed-{seed}", time.time()
    outcome = {"seed": seed, "dir": str(seed_dir(cfg, seed)), "error": None}
    if finished_seed(cfg, seed) is not None:
        say("table1", f"seed {seed} ({number}/{of}): finished before with these settings, kept")
        record.stage(name, "skipped", started)
        return {**outcome, "status": "finished", "ran": False}
    say("table1", f"seed {seed} ({number}/{of}): the Table 1 rows in {outcome['dir']}")
    record.stage(name, "running", started)
    try:
        run_steps(seed_config(cfg, seed), steps())
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a SLURM job requeueing itself
        record.stage(name, "interrupted", started)
        raise
    except Exception as exc:  # noqa: BLE001 - one seed's failure must not cost the others
        error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        log_only(f"table1: seed {seed} failed", exc_info=exc)
        say("table1", f"seed {seed} failed: {error}")
        record.stage(name, "failed", started)
        return {**outcome, "status": "failed", "error": error, "ran": True}
    atomic_write_json(seed_dir(cfg, seed) / "seed.json", {"seed": seed, "key": settings_key(cfg, seed),
                                                           "finished": time.time()})
    record.stage(name, "ran", started, {"dir": outcome["dir"]})
    return {**outcome, "status": "finished", "ran": True}


def write_seeds_table(cfg: Config, outcomes: list[dict]) -> int:
    """RUN/table1.parquet: every finished seed's rows (a ``seed`` column); RUN/table1.md over them."""
    out = run_dir(cfg).resolve()
    table = [r for o in outcomes if o["status"] == "finished"
             for r in pq.read_table(Path(o["dir"]) / "table1.parquet").to_pylist()]
    _write_parquet(out, table)
    atomic_write_text(out / "table1.md", report.markdown(
        [("h1", "Table 1 (drray), over label draws")] + report.table1_seeds_blocks(table, outcomes)
        + report.paper_blocks()))
    return len(table)


def _write_parquet(out: Path, table: list[dict]) -> None:
    tmp = out / f".table1.parquet.tmp-{os.getpid()}"
    pq.write_table(pa.Table.from_pylist(table, schema=report.TABLE1_SCHEMA), tmp)
    os.replace(tmp, out / "table1.parquet")


def rows(run) -> list[dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    models = {p.parent.name: json.loads(p.read_text()) for p in sorted((run / "models").glob("*/meta.json"))}
    by = {(r["model"], r["test_set"]): r for r in report.rows_at(metrics)}  # Table 1 is per image, as the paper's
    stages = report.stage_entries(run)
    subset, full = report.labels_text(run, stages), report.labels_text(run, stages, "supervised_100")
    delong = {(d["test_set"], frozenset((d["model_a"], d["model_b"]))): d["p"] for d in report.delong_at(metrics)}
    seed = report.run_config(run).get("labels", {}).get("seed")
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
                "p_vs_teacher": None if name == "teacher" else delong.get((test_set, frozenset((name, "teacher")))),
                "seed": seed,
            })
    return out


def write_table(run) -> dict:
    table = rows(run)
    _write_parquet(run, table)
    atomic_write_text(run / "table1.md", markdown(table))
    return {"stage": "table1", "path": str(run / "table1.md"), "rows": len(table)}


def markdown(table: list[dict]) -> str:
    return report.markdown([("h1", "Table 1 (drray)")] + report.table1_blocks(table) + report.paper_blocks())
