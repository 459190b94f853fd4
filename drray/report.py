"""Report rendering (``drray report RUN``): RUN/report.md and a self-contained RUN/report.html (plots inlined)
from what the stages wrote: RUN/pipeline.json, RUN/metrics.json, RUN/models/*/meta.json, the
stages' metrics.jsonl, RUN/data.json and RUN/config.resolved.yaml. Rebuilding it never reruns
anything.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from drray.artifacts import StageDir, atomic_write_text
from drray.config import Config, run_dir

# The paper's Table 1 (2% = 1,000 EyePACS labels; supervised_100: all of them): (method, architecture, EyePACS test, Messidor-2)
PAPER = {
    "supervised_100": ("Supervised, 100% of the labels", "InceptionV3", 0.96, 0.88),
    "supervised": ("Supervised", "InceptionV3", 0.88, 0.66),
    "mixmatch": ("MixMatch", "ResNet50", 0.85, 0.64),
    "fixmatch": ("FixMatch", "ResNet50", 0.83, 0.79),
    "teacher": ("SimCLR-Finetuned (Teacher)", "ResNet50", 0.92, 0.85),
    "student": ("SimCLR-Distilled (Student)", "DenseNet161", 0.94, 0.89),
}
TEST_SETS = {"eyepacs_test": "EyePACS-style test", "external": "Messidor-2-style external"}


def build(run: str | Path) -> dict:
    """A pipeline run's report, a sweep's, or both where a run directory holds both."""
    run = Path(run)
    pipeline, sweep = (run / "metrics.json").is_file(), (run / "sweep.parquet").is_file()
    if not (pipeline or sweep):
        raise FileNotFoundError(f"{run}: neither metrics.json nor sweep.parquet; run `drray run pipeline` "
                                "(or `drray run evaluate`, or `drray run sweep`) first")
    blocks: list[tuple] = [("h1", f"drray report: {run.resolve().name}"),
                           ("p", f"Run directory `{run.resolve()}`, report written {time.strftime('%Y-%m-%d %H:%M')}.")]
    if pipeline:
        if (run / "table1.parquet").is_file():
            blocks += [("h2", "Table 1 (drray run table1)")] + table1_blocks(pq.read_table(run / "table1.parquet").to_pylist())
        blocks += _blocks(run)
    if sweep:
        blocks += sweep_blocks(run)
    config = run / "config.resolved.yaml"
    if config.is_file():
        blocks += [("h2", "Resolved config"), ("pre", config.read_text())]
    atomic_write_text(run / "report.md", markdown(blocks))
    atomic_write_text(run / "report.html", _html(blocks, run))
    return {"stage": "report", "path": str(run / "report.md"), "html": str(run / "report.html")}


# --- content ---------------------------------------------------------------------------------


def _blocks(run: Path) -> list[tuple]:
    metrics = json.loads((run / "metrics.json").read_text())
    stages = stage_entries(run)
    models = _models(run)
    blocks = _results(metrics, models)
    blocks += _ordering(metrics)
    blocks += _operating_points(metrics)
    blocks += _figures(run, stages)
    blocks += _stage_table(stages)
    blocks += _data(run, stages)
    return blocks


def _models(run: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run / "models").glob("*/meta.json"))}


def labels_text(run: Path, stages: dict[str, dict], stage: str = "teacher") -> str:
    """The labeled subset a stage trained on, as a share of the train split and a count."""
    subset = StageDir(Path(stages.get(stage, {}).get("dir") or "/nonexistent")).subset_file
    count = len(json.loads(subset.read_text())["labeled"]) if subset.is_file() else None
    data = json.loads((run / "data.json").read_text()) if (run / "data.json").is_file() else {}
    train = data.get("eyepacs", {}).get("by_split", {}).get("train")
    if count is None:
        return "?"
    return f"{100 * count / train:.1f}% ({count})" if train else str(count)


def _results(metrics: dict, models: dict) -> list[tuple]:
    by = {(r["model"], r["test_set"]): r for r in metrics["results"]}
    sets = [s for s in TEST_SETS if any(k[1] == s for k in by)]
    names = list(dict.fromkeys(r["model"] for r in metrics["results"]))
    rows = []
    for name in names:
        arch = models.get(name, {}).get("spec", {}).get("backbone", "?")
        cells = [name, arch]
        for s in sets:
            r = by.get((name, s))
            cells.append(f"{r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] (n={r['n']})" if r else "")
        paper = PAPER.get(name)
        cells.append(f"{paper[2]:.2f} / {paper[3]:.2f} ({paper[1]})" if paper else "")
        rows.append(cells)
    header = ["model", "architecture"] + [f"{TEST_SETS[s]} AUC [95% CI]" for s in sets] + ["paper (EyePACS / Messidor-2)"]
    return [("h2", "Results (Table 1 layout)"),
            ("p", "AUC of referable DR on each test set with a percentile bootstrap 95% interval "
                  f"({metrics['bootstrap']['resamples']} resamples, seed {metrics['bootstrap']['seed']}). "
                  "The paper's numbers are at 299 px with the paper's backbones and 1,000 real labels; "
                  "these are at the scale of this run's config."),
            ("table", header, rows)]


def _ordering(metrics: dict) -> list[tuple]:
    """Does the paper's ordering (student >= teacher > supervised) hold here, and how sure is it?"""
    by = {(r["model"], r["test_set"]): r for r in metrics["results"]}
    delong = {(d["test_set"], frozenset((d["model_a"], d["model_b"]))): d for d in metrics["delong"]}
    lines = []
    for s, label in TEST_SETS.items():
        if not all((m, s) in by for m in ("student", "teacher", "supervised")):
            continue
        auc = {m: by[(m, s)]["auc"] for m in ("student", "teacher", "supervised")}
        p_st = delong[(s, frozenset(("student", "teacher")))]["p"]
        p_ts = delong[(s, frozenset(("teacher", "supervised")))]["p"]
        holds = auc["student"] >= auc["teacher"] > auc["supervised"]
        lines.append(f"{label}: student {auc['student']:.3f}, teacher {auc['teacher']:.3f}, supervised "
                     f"{auc['supervised']:.3f}: the ordering {'holds' if holds else 'does NOT hold'} on the point "
                     f"estimates (DeLong p student vs teacher {p_st:.3g}, teacher vs supervised {p_ts:.3g}).")
    if not lines:
        return []
    rows = [[d["test_set"], d["model_a"], d["model_b"], f"{d['auc_a'] - d['auc_b']:+.3f}", f"{d['z']:.2f}",
             f"{d['p']:.3g}"] for d in metrics["delong"] if d["test_set"] != "validation"]
    return [("h2", "The paper's ordering: student >= teacher > supervised"), *[("p", line) for line in lines],
            ("p", "DeLong's test for two correlated AUCs on the same images (two-sided):"),
            ("table", ["test set", "model A", "model B", "AUC A - B", "z", "p"], rows)]


