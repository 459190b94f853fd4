"""Report rendering (``drray report RUN``): RUN/report.md and a self-contained RUN/report.html (plots inlined)
from what the stages wrote: RUN/pipeline.json, RUN/metrics.json, RUN/models/*/meta.json, the
stages' metrics.jsonl, RUN/data.json (and the prepared sets' manifests) and
RUN/config.resolved.yaml. Rebuilding it never reruns anything.

It is written not to mislead: it says when the data are synthetic, keeps the paper's numbers in
a table of their own, judges every claim with DeLong's test rather than the point estimates,
gives every proportion its counts and interval, and marks the epoch whose model was evaluated.
Its screening summary is per patient (the worse eye), with the headings a STARD-AI / TRIPOD+AI
reader looks for: data sources, reference standard, operating point, missing and ungradable data.
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
import yaml

from drray.artifacts import RESOLVED_CONFIG, StageDir, atomic_write_text, read_mark
from drray.config import Config, run_dir
from drray.metrics import NO_REFERENCE, NOT_AN_INPUT, NOT_GRADABLE, OUT_OF_FOLD

# The paper's Table 1 (2% = 1,000 EyePACS labels; supervised_100: all of them): (method, architecture, EyePACS test, Messidor-2)
PAPER = {
    "supervised_100": ("Supervised, 100% of the labels", "InceptionV3", 0.96, 0.88),
    "supervised": ("Supervised", "InceptionV3", 0.88, 0.66),
    "mixmatch": ("MixMatch", "ResNet50", 0.85, 0.64),
    "fixmatch": ("FixMatch", "ResNet50", 0.83, 0.79),
    "teacher": ("SimCLR-Finetuned (Teacher)", "ResNet50", 0.92, 0.85),
    "student": ("SimCLR-Distilled (Student)", "DenseNet161", 0.94, 0.89),
}
PAPER_TITLE = "Paper (real EyePACS/Messidor-2, 299 px), for reference, not reproduced by this run"
TEST_SETS = {"eyepacs_test": "EyePACS-style test", "external": "Messidor-2-style external"}
DATA_OF = {"eyepacs_test": "eyepacs", "external": "external"}  # the data set a test set is drawn from
# The reference standard's positive class (data.positive), in words.
POSITIVE = {"referable": "referable DR, ICDR grade >= 2 (moderate non-proliferative DR or worse)",
            "any_dr": "any DR, ICDR grade >= 1",
            "referable_dme": "referable DR or diabetic macular oedema: ICDR grade >= 2, or a graded DME risk >= 1"}
ALPHA = 0.05  # DeLong p below which a difference between two AUCs counts as shown
# The paper's ordering, student >= teacher > supervised, as the pairwise claims it is made of.
ORDERING = (("student", ">=", "teacher"), ("teacher", ">", "supervised"))
# What the mark of a folder `drray synth` wrote says (drray.data.synthetic.write_dataset).
SYNTHETIC_MARK = "synthetic-data folder"
# Steps a config can leave out: the key that turns each on (the runner records "not configured").
CONFIGURED_BY = {"baselines": ("pipeline.baselines", "set pipeline.baselines, e.g. [fixmatch, mixmatch]"),
                 "oof": ("oof.folds", "set oof.folds, e.g. 5, with labels.validation 0")}


def build(run: str | Path) -> dict:
    """A pipeline run's report, a sweep's, or both where a run directory holds both."""
    run = Path(run)
    pipeline, sweep = (run / "metrics.json").is_file(), (run / "sweep.parquet").is_file()
    seeds = table1_over_seeds(run)
    if not (pipeline or sweep or seeds):
        raise FileNotFoundError(f"{run}: neither metrics.json nor sweep.parquet; run `drray run pipeline` "
                                "(or `drray run evaluate`, or `drray run sweep`) first")
    blocks: list[tuple] = [("h1", f"drray report: {run.resolve().name}"),
                           ("p", f"Run directory `{run.resolve()}`, report written {time.strftime('%Y-%m-%d %H:%M')}.")]
    sets = data_sets(run)
    blocks += synthetic_notice(sets)
    if seeds is not None:  # each seed's own report has its pipeline's sections
        blocks += [("h2", "Table 1 over label draws (drray run table1)")] + table1_seeds_blocks(*seeds) + paper_blocks()
    elif pipeline:
        if (run / "table1.parquet").is_file():
            blocks += [("h2", "Table 1 (drray run table1)")] + table1_blocks(pq.read_table(run / "table1.parquet").to_pylist())
        blocks += _blocks(run, sets)
    if sweep:
        blocks += sweep_blocks(run)
    config = run / RESOLVED_CONFIG
    if config.is_file():
        blocks += [("h2", "Resolved config"), ("pre", config.read_text())]
    atomic_write_text(run / "report.md", markdown(blocks))
    atomic_write_text(run / "report.html", _html(blocks, run))
    return {"stage": "report", "path": str(run / "report.md"), "html": str(run / "report.html")}


# --- where the data came from ---------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_config(run: Path) -> dict:
    """RUN/config.resolved.yaml as plain data ({} without one): read, not validated, so that a
    report of a run made by an older drray still builds."""
    path = run / RESOLVED_CONFIG
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def data_sets(run: Path) -> dict[str, dict]:
    """Per data set of the run: its source format, whether its images are synthetic, its
    prepared image size and its images folder, from its manifest and the resolved config."""
    data = run_config(run).get("data") or {}
    summary = _read_json(run / "data.json")
    out = {}
    for name in list(summary) or [n for n in ("eyepacs", "external") if data.get(n)]:
        ds = data.get(name) or {}
        prepared = summary.get(name, {}).get("prepared_dir") or ds.get("prepared")
        manifest = _read_json(Path(prepared) / "manifest.json") if prepared else {}
        images = manifest.get("images") or ds.get("images")
        source = [s for s in (manifest.get("source"), ds.get("source")) if s and s != "synthetic"]
        out[name] = {"source": source[0] if source else "?",  # the layout: eyepacs, messidor2, folder
                     "synthetic": _synthetic(manifest, images, ds), "images": images,
                     "size": manifest.get("params", {}).get("size") or data.get("size"),
                     "label_files": [f["path"] for f in manifest.get("label_files", [])]}
    return out


def _synthetic(manifest: dict, images: str | None, ds: dict) -> bool:
    """Synthetic: its manifest says so, or its images folder carries the mark `drray synth`
    leaves. A folder not at hand (the report built elsewhere) is judged by the config: a
    data.<name>.synthetic section generates the images wherever the folder is missing."""
    if manifest.get("source") == "synthetic":
        return True
    if images and Path(images).is_dir():
        return (read_mark(images) or {}).get("what") == SYNTHETIC_MARK
    return bool(ds.get("synthetic"))


def synthetic_notice(sets: dict[str, dict]) -> list[tuple]:
    synthetic = [f"{name} at {s['size']} px" for name, s in sets.items() if s["synthetic"]]
    if not synthetic:
        return []
    which = "Every data set of this run is synthetic" if len(synthetic) == len(sets) else "Synthetic data sets"
    return [("note", "Synthetic data.",
             f"{which} ({'; '.join(synthetic)}): drray's generated fundus images (`drray synth`), not "
             "photographs of patients' eyes. The numbers show that the pipeline runs and learns; they say "
             "nothing about screening real eyes and are not comparable with the paper's (real EyePACS and "
             "Messidor-2 at 299 px).")]


def _scale(sets: dict[str, dict]) -> str:
    return "; ".join(f"{name}: {'synthetic' if s['synthetic'] else s['source']} images at {s['size']} px"
                     for name, s in sets.items()) or "data sets not recorded"


# --- content ---------------------------------------------------------------------------------


def _blocks(run: Path, sets: dict[str, dict]) -> list[tuple]:
    metrics = json.loads((run / "metrics.json").read_text())
    stages = stage_entries(run)
    models = _models(run)
    blocks = _results(run, metrics, models, stages, sets)
    blocks += paper_blocks()
    blocks += _ordering(metrics)
    blocks += _operating_points(metrics, stages)
    blocks += screening_blocks(run, metrics, stages, sets)
    blocks += _figures(run, stages, metrics, models)
    blocks += _stage_table(stages, run_config(run))
    blocks += _data(run, stages, sets)
    return blocks


def _models(run: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run / "models").glob("*/meta.json"))}


def labels_text(run: Path, stages: dict[str, dict], stage: str = "teacher") -> str:
    """The labels a stage spent (train + validation: the budget), as a share of the train split."""
    return _labels_in(run, stages.get(stage, {}).get("dir"))


def _labels_in(run: Path, stage_dir: str | Path | None) -> str:
    subset = StageDir(Path(stage_dir or "/nonexistent")).subset_file
    if not subset.is_file():
        return "?"
    parts = json.loads(subset.read_text())
    fit, held = len(parts["labeled"]), len(parts.get("validation", []))
    train = _read_json(run / "data.json").get("eyepacs", {}).get("by_split", {}).get("train")
    used = f"{fit + held} = {fit} train + {held} validation"
    return f"{100 * (fit + held) / train:.1f}% ({used})" if train else used


def _trained_in(name: str, models: dict, stages: dict[str, dict]) -> str | None:
    """The stage directory a published model came from (its meta.json names the folder)."""
    source = models.get(name, {}).get("source")
    return str(Path(source).parent) if source else stages.get(name, {}).get("dir")


def model_labels(run: Path, name: str, models: dict, stages: dict[str, dict]) -> str:
    """The labels a model was trained with, and what else it learnt from."""
    text = _labels_in(run, _trained_in(name, models, stages))
    pool = stages.get("pseudolabel", {}).get("images")
    if name == "student":
        text += f" + the teacher's pseudo-labels on {pool or 'the'} pool images"
    elif name in ("fixmatch", "mixmatch"):
        text += " + the unlabeled pool"
    return text


def rows_at(metrics: dict, unit: str = "image") -> list[dict]:
    """metrics.json's result rows at one unit (image, or patient: the worse eye). Rows an older
    drray wrote have no unit: they are image rows."""
    return [r for r in metrics["results"] if r.get("unit", "image") == unit]


def delong_at(metrics: dict, unit: str = "image") -> list[dict]:
    """metrics.json's DeLong rows at one unit (older rows: images)."""
    return [d for d in metrics["delong"] if d.get("unit", "image") == unit]


