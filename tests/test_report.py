"""The report from a small fake run directory (no Ray, no training): what it must say so that it
cannot mislead: synthetic data, the paper apart, labels and positives, claims judged with their
tests, final stage states, captions, the published epoch, operating points with counts and CIs,
and a per-patient screening summary with the headings a STARD-AI / TRIPOD+AI reader looks for."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from drray import plots, report
from drray.metrics import imageability, reliability_bins

LABELED, TRAIN = 40, 240


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def stage_dir(run: Path, name: str, val_aucs: list[float | None], published: str | None = "best") -> Path:
    """A trained stage: metrics.jsonl (one line per epoch), subset.json, best/ and model/ metas."""
    folder = run / f"{name}-0123456789"
    lines = [{"stage": name, "epoch": e, "loss": 1.0 / (e + 1), "val_auc": auc, "images_per_s": 100.0}
             for e, auc in enumerate(val_aucs)]
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_json(folder / "subset.json", {"labeled": [f"img{i}" for i in range(LABELED)], "validation": ["v0"]})
    write_json(folder / "model" / "meta.json", {"spec": {"backbone": "resnet18"}, "epoch": len(val_aucs) - 1})
    aucs = [a if a is not None else -1 for a in val_aucs]
    best = max(range(len(aucs)), key=aucs.__getitem__)
    write_json(folder / "best" / "meta.json", {"spec": {"backbone": "resnet18"}, "epoch": best})
    if published:
        meta = json.loads((folder / published / "meta.json").read_text())
        write_json(run / "models" / name / "meta.json", {**meta, "source": str(folder / published)})
    return folder


def result(model: str, test_set: str, auc: float, counts: bool = True) -> dict:
    """An image row as an evaluation before per-patient rows wrote it (counts: with its counts)."""
    op = {"target_sensitivity": 0.9, "threshold": 0.25, "sensitivity": 0.9, "specificity": 0.5}
    if counts:
        op.update(tp=45, fn=5, tn=100, fp=100, sensitivity_ci=[0.7864, 0.9565], specificity_ci=[0.4314, 0.5686])
    return {"model": model, "test_set": test_set, "n": 250, "positives": 50, "auc": auc,
            "auc_ci": [auc - 0.05, auc + 0.05], "operating_points": [op]}


def unit_rows(model: str, test_set: str, auc: float) -> list[dict]:
    """An image row and a patient row as the evaluation writes them now."""
    image = result(model, test_set, auc)
    image["operating_points"][0].update(name="90% sensitivity on validation", ppv=45 / 145, npv=100 / 105,
                                        ppv_ci=[0.24, 0.39], npv_ci=[0.89, 0.98], prevalence=0.05,
                                        ppv_at_prevalence=0.087, ppv_at_prevalence_ci=[0.07, 0.11],
                                        npv_at_prevalence=0.9896, npv_at_prevalence_ci=[0.98, 0.995])
    calibration = {"brier": 0.125, "ece": 0.0625, "reliability": reliability_bins([0, 1], [0.2, 0.8])}
    patient = {**image, "unit": "patient", "n": 150, "positives": 30, "patients": 150, "auc": auc + 0.01,
               "auc_ci": [auc - 0.04, auc + 0.06], **calibration,
               "operating_points": [{**image["operating_points"][0], "tp": 27, "fn": 3, "tn": 60, "fp": 60,
                                     "sensitivity_ci": [0.74, 0.97], "specificity_ci": [0.41, 0.59],
                                     "ppv": 27 / 87, "npv": 60 / 63}]}
    return [{**image, "unit": "image", "patients": 150, **calibration}, patient]


def delong(test_set: str, a: str, b: str, auc_a: float, auc_b: float, p: float) -> dict:
    return {"test_set": test_set, "model_a": a, "model_b": b, "auc_a": auc_a, "auc_b": auc_b, "z": 1.0, "p": p}


# EyePACS-style test: the ordering holds (both claims significant, the right way). External: the
# ci run's 0.537 vs 0.536 (p 0.99: not distinguishable) and a teacher significantly below the
# supervised baseline (does not hold).
AUCS = {"eyepacs_test": {"student": 0.90, "teacher": 0.80, "supervised": 0.70},
        "external": {"student": 0.537, "teacher": 0.536, "supervised": 0.70}}
P = {"eyepacs_test": {("student", "teacher"): 0.01, ("teacher", "supervised"): 0.02, ("student", "supervised"): 0.001},
     "external": {("student", "teacher"): 0.99, ("teacher", "supervised"): 0.001, ("student", "supervised"): 0.001}}


def fake_run(root: Path, *, synthetic: bool = True, counts: bool = True, patients: bool = True) -> Path:
    run = root / "run"
    images = root / "raw"
    images.mkdir(parents=True)
    prepared = root / "prepared"
    write_json(prepared / "manifest.json", {"source": "synthetic" if synthetic else "eyepacs", "images": str(images),
                                            "params": {"size": 64}, "label_files": [{"path": "raw/trainLabels.csv"}]})
    stages = {name: stage_dir(run, name, aucs) for name, aucs in
              (("teacher", [0.6, 0.8, 0.7]), ("supervised", [0.5, 0.6]), ("student", [0.7, 0.9, 0.8, 0.75]))}
    stages["pretrain"] = stage_dir(run, "pretrain", [None, None], published=None)
    monitored = [{**json.loads(line), **({"knn_auc": 0.61} if e == 1 else {})}  # pretrain.monitor_every 2
                 for e, line in enumerate((stages["pretrain"] / "metrics.jsonl").read_text().splitlines())]
    monitored.insert(0, {"event": "monitor", "labeled": LABELED, "validation": 1, "labels": {"seed": 3}})
    (stages["pretrain"] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in monitored))
    evaluation = run / "evaluate-0123456789"
    evaluation.mkdir()
    Image.new("RGB", (8, 8)).save(evaluation / "roc_eyepacs_test.png")
    metrics = {
        "results": [result(m, s, auc, counts) for s, by in AUCS.items() for m, auc in by.items()],
        "delong": [delong(s, a, b, AUCS[s][a], AUCS[s][b], p) for s, pairs in P.items() for (a, b), p in pairs.items()],
        "bootstrap": {"resamples": 1000, "seed": 0, "level": 0.95}}
    if patients:  # the evaluation's current layout: a row per unit, imageability, a reliability diagram
        Image.new("RGB", (8, 8)).save(evaluation / "reliability_eyepacs_test.png")
        metrics.update(
            results=[row for s, by in AUCS.items() for m, auc in by.items() for row in unit_rows(m, s, auc)],
            delong=[{**d, "unit": unit} for d in metrics["delong"] for unit in ("image", "patient")],
            bootstrap={**metrics["bootstrap"], "resampled": "patients"}, calibration_bins=10, prevalence=0.05,
            operating_points={m: {"name": "90% sensitivity on validation", "threshold": 0.25, "target_sensitivity": 0.9,
                                  "chosen_on": "validation", "validation_images": 40} for m in AUCS["external"]},
            imageability={"eyepacs_test": {"scope": "the whole prepared set", "ungraded": 2, **imageability(
                294, {"no_fundus": 4, "corrupt": 2, "unsupported_format": 1})}})
    write_json(run / "metrics.json", metrics)
    write_json(run / "data.json", {"eyepacs": {
        "prepared_dir": str(prepared), "inputs": 300, "prepared": 300, "rejected": 0, "rejected_by_reason": {},
        "by_split": {"train": TRAIN, "test": 60}, "by_grade": {"0": 250, "2": 50}}})
    (run / "config.resolved.yaml").write_text(yaml.safe_dump({
        "data": {"size": 64, "eyepacs": {"source": "eyepacs", "images": str(images), "prepared": str(prepared),
                                         "synthetic": {"n": 240} if synthetic else None}},
        "pipeline": {"baselines": []}}))
    entry = lambda name, status, **kw: {"stage": name, "status": status, "seconds": 1.0, **kw}  # noqa: E731
    write_json(run / "pipeline.json", {"invocations": [
        {"status": "running", "stages": [entry("distill", "running")]},  # killed: never recorded its end
        {"status": "running", "stages": [
            entry("prepare", "skipped"), entry("pretrain", "ran", dir=str(stages["pretrain"])),
            entry("teacher", "ran", dir=str(stages["teacher"])), entry("supervised", "ran", dir=str(stages["supervised"])),
            entry("baselines", "skipped"), entry("pseudolabel", "ran", images=TRAIN, positives=20),
            entry("distill", "failed"), entry("student", "ran", dir=str(stages["student"])),
            entry("evaluate", "ran", dir=str(evaluation)), entry("report", "running")]}]})
    return run


@pytest.fixture
def built(tmp_path, monkeypatch):
    """The report of the fake run: (markdown, html, what the training figure was given)."""
    given = {}
    real = plots.training_figure

    def recording(stages, path, *published):
        given.update(stages=stages, published=published[0] if published else None)
        return real(stages, path, *published)

    monkeypatch.setattr(plots, "training_figure", recording)
    run = fake_run(tmp_path)
    report.build(run)
    return (run / "report.md").read_text(), (run / "report.html").read_text(), given


def section(md: str, title: str) -> str:
    return md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def rows_of(md: str, title: str) -> list[str]:
    return [line for line in section(md, title).splitlines() if line.startswith("| ")]


def test_the_report_says_at_the_top_that_its_data_are_synthetic(built, tmp_path):
    md, page, _ = built
    notice = md.index("> **Synthetic data.**")
    assert notice < md.index("## Results") and "eyepacs at 64 px" in md[notice:md.index("## Results")]
    assert '<p class="note"><strong>Synthetic data.</strong>' in page
    assert "| eyepacs | synthetic (eyepacs layout) | 64 px |" in md


def test_synthetic_is_read_from_the_mark_drray_synth_leaves_and_real_data_get_no_notice(tmp_path):
    run = fake_run(tmp_path / "real", synthetic=False)
    assert "Synthetic data" not in report.markdown(report.synthetic_notice(report.data_sets(run)))
    marked = fake_run(tmp_path / "marked", synthetic=False)
    write_json(Path(report.data_sets(marked)["eyepacs"]["images"]) / ".drray-output.json",
               {"written_by": "drray", "what": "synthetic-data folder"})
    assert report.data_sets(marked)["eyepacs"]["synthetic"]


def test_the_papers_numbers_stand_in_their_own_labelled_table(built):
    md, _, _ = built
    results = section(md, "Results (Table 1 layout)")
    assert "paper" not in rows_of(md, "Results (Table 1 layout)")[0].lower() and "0.94" not in results
    paper = rows_of(md, report.PAPER_TITLE)
    assert "| SimCLR-Distilled (Student) | DenseNet161 | 2% (1,000) | 0.94 | 0.89 |" in paper
    assert md.index("## Paper (real EyePACS/Messidor-2, 299 px), for reference, not reproduced by this run") > 0


def test_every_results_row_shows_its_labels_and_the_test_sets_images_and_positives(built):
    md, _, _ = built
    rows = rows_of(md, "Results (Table 1 layout)")
    assert rows[0].startswith("| model | architecture | labels used |")
    teacher = next(r for r in rows if r.startswith("| teacher |"))
    assert "| 17.1% (41 = 40 train + 1 validation) |" in teacher and teacher.count("(n=250, 50 referable)") == 2
    student = next(r for r in rows if r.startswith("| student |"))
    assert "17.1% (41 = 40 train + 1 validation) + the teacher's pseudo-labels on 240 pool images" in student


@pytest.mark.parametrize("difference, p, expected", [
    (+0.10, 0.01, "holds"), (+0.001, 0.99, "not distinguishable"), (-0.10, 0.30, "not distinguishable"),
    (-0.16, 0.001, "does not hold")])
def test_a_claim_is_judged_by_delongs_p_not_by_the_point_estimates(difference, p, expected):
    assert report.verdict(difference, p) == expected


def test_the_ordering_is_judged_claim_by_claim_with_the_rule_in_the_text(built):
    md, _, _ = built
    text = section(md, "The paper's ordering: student >= teacher > supervised")
    assert report.RULE in text and "p < 0.05" in report.RULE
    rows = rows_of(md, "The paper's ordering: student >= teacher > supervised")
    verdict = {(r.split(" | ")[0][2:], r.split(" | ")[1]): r.rsplit(" | ", 1)[1][:-2] for r in rows[1:5]}
    assert verdict == {("EyePACS-style test", "student >= teacher"): "holds",
                       ("EyePACS-style test", "teacher > supervised"): "holds",
                       ("Messidor-2-style external", "student >= teacher"): "not distinguishable",
                       ("Messidor-2-style external", "teacher > supervised"): "does not hold"}
    assert "| 0.537 [0.487, 0.587] | 0.536 [0.486, 0.586] | +0.001 | 0.99 | not distinguishable |" in text
    assert "EyePACS-style test: the ordering holds (" in text
    assert "Messidor-2-style external: the ordering does not hold (" in text
    assert report.combined(["holds", "not distinguishable"]) == "not distinguishable"


def test_the_stage_table_shows_final_states_and_unconfigured_steps(built):
    md, _, _ = built
    rows = rows_of(md, "Stages")
    assert not [r for r in rows if "| running |" in r]
    assert any(r.startswith("| report | done (this report) |") for r in rows)
    assert any(r.startswith("| baselines | not configured (set pipeline.baselines") for r in rows)
    assert any(r.startswith("| prepare | skipped (found done) |") for r in rows)
    assert any(r.startswith("| distill | failed |") for r in rows)  # the latest record, not the stale one


def test_a_stage_left_running_by_a_killed_invocation_is_not_shown_running():
    entry = {"stage": "distill", "status": "running", "seconds": 3.0, "latest": False, "invocation": "running"}
    assert report.stage_status("distill", entry, {}).startswith("killed")
    configured = {"pipeline": {"baselines": ["fixmatch"]}}
    skipped = {"stage": "baselines", "status": "skipped", "seconds": 0.0, "latest": True, "invocation": "complete"}
    assert report.stage_status("baselines", skipped, configured) == "skipped (found done)"


def test_every_figure_has_a_visible_caption(built):
    md, page, _ = built
    assert re.search(r"!\[reliability eyepacs test\]\(figures/reliability_eyepacs_test.png\)\n\n\*Figure 1\. "
                     r"Reliability diagrams on the EyePACS-style test set, per image \(left\) and per patient", md)
    assert re.search(r"!\[roc eyepacs test\]\(figures/roc_eyepacs_test.png\)\n\n\*Figure 2\. ROC curves on the "
                     r"EyePACS-style test set \(250 images, 50 referable\)", md)
    assert "*Figure 3. Training loss" in md and md.count("figures/reliability_eyepacs_test.png") == 1
    assert page.count("<figcaption>Figure ") == 3 and "<figcaption>Figure 2. ROC curves on the" in page


def test_html_renders_inline_code_and_escapes_everything_else(built):
    _, page, _ = built
    body = re.sub(r"<pre>.*?</pre>", "", page, flags=re.S)
    assert "`" not in body and "<code>drray synth</code>" in body and "<code>/" in body
    assert report.inline("a `<b>` & \"c\"") == "a <code>&lt;b&gt;</code> &amp; &quot;c&quot;"
    assert report.inline("one ` left") == "one ` left"


def test_the_training_curves_mark_the_published_epoch(built):
    md, _, given = built
    # teacher: best validation AUC at epoch 2 of 3 (0-based 1); pretrain: no validation, its last
    assert given["published"] == {"teacher": 1, "supervised": 1, "student": 1, "pretrain": 1}
    caption = md.split("*Figure 3. ", 1)[1].split("*", 1)[0]
    assert "teacher epoch 2 (best validation AUC; published as RUN/models/teacher)" in caption
    assert "pretrain epoch 2 (the last epoch; handed to the next stage)" in caption


def test_training_figure_draws_a_line_and_a_ring_at_the_published_epoch(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    records = [{"epoch": e, "loss": 1.0 / (e + 1), "val_auc": auc} for e, auc in enumerate([0.6, 0.8, 0.7])]
    plots.training_figure({"teacher": records}, tmp_path / "t.png", {"teacher": 1})
    for ax in figures[0].axes:
        marks = [line for line in ax.lines if line.get_gid() == "published"]
        assert {tuple(line.get_xdata()) for line in marks} == {(2, 2), (2,)}  # the vertical line and the ring
    assert [line.get_ydata()[0] for line in figures[0].axes[1].lines if line.get_gid() == "published"][1] == 0.8


def test_operating_points_show_counts_and_wilson_intervals(built, tmp_path):
    md, _, _ = built
    rows = rows_of(md, "Operating points")
    assert len(rows) == 1 + 6  # the header and the image rows only: 3 models x 2 test sets
    assert "| 0.900 (45/50) [0.786, 0.957] | 0.500 (100/200) [0.431, 0.569] | 0.310 (45/145) [0.240, 0.390] |" in rows[1]
    old = fake_run(tmp_path / "old", counts=False, patients=False)
    report.build(old)
    text = (old / "report.md").read_text()
    assert "0.900 (counts not recorded)" in text and "made before drray recorded per-patient results" in text


def test_the_screening_summary_is_per_patient_with_counts_intervals_and_calibration(built):
    md, page, _ = built
    text = section(md, report.SCREENING)
    table = text.split("### EyePACS-style test", 1)[1].split("###", 1)[0]
    student = next(line for line in table.splitlines() if line.startswith("| student |"))
    assert student == ("| student | 150 (30) | 0.910 [0.860, 0.960] | 90% sensitivity on validation (threshold 0.250) "
                       "| 0.900 (27/30) [0.740, 0.970] | 0.500 (60/120) [0.410, 0.590] | 0.310 (27/87) [0.240, 0.390] "
                       "| 0.952 (60/63) [0.890, 0.980] | 0.087 [0.070, 0.110] | 0.990 [0.980, 0.995] | 0.125 | 0.062 |")
    assert "| PPV at 5.0% [95% CI] | NPV at 5.0% [95% CI] | Brier | ECE |" in table
    assert "resampling patients (each with all its images)" in text and "10 equal-width bins" in text
    assert ("Imageability: 0.980 [0.957, 0.991] (294 of 300 input photographs graded by the system; the whole prepared "
            "set). Not gradable: corrupt 2, no_fundus 4. Left out of it: not an input: unsupported_format 1; no reference "
            "standard: none. Prepared but without a grade (not evaluated): 2.") in text
    assert "<h3>EyePACS-style test</h3>" in page


def test_the_screening_summary_has_the_stard_headings(built):
    md, _, _ = built
    text = section(md, report.SCREENING)
    for heading in ("Data sources", "Reference standard", "Operating point choice", "Missing and ungradable data"):
        assert f"\n### {heading}\n" in text
    assert ("EyePACS-style test: the eyepacs data set, its test split: 250 graded images of 150 patients. Source: "
            "synthetic images (`drray synth`) in `") in text and "at 64 px, grades from `raw/trainLabels.csv`." in text
    assert "Messidor-2-style external: the external data set, all of it: 250 graded images of 150 patients. Source: " \
           "not recorded" in text
    assert "Positive: referable DR, ICDR grade >= 2" in text and "(data.positive: referable)" in text
    assert "on the validation hold-out (40 images of the EyePACS-style train split" in text
    assert "reaches 90% (evaluate.operating_sensitivity)" in text and "student 0.250" in text
    assert "Not an input: duplicate_image, image_missing, unsupported_format" in text


def test_readers_take_image_rows_and_older_rows_count_as_images(built, tmp_path):
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {r["unit"] for r in report.rows_at(metrics)} == {"image"} and len(report.rows_at(metrics, "patient")) == 6
    assert {d["unit"] for d in report.delong_at(metrics)} == {"image"}
    old = json.loads((fake_run(tmp_path / "old", patients=False) / "metrics.json").read_text())
    assert report.rows_at(old) == old["results"] and report.rows_at(old, "patient") == []


def test_table1_judges_the_students_claim_by_delong_and_keeps_the_papers_numbers_apart():
    from drray import report

    def row(method, test_set, auc, p):
        return {"method": method, "labels": "2% (64)", "architecture": "resnet18", "test_set": test_set, "n": 100,
                "auc": auc, "ci_low": auc - 0.05, "ci_high": auc + 0.05, "paper_auc": 0.9, "p_vs_student": p}

    table = [row("supervised_100", "eyepacs_test", 0.99, 0.01), row("fixmatch", "eyepacs_test", 0.70, 0.02),
             row("student", "eyepacs_test", 0.80, None), row("supervised_100", "external", 0.99, 0.01),
             row("fixmatch", "external", 0.85, 0.3), row("mixmatch", "external", 0.60, 0.4),
             row("student", "external", 0.80, None)]
    text = report.markdown(report.table1_blocks(table))
    assert "EyePACS-style test: the student above every method on the same labels holds" in text
    assert "fixmatch +0.100 (p=0.02: holds)" in text  # the 100%-labels row is not a same-labels competitor
    assert "Messidor-2-style external: the student above every method on the same labels not distinguishable" in text
    assert "| fixmatch | 2% (64) | resnet18 | 0.700 [0.650, 0.750], p=0.02 |" in text and "(paper" not in text
    table[4] = row("fixmatch", "external", 0.90, 0.001)  # significantly above the student
    text = report.markdown(report.table1_blocks(table))
    assert "external: the student above every method on the same labels does not hold" in text


def test_reliability_figure_draws_each_models_bins_in_each_panel(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    bins = reliability_bins([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.95])
    plots.reliability_figure({"per image": {"a": bins, "b": bins}, "per patient": {"a": bins}}, "t", tmp_path / "r.png")
    image, patient = figures[0].axes
    assert [line.get_label() for line in image.lines][:2] == ["a", "b"] and len(patient.lines) == 2  # a + diagonal
    assert list(image.lines[0].get_xdata()) == [0.1, 0.3, 0.6, 0.95]  # the non-empty bins' mean probabilities


def test_a_run_without_validation_images_says_no_operating_point_was_fixed():
    from drray import report

    row = {"model": "teacher", "test_set": "eyepacs_test", "unit": "patient", "n": 30, "positives": 6,
           "auc": 0.7, "auc_ci": [0.6, 0.8], "brier": 0.2, "ece": 0.1, "operating_points": []}
    header, table = report.screening_table([row], {"operating_points": {}})
    assert len(table[0]) == len(header) and "no validation images" in table[0][3]


def test_the_training_figure_shows_the_simclr_knn_probe_apart_from_the_classifiers_auc(built, tmp_path, monkeypatch):
    md, _, given = built
    assert [r.get("knn_auc") for r in given["stages"]["pretrain"]] == [None, 0.61]  # read from metrics.jsonl
    caption = md.split("*Figure 3. ", 1)[1].split("*", 1)[0]
    assert "Dashed with squares (right): the kNN probe AUC of the SimCLR backbone's features" in caption
    assert "(pretrain: epoch 2 0.610, 40 labeled images voting on 1 of labels.seed 3, the draw of the run" in caption
    records = {"pretrain": [{"epoch": 0, "loss": 5.0}, {"epoch": 1, "loss": 4.0, "knn_auc": 0.6},
                            {"epoch": 2, "loss": 3.0}, {"epoch": 3, "loss": 2.5, "knn_auc": 0.7}],
               "teacher": [{"epoch": e, "loss": 1.0, "val_auc": a} for e, a in enumerate([0.6, 0.8])]}
    series = {(c["stage"], c["metric"]): c for c in plots.training_series(records)}
    assert set(series) == {("pretrain", "loss"), ("pretrain", "knn_auc"), ("teacher", "loss"), ("teacher", "val_auc")}
    knn = series[("pretrain", "knn_auc")]
    assert (knn["epochs"], knn["values"], knn["panel"]) == ([2, 4], [0.6, 0.7], 1)  # only the probed epochs
    assert knn["style"] != series[("teacher", "val_auc")]["style"] and "kNN" in knn["label"]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.training_figure(records, tmp_path / "t.png", {"pretrain": 3})
    auc_panel = figures[0].axes[1]
    drawn = {line.get_gid(): line for line in auc_panel.lines if line.get_gid() in ("knn_auc", "val_auc")}
    assert list(drawn["knn_auc"].get_ydata()) == [0.6, 0.7] and drawn["knn_auc"].get_linestyle() == "--"
    assert drawn["val_auc"].get_linestyle() == "-" and drawn["knn_auc"].get_color() != drawn["val_auc"].get_color()
    assert [tuple(line.get_xdata()) for line in auc_panel.lines if line.get_gid() == "published"] == [(4, 4), (4,)]


def test_an_unmonitored_pretraining_says_how_to_turn_the_probe_on():
    assert "pretrain.monitor_every 0" in report.knn_text({"pretrain": [{"epoch": 0, "loss": 1.0}]})
    assert report.knn_text({"teacher": [{"epoch": 0, "loss": 1.0, "val_auc": 0.5}]}) == ""


def table1_row(method, test_set, auc, p_student=None, p_teacher=None, seed=0, labels="33.3% (80)"):
    return {"method": method, "labels": labels, "architecture": "resnet18", "test_set": test_set, "n": 60,
            "auc": auc, "ci_low": auc - 0.05, "ci_high": auc + 0.05, "paper_auc": 0.9, "p_vs_student": p_student,
            "p_vs_teacher": p_teacher, "seed": seed}


# Per seed on the EyePACS-style test: (student, teacher, supervised) AUCs, p(student, teacher),
# p(teacher, supervised). Seed 0: both claims hold; seed 1: the teacher not distinguishable from
# the supervised baseline; seed 2: the teacher significantly below it.
SEEDS = {0: ((0.90, 0.80, 0.70), 0.01, 0.02), 1: ((0.85, 0.75, 0.74), 0.03, 0.6), 2: ((0.80, 0.70, 0.75), 0.04, 0.01)}


def seeds_table() -> list[dict]:
    table = []
    for seed, ((student, teacher, supervised), p_st, p_ts) in SEEDS.items():
        table += [table1_row("supervised", "eyepacs_test", supervised, 0.001, p_ts, seed),
                  table1_row("teacher", "eyepacs_test", teacher, p_st, None, seed),
                  table1_row("student", "eyepacs_test", student, None, p_st, seed)]
    return table


def test_one_seeds_table1_judges_the_papers_ordering_with_the_teacher_p():
    text = report.markdown(report.table1_blocks([r for r in seeds_table() if r["seed"] == 1]))
    assert ("EyePACS-style test: the paper's ordering (student >= teacher > supervised) is not distinguishable "
            "(student >= teacher: holds; teacher > supervised: not distinguishable).") in text


def test_table1_over_seeds_gives_mean_sd_every_seeds_ci_and_the_claim_in_k_of_n_seeds():
    outcomes = [{"seed": s, "status": "finished", "dir": f"/r/seeds/seed-{s}", "error": None} for s in SEEDS]
    outcomes.append({"seed": 3, "status": "failed", "dir": "/r/seeds/seed-3", "error": "RuntimeError: boom"})
    table = seeds_table()
    summary = report.seed_summary(table)
    teacher = [SEEDS[s][0][1] for s in SEEDS]
    mean = sum(teacher) / 3
    sd = (sum((a - mean) ** 2 for a in teacher) / 2) ** 0.5  # n - 1
    assert summary[("teacher", "eyepacs_test")]["mean"] == pytest.approx(mean)
    assert summary[("teacher", "eyepacs_test")]["sd"] == pytest.approx(sd) and summary[("teacher", "eyepacs_test")]["n"] == 3
    text = report.markdown(report.table1_seeds_blocks(table, outcomes))
    assert f"| teacher | 33.3% (80) | resnet18 | {mean:.3f} +- {sd:.3f} (3) |" in text
    assert "| student | 0.900 [0.850, 0.950] | 0.850 [0.800, 0.900] | 0.800 [0.750, 0.850] |" in text  # every seed's CI
    assert "Failed seeds, in no number below: seed 3 (RuntimeError: boom; its run `/r/seeds/seed-3`)" in text
    assert ("EyePACS-style test: The paper's ordering (student >= teacher > supervised) holds in 1 of 3 seeds (seed 0); "
            "not distinguishable in 1 (seed 1); does not hold in 1 (seed 2). Across the seeds: not established (it "
            "holds in 1 of 3, and significantly the wrong way in 1).") in text
    assert "On the means over the seeds (student 0.850 +- 0.050 (3), teacher 0.750 +- 0.050 (3), supervised " \
           "0.730 +- 0.026 (3)) the order is the paper's: a description of 3 label draws, not a test." in text
    assert ("The student above every method on the same labels holds in 3 of 3 seeds (seeds 0, 1, 2); not "
            "distinguishable in 0 (none); does not hold in 0 (none). Across the seeds: it holds in every one.") in text


def test_the_report_of_a_table1_over_seeds_is_built_from_its_files(tmp_path):
    import pyarrow as pa

    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.Table.from_pylist(seeds_table(), schema=report.TABLE1_SCHEMA), run / "table1.parquet")
    outcomes = [{"seed": s, "status": "finished", "dir": str(run / "seeds" / f"seed-{s}"), "error": None} for s in SEEDS]
    write_json(run / report.TABLE1_SEEDS, outcomes)
    report.build(run)  # no metrics.json in RUN: each seed's evaluation is in its own folder
    md = (run / "report.md").read_text()
    assert "## Table 1 over label draws (drray run table1)" in md and "holds in 1 of 3 seeds" in md
    assert "Results (Table 1 layout)" not in md and PAPER_HEADING in md
    write_json(run / report.TABLE1_SEEDS, outcomes[:1] + [{**outcomes[1], "status": "failed", "error": "x"}])
    assert report.table1_over_seeds(run) is None  # the parquet's seeds are not the record's: not this table


PAPER_HEADING = "## " + report.PAPER_TITLE


def test_table1_over_seeds_reports_a_failed_seed_and_a_rerun_keeps_the_finished_ones(tmp_path, monkeypatch):
    """jobs.table1's loop over seeds with its pipeline stubbed (no Ray): seed 1 fails, seed 0's
    rows make the table and the failure is named; the rerun runs seed 1 only."""
    import pyarrow as pa

    from drray.config import load_config
    from jobs import table1

    ran, broken = [], {1}

    def steps_of_a_seed(cfg, steps):
        seed = cfg.labels.seed
        ran.append(seed)
        assert cfg.run.stages == str((tmp_path / "run").resolve())  # every seed in the one stage cache
        if seed in broken:
            raise RuntimeError("the teacher diverged")
        rows = [r for r in seeds_table() if r["seed"] == seed]
        pq.write_table(pa.Table.from_pylist(rows, schema=report.TABLE1_SCHEMA), Path(cfg.run.dir) / "table1.parquet")
        return {}

    monkeypatch.setattr(table1, "SHARED_STAGES", ())
    monkeypatch.setattr(table1, "run_steps", steps_of_a_seed)
    cfg = load_config(REPO_CI, [f"run.dir={tmp_path / 'run'}", "table1.seeds=[0, 1]"])
    for seed in (0, 1):
        (tmp_path / "run" / "seeds" / f"seed-{seed}").mkdir(parents=True)
    with pytest.raises(RuntimeError, match=r"1 of 2 seeds failed: seed 1 \(RuntimeError: the teacher diverged\)"):
        table1.run(cfg)
    assert ran == [0, 1]
    text = (tmp_path / "run" / "table1.md").read_text()
    assert "2 label draws (labels.seed 0, 1), 1 finished" in text and "seed 1 (RuntimeError: the teacher diverged" in text
    assert {r["seed"] for r in pq.read_table(tmp_path / "run" / "table1.parquet").to_pylist()} == {0}
    assert "Failed seeds" in (tmp_path / "run" / "report.md").read_text()
    broken.clear()
    table1.run(cfg)
    assert ran == [0, 1, 1]  # seed 0 finished with these settings: kept, not rerun
    assert {r["seed"] for r in pq.read_table(tmp_path / "run" / "table1.parquet").to_pylist()} == {0, 1}
    assert "holds in 1 of 2 seeds" in (tmp_path / "run" / "table1.md").read_text()


REPO_CI = Path(__file__).resolve().parents[1] / "configs" / "ci.yaml"