def _operating_points(metrics: dict) -> list[tuple]:
    rows = []
    for r in metrics["results"]:
        if r["test_set"] == "validation":
            continue
        for op in r["operating_points"]:
            rows.append([r["model"], r["test_set"], f"{op['target_sensitivity']:.0%}", f"{op['threshold']:.3f}",
                         f"{op['sensitivity']:.3f}", f"{op['specificity']:.3f}"])
    return [("h2", "Operating points"),
            ("p", "Thresholds chosen on the validation hold-out to reach the target sensitivity, then applied "
                  "unchanged to the test sets."),
            ("table", ["model", "test set", "target sensitivity (validation)", "threshold", "sensitivity",
                       "specificity"], rows)]


def _figures(run: Path, stages: dict[str, dict]) -> list[tuple]:
    from drray.plots import training_figure

    figures = run / "figures"
    figures.mkdir(exist_ok=True)
    evaluation = Path(stages.get("evaluate", {}).get("dir", ""))
    blocks: list[tuple] = [("h2", "Figures")]
    for png in sorted(evaluation.glob("*.png")) if evaluation.is_dir() else []:
        shutil.copyfile(png, figures / png.name)
        blocks.append(("img", f"figures/{png.name}", png.stem.replace("_", " ")))
    training = {}
    for name, entry in stages.items():  # every stage that trained (it logged epochs)
        epochs = [r for r in StageDir(Path(entry.get("dir") or "/nonexistent")).metrics() if "epoch" in r]
        if epochs:
            training[name] = epochs
    if training:
        training_figure(training, figures / "training.png")
        blocks.append(("img", "figures/training.png", "training curves"))
    return blocks


def stage_entries(run: Path) -> dict[str, dict]:
    """Per stage, its record from the latest pipeline invocation that ran it (its real cost)."""
    path = run / "pipeline.json"
    found: dict[str, dict] = {}
    if path.is_file():
        for invocation in json.loads(path.read_text())["invocations"]:
            for entry in invocation["stages"]:
                if entry["status"] == "ran" or entry["stage"] not in found:
                    found[entry["stage"]] = entry
    return found