def _bootstrap_text(metrics: dict) -> str:
    b = metrics["bootstrap"]
    what = "patients (each with all its images)" if b.get("resampled") == "patients" else "images"
    return f"percentile bootstrap 95% interval resampling {what} ({b['resamples']} resamples, seed {b['seed']})"


def _results(run: Path, metrics: dict, models: dict, stages: dict[str, dict], sets: dict[str, dict]) -> list[tuple]:
    by = {(r["model"], r["test_set"]): r for r in rows_at(metrics)}
    tests = [s for s in TEST_SETS if any(k[1] == s for k in by)]
    rows = []
    for name in dict.fromkeys(r["model"] for r in rows_at(metrics)):
        cells = [name, models.get(name, {}).get("spec", {}).get("backbone", "?"), model_labels(run, name, models, stages)]
        for s in tests:
            r = by.get((name, s))
            cells.append(f"{r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}] "
                         f"(n={r['n']}, {r.get('positives', '?')} referable)" if r else "")
        rows.append(cells)
    header = ["model", "architecture", "labels used"] + [f"{TEST_SETS[s]}: AUC [95% CI] (images, referable)" for s in tests]
    return [("h2", "Results (Table 1 layout)"),
            ("p", f"AUC of referable DR on each test set's images with a {_bootstrap_text(metrics)}, and the "
                  "test set's images and referable (positive) images. Labels used: the labeled train images the "
                  f"model's stage trained on, as a share of the train split. This run: {_scale(sets)}. "
                  "The paper's numbers are in the next table, not here: other data, image size and backbones."),
            ("table", header, rows)]


def paper_blocks() -> list[tuple]:
    rows = [[method, arch, "100%" if name == "supervised_100" else "2% (1,000)", f"{eyepacs:.2f}", f"{messidor:.2f}"]
            for name, (method, arch, eyepacs, messidor) in PAPER.items()]
    return [("h2", PAPER_TITLE),
            ("p", "The AUCs the paper reports on the real EyePACS test set and on Messidor-2, at 299 px with its "
                  "own backbones and 2% (1,000) of the EyePACS labels. This run did not compute them: they are the "
                  "target a run on the real data sets at the paper's scale (configs/paper.yaml) is compared with."),
            ("table", ["method", "architecture", "EyePACS labels", "EyePACS test AUC", "Messidor-2 AUC"], rows)]


def verdict(difference: float, p: float) -> str:
    """A claim "A above B" judged by DeLong's test of the two AUCs, not by the point estimates."""
    if p >= ALPHA:
        return "not distinguishable"
    return "holds" if difference > 0 else "does not hold"


def combined(verdicts: list[str]) -> str:
    """Several claims at once: any that fails fails them all; all must hold for them to hold."""
    if "does not hold" in verdicts:
        return "does not hold"
    return "holds" if all(v == "holds" for v in verdicts) else "not distinguishable"


