"""`drray run pipeline` at ci scale on real Ray: killed inside a stage and run again, it skips
what is finished and resumes the rest; then the evaluation, the report, a changed downstream
setting and `drray predict` on the published model."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import brier_score_loss, roc_auc_score

from drray.config import load_config
from tests.conftest import REPO, ci_data_problem

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CI = REPO / "configs" / "ci.yaml"
TRAINING = ["pretrain", "teacher", "supervised", "distill", "student"]
DISTILL_EPOCHS = 8


def invocations(run: Path) -> list[dict]:
    return json.loads((run / "pipeline.json").read_text())["invocations"]


def statuses(invocation: dict) -> dict[str, str]:
    return {e["stage"]: e["status"] for e in invocation["stages"]}


def epochs_in(stage_dir: Path) -> list[int]:
    path = stage_dir / "metrics.jsonl"
    return [r["epoch"] for r in map(json.loads, path.read_text().splitlines()) if "epoch" in r] if path.exists() else []


def latest_checkpoint(storage: Path) -> str | None:
    """The checkpoint a rerun would resume this stage from: Ray Train's snapshot names it; the
    driver runtime's checkpoints are complete once they exist (renamed into place)."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        local = sorted(p.name for p in storage.glob("checkpoint_[0-9]*") if p.is_dir())
        return local[-1] if local else None
    latest = snapshot.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return name if name and (storage / name).is_dir() else None


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The pipeline killed (driver and its Ray) after distill's first checkpoint, then run again
    (distill trains longer than ci.yaml says, so the kill lands inside it)."""
    run = tmp_path_factory.mktemp("pipeline")
    cmd = [sys.executable, "-m", "jobs.cli", "run", "pipeline", "--config", str(CI), "--set", f"run.dir={run}",
           "--set", f"distill.epochs={DISTILL_EPOCHS}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, distill = time.time() + 420, None
    while time.time() < deadline and distill is None:
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        found = list(run.glob("distill-*"))
        # an epoch is done and Ray Train has recorded its checkpoint as the latest
        if found and epochs_in(found[0]) and latest_checkpoint(run / "ray" / found[0].name):
            distill = found[0]
        time.sleep(0.2)
    assert distill is not None, "distill never finished an epoch"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "report.md").exists()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert not (problem := ci_data_problem()), problem  # the counts below are of the whole set
    return run


def test_rerun_skips_finished_stages_and_resumes_the_killed_one(run):
    first, second = invocations(run)
    assert first["status"] == "running"  # killed: never marked finished
    assert statuses(first)["distill"] == "running"
    assert statuses(second) == {
        "prepare": "skipped", "pretrain": "skipped", "teacher": "skipped", "supervised": "skipped",
        "baselines": "not configured", "pseudolabel": "skipped", "distill": "ran", "student": "ran", "oof": "not configured", "models": "ran", "evaluate": "ran",
        "report": "ran",
    }
    assert second["status"] == "complete"
    distill = next(run.glob("distill-*"))
    assert "resumed" in (distill / "metrics.jsonl").read_text()
    assert epochs_in(distill).count(0) == 1  # continued from its checkpoint, not from epoch 0
    for stage in ("pretrain", "teacher", "supervised"):  # trained once
        assert epochs_in(next(run.glob(f"{stage}-*"))) == [0, 1]


def test_each_training_stage_wrote_what_the_next_one_reads(run):
    """The stages chain: SimCLR's model has its projection head, the teacher validated every
    epoch on the labeled hold-out and kept its best and last models, the student is the
    distillation's architecture fine-tuned; every loss is finite."""
    import torch

    from drray.engine.checkpoint import load_model

    cfg = load_config(CI, [f"run.dir={run}", f"distill.epochs={DISTILL_EPOCHS}"])
    pre = next(run.glob("pretrain-*"))
    state = torch.load(pre / "model" / "model.pt", weights_only=True)
    assert any(k.startswith("projection.") for k in state) and any(k.startswith("backbone.") for k in state)
    for stage in ("pretrain", "teacher", "supervised", "distill", "student"):
        lines = [json.loads(x) for x in (next(run.glob(f"{stage}-*")) / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(r["loss"]) for r in lines if "epoch" in r), stage
    pretrain = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
    monitor = next(r for r in pretrain if r.get("event") == "monitor")  # ci.yaml: monitor_every 2 of 2 epochs
    teacher = next(run.glob("teacher-*"))
    budget = json.loads((teacher / "subset.json").read_text())  # the probe reads the teacher's labels, no others
    assert (monitor["labeled"], monitor["validation"]) == (len(budget["labeled"]), len(budget["validation"]))
    assert [r.get("knn_auc") is not None for r in pretrain if "epoch" in r] == [False, True]
    lines = [json.loads(x) for x in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("val_auc") is not None for r in lines if "epoch" in r] == [True, True]
    assert (teacher / "best" / "model.pt").is_file() and (teacher / "model" / "model.pt").is_file()
    subset = json.loads((teacher / "subset.json").read_text())
    budget = len(subset["labeled"]) + len(subset["validation"])  # validation inside the budget
    assert cfg.labels.count <= budget <= cfg.labels.count + 1
    assert abs(len(subset["validation"]) - cfg.labels.validation * budget) <= 1
    spent = pq.read_table(run / "labels.parquet").to_pylist()  # every label any stage read, and no other
    assert {r["image_id"] for r in spent} == set(subset["labeled"]) | set(subset["validation"])
    assert {r["image_id"] for r in spent if r["role"] == "validation"} == set(subset["validation"])
    _, meta = load_model(next(run.glob("student-*")) / "model")
    assert meta["spec"]["backbone"] == cfg.distill.backbone and meta["spec"]["kind"] == "classifier"
    join = json.loads((next(run.glob("distill-*")) / "pseudolabel_join.json").read_text())
    assert join["pool_without_pseudolabel"] == join["pseudolabel_without_image"] == 0


def test_evaluation_numbers_are_sklearns_on_the_written_predictions(run):
    metrics = json.loads((run / "metrics.json").read_text())
    evaluation = next(run.glob("evaluate-*"))
    predictions = pq.read_table(evaluation / "predictions.parquet").to_pandas()
    assert set(predictions["model"]) == {"teacher", "student", "supervised"}
    assert set(predictions["test_set"]) == {"validation", "eyepacs_test", "external"}
    assert list(predictions.columns) == ["image_id", "patient_id", "target", "prob", "model", "test_set"]
    assert {r["unit"] for r in metrics["results"]} == {"image", "patient"}
    for r in metrics["results"]:
        rows = predictions[(predictions["model"] == r["model"]) & (predictions["test_set"] == r["test_set"])]
        assert rows["image_id"].is_unique and r["patients"] == rows["patient_id"].nunique()
        if r["unit"] == "patient":  # worse eye: highest probability, positive when any image is
            rows = rows.groupby("patient_id").agg(target=("target", "max"), prob=("prob", "max"))
        assert len(rows) == r["n"]
        assert r["auc"] == pytest.approx(roc_auc_score(rows["target"], rows["prob"]), abs=1e-12)
        assert r["brier"] == pytest.approx(brier_score_loss(rows["target"], rows["prob"]), abs=1e-6)  # float32 sums
        assert r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
        assert [op["target_sensitivity"] for op in r["operating_points"]] == [0.9, 0.95]
    test_n = predictions[(predictions["model"] == "student") & (predictions["test_set"] == "eyepacs_test")]
    assert len(test_n) == 60  # every graded image of the ci test split
    assert {frozenset((d["model_a"], d["model_b"])) for d in metrics["delong"] if d["test_set"] == "external"} == {
        frozenset(("teacher", "student")), frozenset(("teacher", "supervised")), frozenset(("student", "supervised"))}
    for png in ("roc_eyepacs_test.png", "roc_external.png", "tsne.png"):
        assert Image.open(evaluation / png).size[0] > 300


def test_report_and_published_models(run):
    report = (run / "report.md").read_text()
    assert "Results (Table 1 layout)" in report and "student >= teacher > supervised" in report
    assert "figures/roc_external.png" in report and "| prepare |" in report
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and 'src="figures' not in page  # self-contained
    for name in ("teacher", "student", "supervised"):
        meta = json.loads((run / "models" / name / "meta.json").read_text())
        assert 0 <= meta["operating_point"]["threshold"] <= 1 and meta["preprocessing"]["size"] == 32
    (run / "report.html").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "jobs.cli", "report", str(run)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (run / "report.html").is_file()


def test_a_changed_downstream_setting_reuses_the_upstream_stages(run, ray_session):
    from jobs import pipeline

    cfg = load_config(CI, [f"run.dir={run}", f"distill.epochs={DISTILL_EPOCHS}", "student_finetune.epochs=1"])
    pipeline.run(cfg)
    assert statuses(invocations(run)[-1]) == {
        "prepare": "skipped", "pretrain": "skipped", "teacher": "skipped", "supervised": "skipped",
        "baselines": "not configured", "pseudolabel": "skipped", "distill": "skipped", "student": "ran", "oof": "not configured", "models": "ran", "evaluate": "ran",
        "report": "ran",
    }
    assert len(list(run.glob("student-*"))) == 2 and len(list(run.glob("evaluate-*"))) == 2


def test_predict_gives_every_image_a_row(run, tmp_path):
    folder = tmp_path / "clinic"
    (folder / "left").mkdir(parents=True)
    raw = sorted((REPO / "data" / "ci" / "raw" / "eyepacs" / "train").glob("*.jpeg"))[:3]
    for path in raw:
        shutil.copy(path, folder / "left" / path.name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    (folder / "truncated.jpeg").write_bytes(raw[0].read_bytes()[:600])
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(folder / "black.png")
    (folder / "notes.txt").write_text("not an image: a row that says so")
    out = tmp_path / "screening.csv"
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "predict", "--model", str(run / "models" / "student"),
                             "--images", str(folder), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {r["image_id"]: r for r in pacsv.read_csv(out).to_pylist()}
    assert set(rows) == {p.stem for p in raw} | {"corrupt", "truncated", "black", "notes"}
    assert rows["notes"]["status"] == "unsupported_format"
    threshold = json.loads((run / "models" / "student" / "meta.json").read_text())["operating_point"]["threshold"]
    for path in raw:
        r = rows[path.stem]
        assert r["status"] == "ok" and 0 <= r["prob"] <= 1 and r["referable"] == (r["prob"] >= threshold)
        assert r["path"] == f"left/{path.name}"
    for bad in ("corrupt", "truncated", "black"):
        assert rows[bad]["status"] != "ok" and rows[bad]["reason"] and rows[bad]["prob"] is None
    assert "3 ungradable" in result.stdout and "operating point" in result.stdout
    assert {rows[bad]["decision"] for bad in ("corrupt", "truncated", "black")} == {"ungradable: retake or refer"}


def test_table1_over_two_seeds_shares_the_pretraining_and_aggregates_the_seeds(run, ray_session):
    """`drray run table1` over labels.seed 0 and 1 on the finished pipeline run: the pipeline's
    pretraining serves both seeds (and seed 0 finds the pipeline's teacher, supervised baseline and
    pseudo-labels done in the stage cache); each seed's Table 1 rows
    carry their CI and DeLong p; RUN/table1.md gives the mean +- sd over the seeds and judges the
    ordering in each; the baselines publish their EMA weights; a rerun keeps the finished seeds."""
    import statistics

    import torch

    from jobs import table1

    # Fewer epochs for the stages both seeds train (the baselines; distillation too: seed 0 redoes
    # its 1 epoch and the student, seed 1 is spared 7) and no t-SNE: the second seed's cost.
    overrides = [f"run.dir={run}", "distill.epochs=1", "table1.seeds=[0, 1]", "fixmatch.epochs=1",
                 "mixmatch.epochs=1", "evaluate.tsne_images=0"]
    cmd = [sys.executable, "-m", "jobs.cli", "run", "table1", "--config", str(CI)] + [
        a for o in overrides for a in ("--set", o)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    seeds = {k: run / "seeds" / f"seed-{k}" for k in (0, 1)}
    assert len(list(run.glob("pretrain-*"))) == 1 and epochs_in(next(run.glob("pretrain-*"))) == [0, 1]  # trained once
    assert statuses(json.loads((run / "table1.json").read_text())["invocations"][-1]) == {
        "prepare": "skipped", "pretrain": "skipped", "seed-0": "ran", "seed-1": "ran"}
    first, second = (statuses(invocations(seeds[k])[-1]) for k in (0, 1))
    assert all(first[s] == "skipped" for s in ("pretrain", "teacher", "supervised", "pseudolabel"))  # the pipeline's
    assert first["baselines"] == first["supervised_100"] == first["evaluate"] == first["table1"] == "ran"
    assert second["pretrain"] == "skipped" and all(second[s] == "ran" for s in ("teacher", "supervised", "student"))
    table = pq.read_table(run / "table1.parquet").to_pylist()
    methods = ["supervised_100", "supervised", "mixmatch", "fixmatch", "teacher", "student"]
    assert [(r["seed"], r["method"]) for r in table] == [(k, m) for k in (0, 1) for m in methods for _ in range(2)]
    for k, folder in seeds.items():
        metrics = {(r["model"], r["test_set"]): r for r in json.loads((folder / "metrics.json").read_text())["results"]
                   if r["unit"] == "image"}
        for r in (r for r in table if r["seed"] == k):
            assert r["auc"] == metrics[(r["method"], r["test_set"])]["auc"] and r["ci_low"] <= r["auc"] <= r["ci_high"]
            assert (r["p_vs_student"] is None) == (r["method"] == "student") and r["paper_auc"] is not None
            assert (r["p_vs_teacher"] is None) == (r["method"] == "teacher")
    assert {r["labels"] for r in table if r["method"] == "supervised_100"} == {"100.0% (240 = 120 train + 120 validation)"}
    assert {r["labels"] for r in table if r["method"] == "fixmatch"} == {"33.3% (80 = 40 train + 40 validation)"}
    subsets = [json.loads((p / "subset.json").read_text())["labeled"] for p in run.glob("teacher-*")]
    assert len(subsets) == 2 and subsets[0] != subsets[1]  # two label draws
    md = (run / "table1.md").read_text()
    for method in methods:  # the mean +- sd over the seeds, from the per-seed numbers
        for test_set, column in (("eyepacs_test", 3), ("external", 4)):
            aucs = [r["auc"] for r in table if r["method"] == method and r["test_set"] == test_set]
            line = next(x for x in md.splitlines() if x.startswith(f"| {method} | "))
            assert line.split(" | ")[column].strip(" |") == f"{statistics.mean(aucs):.3f} +- {statistics.stdev(aucs):.3f} (2)"
    assert "EyePACS-style test: The paper's ordering (student >= teacher > supervised) holds in " in md
    assert re.search(r"Messidor-2-style external: The paper's ordering \(student >= teacher > supervised\) holds in "
                     r"[0-2] of 2 seeds .*Across the seeds: (it holds in every one|not established)", md)
    assert "| fixmatch |" in md and "| fixmatch |" in result.stdout and "every seed's AUC [95% CI]" in md
    assert "## Table 1 over label draws" in (run / "report.md").read_text()
    assert (seeds[1] / "report.md").is_file() and (seeds[1] / "labels.parquet").is_file()
    for stage in (*run.glob("fixmatch-*"), *run.glob("mixmatch-*")):  # the published weights are the EMA
        last = sorted(p for p in (run / "ray" / stage.name).glob("checkpoint_*") if p.is_dir())[-1]
        ema, raw = (torch.load(last / f, weights_only=True) for f in ("ema.pt", "model.pt"))
        published = torch.load(stage / "model" / "model.pt", weights_only=True)  # the last epoch's model
        key = next(k for k in published if k.endswith("conv1.weight"))
        assert torch.equal(published[key], ema[key]) and not torch.equal(published[key], raw[key])
    table1.run(load_config(CI, overrides))  # again: both seeds finished with these settings, kept
    assert statuses(json.loads((run / "table1.json").read_text())["invocations"][-1]) == {
        "prepare": "skipped", "pretrain": "skipped", "seed-0": "skipped", "seed-1": "skipped"}
    assert pq.read_table(run / "table1.parquet").to_pylist() == table