def _stage_table(stages: dict[str, dict]) -> list[tuple]:
    if not stages:
        return []
    rows = []
    for name, e in stages.items():
        rate = e.get("images_per_s") or _train_rate(e.get("dir"))
        rows.append([name, e["status"], f"{e['seconds']:.0f}", f"{rate:.0f}" if rate else "",
                     e.get("dir") or e.get("path") or ""])
    total = sum(e["seconds"] for e in stages.values() if e["status"] == "ran")
    blocks = [("h2", "Stages"),
              ("p", f"Wall time of the run that computed each stage ({total:.0f} s in all; a skipped stage was "
                    "reused from an earlier invocation). Training stages: mean images/s over their epochs."),
              ("table", ["stage", "status", "wall s", "images/s", "output"], rows)]
    pseudo = stages.get("pseudolabel", {})
    if pseudo.get("images"):
        blocks.append(("p", f"Pseudo-labels: {pseudo['images']} pool images, {pseudo['positives']} labeled referable "
                            f"({100 * pseudo['positives'] / pseudo['images']:.1f}%) by the teacher."))
    return blocks


def _train_rate(stage_dir: str | None) -> float | None:
    if not stage_dir:
        return None
    rates = [r["images_per_s"] for r in StageDir(Path(stage_dir)).metrics() if "images_per_s" in r]
    return sum(rates) / len(rates) if rates else None


def _data(run: Path, stages: dict[str, dict]) -> list[tuple]:
    path = run / "data.json"
    if not path.is_file():
        return []
    rows = []
    for name, c in json.loads(path.read_text()).items():
        splits = ", ".join(f"{k} {v}" for k, v in c["by_split"].items())
        grades = ", ".join(f"{k}: {v}" for k, v in c["by_grade"].items())
        rejected = ", ".join(f"{k} {v}" for k, v in c["rejected_by_reason"].items()) or "none"
        rows.append([name, str(c["inputs"]), str(c["prepared"]), f"{c['rejected']} ({rejected})", splits, grades])
    return [("h2", "Data"), ("p", f"Labeled subset: {labels_text(run, stages)} of the EyePACS-style train split."),
            ("table", ["data set", "inputs", "prepared", "rejected", "splits", "grades"], rows)]


# --- a label-fraction sweep --------------------------------------------------------------------


SWEEP_SCHEMA = pa.schema([
    ("trial", pa.string()), ("fraction", pa.float64()), ("count", pa.int64()), ("seed", pa.int64()),
    ("method", pa.string()), ("test_set", pa.string()), ("auc", pa.float64()), ("ci_low", pa.float64()),
    ("ci_high", pa.float64()), ("n", pa.int64()), ("positives", pa.int64()), ("trial_seconds", pa.float64()),
])