RULE = (f"Each claim is judged by DeLong's test of the two AUCs on the same images, never by the point "
        f"estimates alone: it holds when the first model's AUC is the higher and p < {ALPHA}; it is not "
        f"distinguishable when p >= {ALPHA} (these images cannot tell the two models apart, whichever AUC is "
        f"higher); it does not hold when the second model's AUC is the higher and p < {ALPHA}. The ordering holds "
        "on a test set only when both of its claims hold.")


def _ordering(metrics: dict) -> list[tuple]:
    """Does the paper's ordering (student >= teacher > supervised) hold here, and how sure is it?"""
    by = {(r["model"], r["test_set"]): r for r in rows_at(metrics)}
    delong = {(d["test_set"], frozenset((d["model_a"], d["model_b"]))): d for d in delong_at(metrics)}
    rows, lines = [], []
    for s, label in TEST_SETS.items():
        if not all((m, s) in by and (s, frozenset((m, n))) in delong for m, _, n in ORDERING):
            continue
        verdicts = []
        for a, claim, b in ORDERING:
            difference, p = by[(a, s)]["auc"] - by[(b, s)]["auc"], delong[(s, frozenset((a, b)))]["p"]
            verdicts.append(verdict(difference, p))
            rows.append([label, f"{a} {claim} {b}", _auc(by[(a, s)]), _auc(by[(b, s)]), f"{difference:+.3f}",
                         f"{p:.3g}", verdicts[-1]])
        overall = combined(verdicts)
        lines.append(f"{label}: the ordering {'is ' if overall == 'not distinguishable' else ''}{overall} ("
                     + "; ".join(f"{a} {claim} {b}: {v}" for (a, claim, b), v in zip(ORDERING, verdicts, strict=True))
                     + ").")
    if not lines:
        return []
    delong_rows = [[d["test_set"], d.get("unit", "image"), d["model_a"], d["model_b"], f"{d['auc_a'] - d['auc_b']:+.3f}",
                    f"{d['z']:.2f}", f"{d['p']:.3g}"] for d in metrics["delong"] if d["test_set"] != "validation"]
    return [("h2", "The paper's ordering: student >= teacher > supervised"), ("p", RULE),
            ("table", ["test set", "claim", "AUC A [95% CI]", "AUC B [95% CI]", "A - B", "DeLong p", "verdict"], rows),
            *[("p", line) for line in lines],
            ("p", "DeLong's test for two correlated AUCs on the same images (two-sided), every pair, per image and per "
                  "patient (worse eye). Its variance is taken over patients (Obuchowski's clustered form: a patient's "
                  "eyes are not two independent images); the ordering above is judged per image, as the paper's:"),
            ("table", ["test set", "unit", "model A", "model B", "AUC A - B", "z", "p"], delong_rows)]


def _auc(r: dict) -> str:
    return f"{r['auc']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]"


def _operating_points(metrics: dict, stages: dict[str, dict]) -> list[tuple]:
    rows = []
    for r in rows_at(metrics):
        if r["test_set"] == "validation":
            continue
        for op in r["operating_points"]:
            rows.append([r["model"], r["test_set"], f"{op['target_sensitivity']:.0%}", f"{op['threshold']:.3f}",
                         _proportion(op, "sensitivity", "tp", "fn"), _proportion(op, "specificity", "tn", "fp"),
                         _proportion(op, "ppv", "tp", "fp"), _proportion(op, "npv", "tn", "fn")])
    blocks = [("h2", "Operating points"),
              ("p", "Thresholds chosen on the validation hold-out to reach the target sensitivity, then applied "
                    "unchanged to the test sets. Per image: sensitivity: referable images flagged / referable images; "
                    "specificity: non-referable images passed / non-referable images; PPV: referable among the flagged; "
                    "NPV: non-referable among the passed; each with its counts and a 95% Wilson score interval (a test "
                    "set's few referable images make the sensitivity's wide), widened by the design effect over patients "
                    "where a patient's two eyes agree. Per patient: the screening summary."),
              ("table", ["model", "test set", "target sensitivity (validation)", "threshold",
                         "sensitivity (count) [95% CI]", "specificity (count) [95% CI]", "PPV (count) [95% CI]",
                         "NPV (count) [95% CI]"], rows)]
    if any("tp" not in op for r in metrics["results"] for op in r["operating_points"]):
        where = stages.get("evaluate", {}).get("dir") or "RUN/evaluate-<key>"
        blocks.append(("p", f"This evaluation ({where}) was made before drray recorded the counts: remove that "
                            "folder and run `drray run evaluate` with the same config to add them."))
    return blocks


def _proportion(op: dict, name: str, hit: str, miss: str) -> str:
    if name not in op:  # PPV and NPV: not recorded before
        return "not recorded"
    if hit not in op:
        return f"{op[name]:.3f} (counts not recorded)"
    if op[name] is None:  # a PPV with nothing flagged
        return f"none ({op[hit]}/{op[hit] + op[miss]})"
    lo, hi = op[f"{name}_ci"]
    return f"{op[name]:.3f} ({op[hit]}/{op[hit] + op[miss]}) [{lo:.3f}, {hi:.3f}]"


# --- the screening summary (per patient) ---------------------------------------------------------


SCREENING = "Screening summary (per patient)"


def screening_blocks(run: Path, metrics: dict, stages: dict[str, dict], sets: dict[str, dict]) -> list[tuple]:
    """Per test set, the numbers a screening study reports per patient, its reliability diagram
    and imageability; then data sources, reference standard, operating point and missing data."""
    patients = rows_at(metrics, "patient")
    if not patients:
        where = stages.get("evaluate", {}).get("dir") or "RUN/evaluate-<key>"
        return [("h2", SCREENING), ("p", f"This evaluation ({where}) was made before drray recorded per-patient "
                                         "results: remove that folder and run `drray run evaluate` to add them.")]
    evaluation = Path(stages.get("evaluate", {}).get("dir") or "/nonexistent")
    blocks: list[tuple] = [("h2", SCREENING), ("p", _screening_intro(metrics))]
    for test_set, label in TEST_SETS.items():
        rows = [r for r in patients if r["test_set"] == test_set]
        if not rows:
            continue
        header, table = screening_table(rows, metrics)
        blocks += [("h3", label), ("table", header, table)]
        if test_set in metrics.get("imageability", {}):
            blocks.append(("p", imageability_text(metrics["imageability"][test_set])))
        if (evaluation / f"reliability_{test_set}.png").is_file():  # copied to figures/ with the others
            blocks.append(("img", f"figures/reliability_{test_set}.png", f"reliability {test_set}".replace("_", " "),
                           f"Reliability diagrams on the {label} set, per image (left) and per patient (right, the "
                           f"worse eye's probability): observed share referable against mean predicted probability in "
                           f"{metrics.get('calibration_bins', 10)} equal-width bins, a marker's area its bin's share; "
                           "the dotted diagonal is perfect calibration."))
    return blocks + _stard_blocks(run, metrics, sets)


