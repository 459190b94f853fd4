"""A hospital's label budget: a folder data set in which only K training images have a grade
(the rest of the train split is unlabeled) and none is spared for validation (labels.validation 0). The pipeline runs end to
end on all K on real Ray, no stage reads a training label outside them, and the operating point
is chosen out of fold on those K, never on a test set."""

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from drray.config import load_config
from drray.metrics import OUT_OF_FOLD
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CI = REPO / "configs" / "ci.yaml"
RAW = REPO / "data" / "ci" / "raw" / "eyepacs"


def graded_few(raw: Path, out: Path, positives: int = 5, negatives: int = 9) -> set[str]:
    """The ci EyePACS-style photographs as a ``folder`` data set (one CSV: image_id, grade,
    split, patient_id) in which only a few whole patients of the train split keep their grade
    (some referable): the other training images are listed with an empty grade, unlabeled. The
    test split keeps its grades. Returns the graded training images."""
    train = list(csv.DictReader((raw / "trainLabels.csv").open()))
    test = list(csv.DictReader((raw / "testLabels.csv").open()))
    patients = defaultdict(list)
    for row in train:
        patients[row["image"].split("_")[0]].append(row)
    referable = sorted(p for p, eyes in patients.items() if max(int(r["level"]) for r in eyes) >= 2)
    healthy = sorted(p for p in patients if p not in referable)
    keep = set(referable[:positives] + healthy[:negatives])
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image_id", "grade", "split", "patient_id"])
        writer.writeheader()
        for split, rows in (("train", train), ("test", test)):
            for row in rows:
                patient = row["image"].split("_")[0]
                graded = split == "test" or patient in keep
                writer.writerow({"image_id": row["image"], "grade": row["level"] if graded else "", "split": split,
                                 "patient_id": patient})
    return {r["image"] for p in keep for r in patients[p]}


@pytest.fixture(scope="module")
def budget(tmp_path_factory, ray_session):
    """The pipeline on the few-graded copy, oof.folds 2 for the teacher (its chain: the teacher
    retrained per fold from the one pretraining); returns the run directory and the K images."""
    from jobs.runner import pipeline_steps, run_steps
    from jobs.stages import check_oof

    tmp = tmp_path_factory.mktemp("budget")
    # the ci raw set is made by the first run that needs it
    made = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "prepare", "--config", str(CI),
                           "--set", f"run.dir={tmp / 'prepare'}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    graded = graded_few(RAW, tmp / "labels.csv")
    cfg = load_config(CI, [
        f"run.dir={tmp / 'run'}", "data.eyepacs.source=folder", "data.eyepacs.synthetic=null",
        f"data.eyepacs.prepared={tmp / 'prepared'}", f"data.eyepacs.labels=[{tmp / 'labels.csv'}]",
        "labels.count=null", "labels.fraction=1.0", "labels.validation=0", "oof.folds=2", "oof.models=[teacher]"])
    check_oof(cfg)
    run_steps(cfg, pipeline_steps())
    return cfg, tmp / "run", graded


def test_only_the_graded_images_are_read_and_every_one_is_trained_on(budget):
    cfg, run, graded = budget
    from drray.data.shards import read_index

    train = [r for r in read_index(cfg.data.eyepacs.prepared).to_pylist() if r["split"] == "train"]
    assert {r["image_id"] for r in train if r["grade"] is not None} == graded  # the data has K labels, no more
    assert sum(r["grade"] is None for r in train) > 150  # the rest of the pool is unlabeled
    spent = pq.read_table(run / "labels.parquet").to_pylist()
    assert {r["image_id"] for r in spent} == graded and {r["role"] for r in spent} == {"train"}
    for name in ("teacher", "supervised", "student"):
        meta = json.loads((run / "models" / name / "meta.json").read_text())
        subset = json.loads((Path(meta["source"]).parent / "subset.json").read_text())
        assert set(subset["labeled"]) == graded and subset["validation"] == []
    predictions = pq.read_table(next(run.glob("evaluate-*")) / "predictions.parquet").to_pandas()
    assert "validation" not in set(predictions["test_set"])  # nothing to validate on


def test_each_fold_trains_on_the_others_and_predicts_its_own(budget):
    cfg, run, graded = budget
    folds = {}
    for stage in run.glob("teacher-*"):
        subset = json.loads((stage / "subset.json").read_text())
        if "heldout" in subset:  # a fold's teacher; the full-budget one holds none out
            assert set(subset["labeled"]) | set(subset["heldout"]) == graded
            assert not set(subset["labeled"]) & set(subset["heldout"])
            folds[stage.name] = set(subset["heldout"])
    assert len(folds) == 2 and set.union(*folds.values()) == graded
    assert len(list(run.glob("pretrain-*"))) == 1  # the folds share the pretraining: it reads no label
    oof = pq.read_table(next(run.glob("oof-*")) / "oof_predictions.parquet").to_pandas()
    assert set(oof["model"]) == {"teacher"} and sorted(oof["image_id"]) == sorted(graded)
    assert oof.groupby(oof["image_id"].str.split("_").str[0])["fold"].nunique().max() == 1  # whole patients
    assert {frozenset(g["image_id"]) for _, g in oof.groupby("fold")} == {frozenset(f) for f in folds.values()}


def test_the_operating_point_is_chosen_out_of_fold_and_goes_with_the_model(budget):
    cfg, run, graded = budget
    metrics = json.loads((run / "metrics.json").read_text())
    point = metrics["operating_points"]["teacher"]
    assert point["chosen_on"] == OUT_OF_FOLD and point["validation_images"] == len(graded)
    assert set(metrics["operating_points"]) == {"teacher"}  # oof.models: the others have none
    meta = json.loads((run / "models" / "teacher" / "meta.json").read_text())
    assert meta["operating_point"] == point
    assert "on out-of-fold predictions" in (run / "report.md").read_text()
    record = json.loads((run / "pipeline.json").read_text())["invocations"][-1]
    assert {s["stage"]: s["status"] for s in record["stages"]}["oof"] == "ran"