def sweep_summary(rows: list[dict]) -> dict[tuple, dict]:
    """(test set, method, fraction, count) -> mean, sd (n-1; 0 for one seed), per-seed AUCs."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["test_set"], r["method"], r["fraction"], r["count"]), []).append(r["auc"])
    out = {}
    for key, aucs in groups.items():
        mean = sum(aucs) / len(aucs)
        sd = (sum((a - mean) ** 2 for a in aucs) / (len(aucs) - 1)) ** 0.5 if len(aucs) > 1 else 0.0
        out[key] = {"mean": mean, "sd": sd, "aucs": aucs}
    return out


def sweep_blocks(run: Path) -> list[tuple]:
    from drray.plots import sweep_figure

    rows = pq.read_table(run / "sweep.parquet").to_pylist()
    summary = sweep_summary(rows)
    methods = [m for m in ("supervised", "teacher", "student") if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    levels = sorted({(k[2], k[3]) for k in summary})
    seeds = sorted({r["seed"] for r in rows})
    blocks: list[tuple] = [
        ("h2", "Label-fraction sweep"),
        ("p", f"{len({r['trial'] for r in rows})} trials: {len(levels)} label fractions x seeds {seeds}, every "
              "trial from the same SimCLR pretraining. AUC mean +- sd over seeds (n seeds); labeled subsets are "
              "nested across fractions for a seed.")]
    for test_set, title in TEST_SETS.items():
        table = []
        for fraction, count in levels:
            cells = [f"{100 * fraction:.3g}% ({count})"]
            for m in methods:
                s = summary.get((test_set, m, fraction, count))
                cells.append(f"{s['mean']:.3f} +- {s['sd']:.3f} ({len(s['aucs'])})" if s else "")
            table.append(cells)
        if any(any(c for c in row[1:]) for row in table):
            blocks += [("p", f"{title}: AUC mean +- sd (n seeds)"), ("table", ["labels"] + methods, table)]
    panels = {title: {m: [(f, summary[(ts, m, f, c)]["mean"], summary[(ts, m, f, c)]["sd"],
                           summary[(ts, m, f, c)]["aucs"]) for f, c in levels if (ts, m, f, c) in summary]
                      for m in methods}
              for ts, title in TEST_SETS.items() if any(r["test_set"] == ts for r in rows)}
    if panels:
        sweep_figure(panels, run / "figures" / "sweep_auc.png")
        blocks.append(("img", "figures/sweep_auc.png", "test AUC against label fraction"))
    blocks += _sweep_trials(run, rows)
    return blocks


def _sweep_trials(run: Path, rows: list[dict]) -> list[tuple]:
    outcomes = run / "sweep_trials.json"
    if not outcomes.is_file():
        return []
    seconds = {r["trial"]: r["trial_seconds"] for r in rows}
    table = [[o["name"], o["status"], f"{seconds[o['name']]:.0f}" if o["name"] in seconds else "", o["error"] or "",
              f"trials/{o['name']}/"] for o in json.loads(outcomes.read_text())]
    return [("p", "Trials (seconds: the trial's stages, summed over its attempts; a stage its pipeline found "
                  "finished costs ~0):"),
            ("table", ["trial", "status", "seconds", "error", "its run directory"], table)]


def table1_blocks(table: list[dict]) -> list[tuple]:
    """RUN/table1.parquet's rows as the paper's Table 1, and whether its claim holds here: the
    distilled student above every baseline trained on the same labeled subset."""
    sets = [s for s in TEST_SETS if any(r["test_set"] == s for r in table)]
    rows = []
    for name in dict.fromkeys(r["method"] for r in table):
        first = next(r for r in table if r["method"] == name)
        cells = [name, first["labels"], first["architecture"]]
        for s in sets:
            r = next((r for r in table if r["method"] == name and r["test_set"] == s), None)
            paper = f" (paper {r['paper_auc']:.2f})" if r and r["paper_auc"] is not None else ""
            p = f", p={r['p_vs_student']:.2g}" if r and r["p_vs_student"] is not None else ""
            cells.append(f"{r['auc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]{paper}{p}" if r else "")
        rows.append(cells)
    blocks = [("p", "AUC [95% CI] per test set; the paper's AUC in parentheses; p: DeLong's test against the "
                    "distilled student on the same images."),
              ("table", ["method", "labels", "architecture"] + [TEST_SETS[s] for s in sets], rows)]
    for s in sets:
        student = next((r for r in table if r["method"] == "student" and r["test_set"] == s), None)
        others = [r for r in table if r["test_set"] == s and r["method"] not in ("student", "supervised_100")]
        if student is None or not others:
            continue
        below = [r for r in others if r["auc"] >= student["auc"]]
        verdict = "holds" if not below else f"does NOT hold ({', '.join(r['method'] for r in below)} at or above it)"
        gaps = ", ".join(f"{r['method']} {student['auc'] - r['auc']:+.3f} (p={r['p_vs_student']:.2g})" for r in others)
        blocks.append(("p", f"{TEST_SETS[s]}: the student above every method on the same labels {verdict}; "
                            f"student minus each: {gaps}."))
    return blocks


def sweep_markdown(run: Path) -> str:
    return markdown([("h1", f"Label-fraction sweep: {run.resolve().name}")] + sweep_blocks(run))


# --- rendering -------------------------------------------------------------------------------


def markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "table":
            header, rows = args
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                 + ["| " + " | ".join(row) + " |" for row in rows]))
        elif kind == "img":
            out.append(f"![{args[1]}]({args[0]})")
        elif kind == "pre":
            out.append("```yaml\n" + args[0].rstrip() + "\n```")
    return "\n\n".join(out) + "\n"


def _html(blocks: list[tuple], run: Path) -> str:
    esc = html.escape
    body = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{esc(args[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{esc(args[0])}</p>")
        elif kind == "table":
            header, rows = args
            body.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
                        + "</table>")
        elif kind == "img":
            data = base64.b64encode((run / args[0]).read_bytes()).decode()
            body.append(f'<figure><img alt="{esc(args[1])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{esc(args[1])}</figcaption></figure>")
        elif kind == "pre":
            body.append(f"<pre>{esc(args[0])}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:90%}th{background:#f3f3f3}img{max-width:100%}pre{background:#f7f7f7;padding:1em;"
             "overflow:auto;font-size:85%}figure{margin:1em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>drray report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def run(cfg: Config) -> dict:
    """The report stage: the run directory's report, from what the stages wrote."""
    return build(run_dir(cfg))