def _screening_intro(metrics: dict) -> str:
    prevalence = metrics.get("prevalence")
    at = (f" PPV and NPV are also given at a prevalence of {prevalence:.1%} (evaluate.prevalence), by Bayes' rule "
          "from the sensitivity and specificity." if prevalence is not None else "")
    return ("One row per model: the test set's patients, each judged by its worse eye (its highest probability; "
            "positive when any of its images is). AUC with a " + _bootstrap_text(metrics) + "; sensitivity, "
            "specificity, PPV and NPV at the stored operating point, with patient counts and 95% Wilson intervals; "
            "Brier score (mean squared error of the probability) and expected calibration error (ECE, "
            f"{metrics.get('calibration_bins', 10)} equal-width bins). The worse eye's probability is a score, not a "
            "calibrated probability that the patient is referable: its Brier score and ECE say how far it is from "
            "one." + at)


def stored_point(row: dict, metrics: dict) -> dict | None:
    """The row's operating point at the sensitivity stored with the model (for drray predict);
    None when no validation image fixed one (labels.validation 0)."""
    if not row["operating_points"]:
        return None
    target = metrics.get("operating_points", {}).get(row["model"], {}).get("target_sensitivity")
    return next((op for op in row["operating_points"] if op["target_sensitivity"] == target), row["operating_points"][0])


NO_POINT = "none: no validation images or out-of-fold predictions fixed one"


def screening_table(rows: list[dict], metrics: dict) -> tuple[list[str], list[list[str]]]:
    at = metrics.get("prevalence") is not None
    header = ["model", "patients (referable)", "AUC [95% CI]", "operating point", "sensitivity (count) [95% CI]",
              "specificity (count) [95% CI]", "PPV (count) [95% CI]", "NPV (count) [95% CI]"]
    header += [f"PPV at {metrics['prevalence']:.1%} [95% CI]", f"NPV at {metrics['prevalence']:.1%} [95% CI]"] if at else []
    table = []
    for r in rows:
        op = stored_point(r, metrics)
        if op is None:
            table.append([r["model"], f"{r['n']} ({r['positives']})", _auc(r), NO_POINT,
                          *[""] * (len(header) - 4), f"{r['brier']:.3f}", f"{r['ece']:.3f}"])
            continue
        cells = [r["model"], f"{r['n']} ({r['positives']})", _auc(r), f"{op.get('name', op['target_sensitivity'])} "
                 f"(threshold {op['threshold']:.3f})", _proportion(op, "sensitivity", "tp", "fn"),
                 _proportion(op, "specificity", "tn", "fp"), _proportion(op, "ppv", "tp", "fp"),
                 _proportion(op, "npv", "tn", "fn")]
        if at:
            cells += [_interval(op["ppv_at_prevalence"], op["ppv_at_prevalence_ci"]),
                      _interval(op["npv_at_prevalence"], op["npv_at_prevalence_ci"])]
        table.append(cells + [f"{r['brier']:.3f}", f"{r['ece']:.3f}"])
    return header + ["Brier", "ECE"], table


def _interval(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _counts(by_kind: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in by_kind.items()) or "none"


def imageability_text(i: dict) -> str:
    share = _interval(i["imageability"], i["imageability_ci"]) if i["imageability"] is not None else "none"
    return (f"Imageability: {share} ({i['prepared']} of {i['prepared'] + i['not_gradable']} input photographs graded "
            f"by the system; {i['scope']}). Not gradable: {_counts(i['not_gradable_by_kind'])}. Left out of it: not an "
            f"input: {_counts(i['not_an_input'])}; no reference standard: {_counts(i['no_reference'])}. Prepared but "
            f"without a grade (not evaluated): {i['ungraded']}.")


def _stard_blocks(run: Path, metrics: dict, sets: dict[str, dict]) -> list[tuple]:
    config = run_config(run)
    positive = (config.get("data") or {}).get("positive", "referable")
    sources = []
    for test_set, label in TEST_SETS.items():
        image_rows = [r for r in rows_at(metrics) if r["test_set"] == test_set]
        if not image_rows:
            continue
        name, s = DATA_OF[test_set], sets.get(DATA_OF[test_set])
        split = "its test split" if test_set == "eyepacs_test" else "all of it"
        where = "not recorded (no data.json entry)"
        if s:
            kind = "synthetic images (`drray synth`)" if s["synthetic"] else f"{s['source']} photographs"
            labels = ", ".join(f"`{f}`" for f in s.get("label_files", [])) or "label files not recorded"
            where = f"{kind} in `{s['images']}` at {s['size']} px, grades from {labels}"
        sources.append(f"{label}: the {name} data set, {split}: {image_rows[0]['n']} graded images of "
                       f"{image_rows[0].get('patients', '?')} patients. Source: {where}.")
    points = metrics.get("operating_points", {})
    chosen = "; ".join(f"{m} {p['threshold']:.3f}" for m, p in points.items())
    first = next(iter(points.values()), {})
    return [
        ("h3", "Data sources"), *[("p", line) for line in sources],
        ("h3", "Reference standard"),
        ("p", f"Each image's DR grade (ICDR scale 0-4) as its data set's label files give it, not re-graded here. "
              f"Positive: {POSITIVE.get(positive, positive)} (data.positive: {positive}). A patient is positive when "
              "any of its evaluated images is; images without a grade are not evaluated."),
        ("h3", "Operating point choice"),
        ("p", _choice_text(first) + f"{first.get('target_sensitivity', 0):.0%} (evaluate.operating_sensitivity), "
              "then applied unchanged to every test set and stored with each model for `drray predict`. A patient "
              f"is flagged when any of its images is. Thresholds: {chosen or 'none fixed'}."),
        ("h3", "Missing and ungradable data"), ("p", MISSING_RULE),
    ]


def _choice_text(point: dict) -> str:
    """Where the thresholds were chosen, the start of the report's sentence."""
    n = point.get("validation_images", "?")
    if point.get("chosen_on") == OUT_OF_FOLD:
        return (f"Chosen before testing, on out-of-fold predictions ({n} images: the whole label budget, "
                "labels.validation 0): each model trained again once per fold (oof.folds) on the budget less one "
                "fold of whole patients, each image predicted by the model that did not see its label; the highest "
                "threshold whose sensitivity on those predictions reaches ")
    return (f"Chosen before testing, on the validation hold-out ({n} images of the EyePACS-style train split, none "
            "of them in a test set): the highest threshold whose sensitivity on the validation images reaches ")


MISSING_RULE = ("Counts from each prepared set's manifest and rejects (drray prepare). Imageability counts against "
                "the system every input photograph it could not grade: " + ", ".join(sorted(NOT_GRADABLE)) + ", and "
                "any reject kind not named here. Not an input: " + ", ".join(sorted(NOT_AN_INPUT)) + "; no reference "
                "standard (its labels are unusable, so the image was not prepared): " + ", ".join(sorted(NO_REFERENCE))
                + ". Both are left out of imageability; the Data table gives every reject kind of every data set. "
                "Prepared images without a grade are graded by the system but have no reference: not evaluated.")


def _figures(run: Path, stages: dict[str, dict], metrics: dict, models: dict) -> list[tuple]:
    from drray.plots import training_figure

    figures = run / "figures"
    figures.mkdir(exist_ok=True)
    evaluation = Path(stages.get("evaluate", {}).get("dir", ""))
    blocks: list[tuple] = [("h2", "Figures")]
    for png in sorted(evaluation.glob("*.png")) if evaluation.is_dir() else []:
        shutil.copyfile(png, figures / png.name)
        if not png.stem.startswith("reliability_"):  # shown in the screening summary
            blocks.append(("img", f"figures/{png.name}", png.stem.replace("_", " "),
                           _evaluation_caption(png.stem, metrics)))
    training, published, monitors = {}, {}, {}
    for name, entry in stages.items():  # every stage that trained (it logged epochs)
        records = StageDir(Path(entry.get("dir") or "/nonexistent")).metrics()
        if epochs := [r for r in records if "epoch" in r]:
            training[name] = epochs
            if probes := [r for r in records if r.get("event") == "monitor"]:
                monitors[name] = probes[-1]
            if (handed := handed_on(Path(entry["dir"]), models, records)) is not None:
                published[name] = handed
    if training:
        training_figure(training, figures / "training.png", {n: epoch for n, (epoch, _) in published.items()})
        marks = "; ".join(f"{n} epoch {epoch + 1} ({why})" for n, (epoch, why) in published.items())
        blocks.append(("img", "figures/training.png", "training curves",
                       "Training loss (left, log scale) and validation AUC (right) per epoch of every training stage. "
                       + knn_text(training, monitors) + "Rings and dotted lines mark the epoch whose model each stage handed on "
                       f"(what was published and evaluated, or what the next stage started from): "
                       f"{marks or 'none recorded'}."))
    return blocks


def knn_text(training: dict[str, list[dict]], monitors: dict[str, dict] | None = None) -> str:
    """The caption's words for the SimCLR kNN monitor (pretrain.monitor_every), where it ran;
    ``monitors``: stage -> its metrics.jsonl "monitor" record (the probe's images)."""
    probed = {name: [(r["epoch"] + 1, r["knn_auc"]) for r in records if r.get("knn_auc") is not None]
              for name, records in training.items()}
    probed = {name: points for name, points in probed.items() if points}
    if not probed:
        return ("The SimCLR features were not probed (pretrain.monitor_every 0): set it to see whether pretraining "
                "improves them. ") if "pretrain" in training else ""
    def images(name: str) -> str:
        m = (monitors or {}).get(name)
        if not m:
            return ""
        return (f", {m['labeled']} labeled images voting on {m['validation']} of labels.seed "
                f"{(m.get('labels') or {}).get('seed', '?')}, the draw of the run that trained it")

    series = "; ".join(f"{name}: " + ", ".join(f"epoch {e} {auc:.3f}" for e, auc in points) + images(name)
                       for name, points in probed.items())
    return ("Dashed with squares (right): the kNN probe AUC of the SimCLR backbone's features "
            "(pretrain.monitor_every): the label budget's training images vote, by cosine similarity, on its "
            "validation images; nothing is trained on them, so it shows whether pretraining makes the features "
            f"more useful, not how a fine-tuned model scores ({series}). ")


def handed_on(stage_dir: Path, models: dict, records: list[dict]) -> tuple[int, str] | None:
    """The epoch (0-based) of the model a training stage handed on, and why that one.
    RUN/models/<name>/meta.json names the folder it was published from: best/ (the best epoch by
    validation AUC) or model/ (the last epoch: no validation, or a method that publishes its last
    weights). A stage that publishes nothing hands its model/ (the last epoch) to the next stage."""
    stopped = " after stopping early" if any(r.get("event") == "stopped_early" for r in records) else ""
    for name, meta in models.items():
        source = Path(meta.get("source") or "/nonexistent")
        if source.parent == stage_dir and "epoch" in meta:
            why = "best validation AUC" if source.name == StageDir(stage_dir).best.name else f"the last epoch{stopped}"
            return meta["epoch"], f"{why}; published as RUN/models/{name}"
    last = _read_json(StageDir(stage_dir).model / "meta.json")
    return (last["epoch"], f"the last epoch{stopped}; handed to the next stage") if "epoch" in last else None


def _evaluation_caption(stem: str, metrics: dict) -> str:
    test_set = stem.removeprefix("roc_")
    r = next((r for r in rows_at(metrics) if r["test_set"] == test_set), None)
    if stem.startswith("roc_") and r is not None:
        return (f"ROC curves on the {TEST_SETS.get(test_set, test_set)} set ({r['n']} images, "
                f"{r.get('positives', '?')} referable), every model overlaid; the legend gives each AUC with its "
                "95% bootstrap CI, the dotted diagonal is chance.")
    if stem.startswith("reliability_"):
        return f"Reliability diagrams on the {TEST_SETS.get(stem.removeprefix('reliability_'), stem)} set."
    if stem == "tsne":
        return ("t-SNE of each model's penultimate-layer features on a sample of the external set (the EyePACS-style "
                "test split without one): blue non-referable, red referable. A picture, not a measure: distances "
                "in a t-SNE map are not to scale.")
    return stem.replace("_", " ")


def stage_entries(run: Path) -> dict[str, dict]:
    """Per stage, its latest record in RUN/pipeline.json, with ``latest`` (from the last
    invocation) and ``invocation`` (that invocation's status). A later "skipped" of the same
    output keeps the record of the invocation that ran it: its real cost."""
    path = run / "pipeline.json"
    found: dict[str, dict] = {}
    invocations = json.loads(path.read_text())["invocations"] if path.is_file() else []
    for number, invocation in enumerate(invocations, start=1):
        for entry in invocation["stages"]:
            entry = {**entry, "latest": number == len(invocations), "invocation": invocation["status"]}
            before = found.get(entry["stage"])
            if not (before is not None and before["status"] == "ran" and entry["status"] == "skipped"
                    and before.get("dir") == entry.get("dir")):
                found[entry["stage"]] = entry
    return found


def stage_status(name: str, entry: dict, config: dict) -> str:
    """What the stage table says of a stage: its recorded status, made final where the record
    cannot be (this report's own stage is still running while it writes), and a step with
    nothing configured told apart from one found done."""
    status = entry["status"]
    if status == "running":
        if name == "report" and entry["latest"]:
            return "done (this report)"
        if not entry["latest"] or entry["invocation"] != "running":
            return "killed (its invocation ended without recording its end)"
        return "unfinished (still running, or killed without a record)"
    if status == "not configured" or (status == "skipped" and name in CONFIGURED_BY
                                       and _lookup(config, CONFIGURED_BY[name][0]) in ((), [], None)):
        # (runs before 2026-12-01 recorded an unconfigured step as skipped)
        return f"not configured ({CONFIGURED_BY[name][1]})" if name in CONFIGURED_BY else "not configured"
    return "skipped (found done)" if status == "skipped" else status


def _lookup(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


STATUS_LEGEND = ("Status: ran (computed by the invocation that reported it); skipped (found done: reused from an "
                 "earlier invocation, it cost ~0 here); not configured (the config does not ask for it: the status "
                 "names the key that turns it on); failed or interrupted (its invocation stopped there); killed (its "
                 "invocation ended without recording the stage's end). This report's own row is done: the report is "
                 "its stage's last act.")


def _stage_table(stages: dict[str, dict], config: dict) -> list[tuple]:
    if not stages:
        return []
    rows = []
    for name, e in stages.items():
        rate = e.get("images_per_s") or _train_rate(e.get("dir"))
        seconds = f"{e['seconds']:.0f}" if e["status"] != "running" else ""
        rows.append([name, stage_status(name, e, config), seconds, f"{rate:.0f}" if rate else "",
                     e.get("dir") or e.get("path") or ""])
    total = sum(e["seconds"] for e in stages.values() if e["status"] == "ran")
    blocks = [("h2", "Stages"),
              ("p", f"Wall time of the invocation that computed each stage ({total:.0f} s in all). Training stages: "
                    "mean images/s over their epochs."),
              ("p", STATUS_LEGEND),
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


def _data(run: Path, stages: dict[str, dict], sets: dict[str, dict]) -> list[tuple]:
    path = run / "data.json"
    if not path.is_file():
        return []
    rows = []
    for name, c in json.loads(path.read_text()).items():
        s = sets.get(name, {})
        kind = f"synthetic ({s.get('source')} layout)" if s.get("synthetic") else f"{s.get('source', '?')} (real)"
        splits = ", ".join(f"{k} {v}" for k, v in c["by_split"].items())
        grades = ", ".join(f"{k}: {v}" for k, v in c["by_grade"].items())
        rejected = ", ".join(f"{k} {v}" for k, v in c["rejected_by_reason"].items()) or "none"
        rows.append([name, kind, f"{s.get('size', '?')} px", str(c["inputs"]), str(c["prepared"]),
                     f"{c['rejected']} ({rejected})", splits, grades])
    return [("h2", "Data"), ("p", f"Labeled subset: {labels_text(run, stages)} of the EyePACS-style train split."),
            ("table", ["data set", "images", "size", "inputs", "prepared", "rejected", "splits", "grades"], rows)]


# --- a label-fraction sweep --------------------------------------------------------------------


SWEEP_SCHEMA = pa.schema([
    ("trial", pa.string()), ("fraction", pa.float64()), ("count", pa.int64()), ("seed", pa.int64()),
    ("method", pa.string()), ("test_set", pa.string()), ("auc", pa.float64()), ("ci_low", pa.float64()),
    ("ci_high", pa.float64()), ("n", pa.int64()), ("positives", pa.int64()), ("trial_seconds", pa.float64()),
])


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the sd of one value is 0 (and shown as none)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def mean_sd_text(mean: float, sd: float, n: int) -> str:
    """"0.812 +- 0.034 (3)": mean +- sd over n seeds; one seed has no sd to show."""
    return f"{mean:.3f} +- {sd:.3f} ({n})" if n > 1 else f"{mean:.3f} (1 seed: no sd)"


def sweep_summary(rows: list[dict]) -> dict[tuple, dict]:
    """(test set, method, fraction, count) -> mean, sd (n-1; 0 for one seed), per-seed AUCs."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["test_set"], r["method"], r["fraction"], r["count"]), []).append(r["auc"])
    out = {}
    for key, aucs in groups.items():
        mean, sd = mean_sd(aucs)
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
                cells.append(mean_sd_text(s["mean"], s["sd"], len(s["aucs"])) if s else "")
            table.append(cells)
        if any(any(c for c in row[1:]) for row in table):
            blocks += [("p", f"{title}: AUC mean +- sd (n seeds)"), ("table", ["labels"] + methods, table)]
    panels = {title: {m: [(f, summary[(ts, m, f, c)]["mean"], summary[(ts, m, f, c)]["sd"],
                           summary[(ts, m, f, c)]["aucs"]) for f, c in levels if (ts, m, f, c) in summary]
                      for m in methods}
              for ts, title in TEST_SETS.items() if any(r["test_set"] == ts for r in rows)}
    if panels:
        sweep_figure(panels, run / "figures" / "sweep_auc.png")
        blocks.append(("img", "figures/sweep_auc.png", "test AUC against label fraction",
                       "Test AUC against the labeled fraction of the train split (log scale), one panel per test set: "
                       "each method's mean over seeds with +-1 sd error bars, every seed's AUC a faint dot; the dotted "
                       "line is chance (0.5)."))
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


# --- Table 1 (drray run table1), for one label draw or several -------------------------------------


TABLE1_SCHEMA = pa.schema([
    ("method", pa.string()), ("labels", pa.string()), ("architecture", pa.string()), ("test_set", pa.string()),
    ("n", pa.int64()), ("auc", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("paper_auc", pa.float64()), ("p_vs_student", pa.float64()), ("p_vs_teacher", pa.float64()), ("seed", pa.int64()),
])
TABLE1_SEEDS = "table1_seeds.json"  # RUN of a table1 over several seeds: each seed's outcome
SAME_LABELS = "the student above every method on the same labels"
ORDER_TEXT = "the paper's ordering (student >= teacher > supervised)"
P_COLUMN = {"student": "p_vs_student", "teacher": "p_vs_teacher"}  # table1 rows: DeLong p against these


def pair_p(by: dict[str, dict], a: str, b: str) -> float | None:
    """DeLong's p of models a and b on a test set, from Table 1 rows (method -> row); None if not recorded."""
    for row, other in ((a, b), (b, a)):
        column = P_COLUMN.get(other)
        if column and by[row].get(column) is not None:
            return by[row][column]
    return None


def ordering_verdicts(rows: list[dict]) -> tuple[list[str], str] | None:
    """One label draw's rows on one test set: each claim of the paper's ordering judged by DeLong
    (:func:`verdict`) and the ordering's verdict (:func:`combined`); None without its models or p."""
    by = {r["method"]: r for r in rows}
    verdicts = []
    for a, _, b in ORDERING:
        p = pair_p(by, a, b) if a in by and b in by else None
        if p is None:
            return None
        verdicts.append(verdict(by[a]["auc"] - by[b]["auc"], p))
    return verdicts, combined(verdicts)


def same_labels_verdicts(rows: list[dict]) -> tuple[dict[str, str], str] | None:
    """One draw's rows on one test set: the student against every method trained on the same
    labeled subset (not the 100%-labels row), each by DeLong, and all of them together."""
    by = {r["method"]: r for r in rows}
    others = [r for r in rows if r["method"] not in ("student", "supervised_100") and r["p_vs_student"] is not None]
    if "student" not in by or not others:
        return None
    verdicts = {r["method"]: verdict(by["student"]["auc"] - r["auc"], r["p_vs_student"]) for r in others}
    return verdicts, combined(list(verdicts.values()))


def table1_blocks(table: list[dict]) -> list[tuple]:
    """RUN/table1.parquet's rows as the paper's Table 1 (this run's numbers only; the paper's in
    their own table), and whether its claims hold here, judged like the ordering (:func:`verdict`):
    the distilled student above every baseline trained on the same labeled subset, and the
    paper's ordering student >= teacher > supervised."""
    sets = [s for s in TEST_SETS if any(r["test_set"] == s for r in table)]
    rows = []
    for name in dict.fromkeys(r["method"] for r in table):
        first = next(r for r in table if r["method"] == name)
        cells = [name, first["labels"], first["architecture"]]
        for s in sets:
            r = next((r for r in table if r["method"] == name and r["test_set"] == s), None)
            p = f", p={r['p_vs_student']:.2g}" if r and r["p_vs_student"] is not None else ""
            cells.append(f"{r['auc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]{p}" if r else "")
        rows.append(cells)
    seeds = sorted({r["seed"] for r in table if r.get("seed") is not None})
    draw = (f" One label draw (labels.seed {seeds[0]}): set table1.seeds (e.g. [0, 1, 2]) to judge the claims on "
            "several." if len(seeds) == 1 else "")
    blocks = [("p", "AUC [95% CI] per test set; p: DeLong's test against the distilled student on the same images. "
                    "The paper's AUCs are in their own table (real data, 299 px): not this run's." + draw),
              ("table", ["method", "labels", "architecture"] + [TEST_SETS[s] for s in sets], rows)]
    for s in sets:
        here = [r for r in table if r["test_set"] == s]
        if (judged := same_labels_verdicts(here)) is not None:
            verdicts, overall = judged
            by = {r["method"]: r for r in here}
            gaps = ", ".join(f"{m} {by['student']['auc'] - by[m]['auc']:+.3f} (p={by[m]['p_vs_student']:.2g}: {v})"
                             for m, v in verdicts.items())
            blocks.append(("p", f"{TEST_SETS[s]}: {SAME_LABELS} {overall}; student minus each: {gaps}."))
        if (ordered := ordering_verdicts(here)) is not None:
            verdicts, overall = ordered
            blocks.append(("p", f"{TEST_SETS[s]}: {ORDER_TEXT} {'is ' if overall == 'not distinguishable' else ''}"
                                f"{overall} (" + "; ".join(f"{a} {claim} {b}: {v}" for (a, claim, b), v
                                                           in zip(ORDERING, verdicts, strict=True)) + ")."))
    return blocks + [("p", RULE)]


def table1_over_seeds(run: Path) -> tuple[list[dict], list[dict]] | None:
    """A table1 run over several label draws: (RUN/table1.parquet's rows, each seed's outcome);
    None for a run of one draw (a later one-seed table1 in the same folder wins: its parquet's
    seeds are then not the record's)."""
    record, parquet = run / TABLE1_SEEDS, run / "table1.parquet"
    if not (record.is_file() and parquet.is_file()):
        return None
    outcomes, table = json.loads(record.read_text()), pq.read_table(parquet).to_pylist()
    finished = {o["seed"] for o in outcomes if o["status"] == "finished"}
    if len(outcomes) < 2 or {r.get("seed") for r in table} != finished:
        return None
    return table, outcomes


def seed_summary(table: list[dict]) -> dict[tuple[str, str], dict]:
    """(method, test set) -> mean and sd (n - 1) of the AUC over seeds, n, and each seed's row."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in table:
        groups.setdefault((r["method"], r["test_set"]), []).append(r)
    out = {}
    for key, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["seed"])
        mean, sd = mean_sd([r["auc"] for r in rows])
        out[key] = {"mean": mean, "sd": sd, "n": len(rows), "rows": {r["seed"]: r for r in rows}}
    return out


def _seeds(seeds: list[int]) -> str:
    return "none" if not seeds else ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def claim_over_seeds(per_seed: dict[int, str | None], what: str) -> str:
    """A claim judged in every seed, said plainly: in how many seeds it holds, is not
    distinguishable or does not hold; established across the seeds only when it holds in all."""
    judged = {seed: v for seed, v in per_seed.items() if v is not None}
    by = {v: [seed for seed, x in judged.items() if x == v] for v in ("holds", "not distinguishable", "does not hold")}
    n = len(judged)
    text = (f"{what} holds in {len(by['holds'])} of {n} seeds ({_seeds(by['holds'])}); not distinguishable in "
            f"{len(by['not distinguishable'])} ({_seeds(by['not distinguishable'])}); does not hold in "
            f"{len(by['does not hold'])} ({_seeds(by['does not hold'])})")
    if missing := sorted(set(per_seed) - set(judged)):
        text += f"; not judged in {_seeds(missing)} (a model or its p is missing)"
    if n and len(by["holds"]) == n:
        return text + ". Across the seeds: it holds in every one."
    wrong = f", and significantly the wrong way in {len(by['does not hold'])}" if by["does not hold"] else ""
    return text + f". Across the seeds: not established (it holds in {len(by['holds'])} of {n}{wrong})."


def _means_text(summary: dict, test_set: str, n: int) -> str:
    means = {m: summary[(m, test_set)] for m in ("student", "teacher", "supervised") if (m, test_set) in summary}
    if len(means) < 3:
        return ""
    values = ", ".join(f"{m} {mean_sd_text(s['mean'], s['sd'], s['n'])}" for m, s in means.items())
    ordered = means["student"]["mean"] >= means["teacher"]["mean"] > means["supervised"]["mean"]
    return (f" On the means over the seeds ({values}) the order is {'the paper' if ordered else 'not the paper'}'s: "
            f"a description of {n} label draws, not a test.")


def table1_seeds_blocks(table: list[dict], outcomes: list[dict]) -> list[tuple]:
    """Table 1 over label draws: per method and test set the mean +- sd of the AUC and n seeds,
    every seed's AUC with its 95% CI, and each claim judged in every seed (DeLong, as for one
    draw) with how many seeds it holds in. Failed seeds are named, never silently left out."""
    seeds = sorted({r["seed"] for r in table})
    failed = [o for o in outcomes if o["status"] == "failed"]
    summary = seed_summary(table)
    sets = [s for s in TEST_SETS if any(r["test_set"] == s for r in table)]
    methods = list(dict.fromkeys(r["method"] for r in table))
    blocks: list[tuple] = [("p", (
        f"{len(outcomes)} label draws (labels.seed {', '.join(str(o['seed']) for o in outcomes)}), {len(seeds)} finished: "
        "each draws its own labeled subset and seeds the training after pretraining; all share one SimCLR "
        "pretraining (it reads no labels). Each seed's rows, report and models are in `seeds/seed-<N>/`. AUC mean "
        "+- sd (sample sd, n - 1) over the finished seeds, n seeds in brackets: the sd is the spread between label "
        "draws and initialisations, not a confidence interval."))]
    if failed:
        blocks.append(("p", "Failed seeds, in no number below: " + "; ".join(
            f"seed {o['seed']} ({o['error']}; its run `{o['dir']}`)" for o in failed)
            + ". Rerun the same command to retry them; finished seeds are kept."))
    if not table:
        return blocks
    rows = []
    for m in methods:
        mine = [r for r in table if r["method"] == m]
        cells = [m, "; ".join(dict.fromkeys(r["labels"] for r in mine)), mine[0]["architecture"]]
        for s in sets:
            x = summary.get((m, s))
            cells.append(mean_sd_text(x["mean"], x["sd"], x["n"]) if x else "")
        rows.append(cells)
    blocks.append(("table", ["method", "labels used", "architecture"]
                   + [f"{TEST_SETS[s]}: AUC mean +- sd (n seeds)" for s in sets], rows))
    for s in sets:
        per_seed = []
        for m in methods:
            x = summary.get((m, s), {"rows": {}})["rows"]
            per_seed.append([m] + [f"{x[k]['auc']:.3f} [{x[k]['ci_low']:.3f}, {x[k]['ci_high']:.3f}]" if k in x else ""
                                   for k in seeds])
        blocks += [("p", f"{TEST_SETS[s]}: every seed's AUC [95% CI]"),
                   ("table", ["method"] + [f"seed {k}" for k in seeds], per_seed)]
    for s in sets:
        here = {k: [r for r in table if r["seed"] == k and r["test_set"] == s] for k in seeds}
        order = {k: (v[1] if (v := ordering_verdicts(rows)) else None) for k, rows in here.items()}
        same = {k: (v[1] if (v := same_labels_verdicts(rows)) else None) for k, rows in here.items()}
        blocks.append(("p", f"{TEST_SETS[s]}: " + claim_over_seeds(order, ORDER_TEXT[0].upper() + ORDER_TEXT[1:])
                            + _means_text(summary, s, len(seeds))))
        blocks.append(("p", f"{TEST_SETS[s]}: " + claim_over_seeds(same, SAME_LABELS[0].upper() + SAME_LABELS[1:])))
    return blocks + [("p", RULE + " Across seeds a claim counts as established only when it holds in every seed.")]


def sweep_markdown(run: Path) -> str:
    return markdown([("h1", f"Label-fraction sweep: {run.resolve().name}")] + sweep_blocks(run))


# --- rendering -------------------------------------------------------------------------------


def markdown(blocks: list[tuple]) -> str:
    out, figure = [], 0
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            out.append(args[0])
        elif kind == "note":  # what a reader must know before any number: a quote block at the top
            out.append(f"> **{args[0]}** {args[1]}")
        elif kind == "table":
            header, rows = args
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                 + ["| " + " | ".join(row) + " |" for row in rows]))
        elif kind == "img":
            figure += 1
            out.append(f"![{args[1]}]({args[0]})\n\n*Figure {figure}. {_caption(args)}*")
        elif kind == "pre":
            out.append("```yaml\n" + args[0].rstrip() + "\n```")
    return "\n\n".join(out) + "\n"


def _caption(args: tuple) -> str:
    """An image block is (path, alt text, caption); the caption defaults to the alt text."""
    return args[2] if len(args) > 2 else args[1]


def inline(text: str) -> str:
    """A line of the report as HTML: escaped, with Markdown's `code` as <code> (an unpaired
    backtick stays a backtick)."""
    parts = text.split("`")
    if len(parts) % 2 == 0:
        parts[-2:] = [parts[-2] + "`" + parts[-1]]
    return "".join(f"<code>{html.escape(part)}</code>" if i % 2 else html.escape(part) for i, part in enumerate(parts))


def _html(blocks: list[tuple], run: Path) -> str:
    esc = html.escape
    body, figure = [], 0
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{inline(args[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{inline(args[0])}</p>")
        elif kind == "note":
            body.append(f'<p class="note"><strong>{inline(args[0])}</strong> {inline(args[1])}</p>')
        elif kind == "table":
            header, rows = args
            body.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                        + "</table>")
        elif kind == "img":
            figure += 1
            data = base64.b64encode((run / args[0]).read_bytes()).decode()
            body.append(f'<figure><img alt="{esc(args[1])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>Figure {figure}. {inline(_caption(args))}</figcaption></figure>")
        elif kind == "pre":
            body.append(f"<pre>{esc(args[0])}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:90%}th{background:#f3f3f3}img{max-width:100%}pre{background:#f7f7f7;padding:1em;"
             "overflow:auto;font-size:85%}figure{margin:1em 0}figcaption{font-size:90%;color:#333}"
             "code{background:#f3f3f3;padding:0 3px}"
             ".note{border-left:6px solid #c62828;background:#fdecea;padding:.8em 1em;font-size:105%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>drray report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def run(cfg: Config) -> dict:
    """The report stage: the run directory's report, from what the stages wrote."""
    return build(run_dir(cfg))
