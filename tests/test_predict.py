"""`drray predict` for a clinic: a decision for every file, the model and operating point named in
every row, ungradable photographs never negative, grayscale and red-free flagged, and the wrong
folder answered with what to pass instead. A tiny real classifier, no Ray: seconds."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pyarrow.csv as pacsv
import pytest
from click.testing import CliRunner
from PIL import Image

from drray.data.prepare import PrepareParams
from drray.data.synthetic import EYEPACS_CAMERA, render_fundus
from drray.engine.checkpoint import save_checkpoint
from drray.engine.model import ModelSpec
from jobs.cli import main
from jobs.predict import NO_REFERRAL, NOT_A_PHOTOGRAPH, REFER, UNGRADABLE, colour_warning

SIZE = 64


def _model(folder, kind="classifier", operating_point=None):
    spec = ModelSpec(kind=kind, backbone="resnet18", image_size=SIZE)
    extra = {"preprocessing": dataclasses.asdict(PrepareParams(size=SIZE))}
    if operating_point:
        extra["operating_point"] = operating_point
    return save_checkpoint(folder, model=spec.build(pretrained=False), spec=spec, epoch=1, metrics={}, extra=extra)


@pytest.fixture(scope="module")
def clinic(tmp_path_factory):
    """Two colour photographs, a grayscale and a red-free copy, a black frame, a broken file."""
    folder = tmp_path_factory.mktemp("clinic")
    rng = np.random.default_rng(0)
    colour = [render_fundus(rng, grade, "left", EYEPACS_CAMERA) for grade in (0, 3)]
    for i, image in enumerate(colour):
        image.save(folder / f"colour{i}.jpg", quality=95)
    colour[0].convert("L").save(folder / "gray.png")
    r, g, b = colour[1].split()
    Image.merge("RGB", (r.point(lambda v: v // 8), g, b.point(lambda v: v // 8))).save(folder / "redfree.png")
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(folder / "black.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "notes.txt").write_text("referral letters in the other folder")
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes((folder / "colour0.jpg").read_bytes())  # not UTF-8
    return folder


def _predict(model, images, out, *extra):
    return CliRunner().invoke(main, ["predict", "--model", str(model), "--images", str(images), "--out", str(out),
                                     *extra])


def test_every_row_names_its_decision_model_and_operating_point(tmp_path, clinic):
    point = {"threshold": 0.5, "target_sensitivity": 0.9, "chosen_on": "validation", "validation_images": 40}
    model = _model(tmp_path / "student", operating_point=point)
    out = tmp_path / "screening.csv"
    result = _predict(model, clinic, out)
    assert result.exit_code == 0, result.output
    rows = {r["image_id"]: r for r in pacsv.read_csv(out).to_pylist()}
    assert set(rows) == {"colour0", "colour1", "gray", "redfree", "black", "broken", "notes", "caf\\xe9"}
    weights = hashlib.sha256((model / "model.pt").read_bytes()).hexdigest()
    for r in rows.values():
        assert r["model"] == str(model.resolve()) and r["model_sha256"] == weights
        assert r["operating_point"] == "90% sensitivity on validation" and r["threshold"] == 0.5
    assert rows["caf\\xe9"]["path"] == "caf\\xe9.jpg" and rows["caf\\xe9"]["prob"] == pytest.approx(rows["colour0"]["prob"])
    assert rows["notes"]["decision"] == NOT_A_PHOTOGRAPH and rows["notes"]["status"] == "unsupported_format"
    for name in ("colour0", "colour1", "gray", "redfree"):
        r = rows[name]
        assert r["status"] == "ok" and r["decision"] == (REFER if r["prob"] >= 0.5 else NO_REFERRAL)
    for name in ("black", "broken"):
        assert rows[name]["decision"] == UNGRADABLE and rows[name]["prob"] is None and rows[name]["reason"]
    assert "grayscale" in rows["gray"]["warning"] and "red-free" in rows["redfree"]["warning"]
    assert not rows["colour0"]["warning"] and not rows["colour1"]["warning"]  # CSV: empty
    assert "2 ungradable" in result.output and weights[:12] in result.output


def test_a_threshold_given_or_missing_is_named_in_the_rows(tmp_path, clinic):
    import pyarrow.parquet as pq

    model = _model(tmp_path / "m")  # evaluated never: no stored operating point
    out = clinic / "screened.parquet"  # inside the folder it screens: never an input
    try:
        assert _predict(model, clinic, out).exit_code == 0
        assert set(pq.read_table(out)["operating_point"].to_pylist()) == {"untuned 0.5"}
        assert _predict(model, clinic, out, "--threshold", "0.3").exit_code == 0  # its own earlier table: replaced
        table = pq.read_table(out)
        assert set(table["operating_point"].to_pylist()) == {"--threshold 0.3"}
        assert "screened" not in table["image_id"].to_pylist()
    finally:
        out.unlink(missing_ok=True)


def test_the_wrong_folder_gets_told_what_to_pass(tmp_path, clinic):
    out = tmp_path / "x.csv"
    encoder = _model(tmp_path / "pretrain" / "model", kind="simclr")
    result = _predict(encoder, clinic, out)
    assert result.exit_code == 1 and "SimCLR" in result.output and "RUN/models/student" in result.output
    stage = tmp_path / "teacher-abc"
    _model(stage / "best")
    result = _predict(stage, clinic, out)
    assert result.exit_code == 1 and "stage directory" in result.output and str(stage / "best") in result.output
    run = tmp_path / "run"
    _model(run / "models" / "student")
    result = _predict(run, clinic, out)
    assert result.exit_code == 1 and "run directory" in result.output and str(run / "models" / "student") in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_colour_warning_reads_colour_not_brightness():
    rng = np.random.default_rng(1)
    fundus = np.zeros((3, 32, 32), np.uint8)
    fundus[0, 4:28, 4:28] = rng.integers(150, 220, (24, 24))
    fundus[1, 4:28, 4:28] = rng.integers(60, 100, (24, 24))
    fundus[2, 4:28, 4:28] = rng.integers(20, 40, (24, 24))
    assert colour_warning(fundus) is None
    assert colour_warning(fundus // 3) is None  # a dark colour photograph is still colour
    gray = np.repeat(fundus[1:2], 3, axis=0)
    assert "grayscale" in colour_warning(gray)
    assert "red-free" in colour_warning(fundus[[2, 1, 2]])


def test_a_patient_is_decided_by_the_worse_eye_and_never_cleared_with_an_ungradable_one(tmp_path, clinic):
    import shutil

    folder = tmp_path / "eyes"
    folder.mkdir()
    for name, source in (("7_left.jpg", "colour0.jpg"), ("7_right.jpg", "broken.jpg"), ("8_left.jpg", "colour0.jpg"),
                         ("8_right.jpg", "colour1.jpg"), ("scan_a.jpg", "colour0.jpg"), ("scan_b.jpg", "colour1.jpg")):
        shutil.copy(clinic / source, folder / name)
    (folder / "notes.txt").write_text("not a photograph: not a patient's eye")
    patients = tmp_path / "patients.csv"
    patients.write_text("image_id,patient_id\nscan_a,A\nscan_b,A\n")
    model = _model(tmp_path / "m")
    out = tmp_path / "screening.csv"

    def decide(threshold):
        result = _predict(model, folder, out, "--threshold", str(threshold), "--patients", str(patients))
        assert result.exit_code == 0, result.output
        images = {r["image_id"]: r for r in pacsv.read_csv(out).to_pylist()}
        assert images["7_left"]["patient_id"] == "7" and images["scan_b"]["patient_id"] == "A"
        return {r["patient_id"]: r for r in pacsv.read_csv(tmp_path / "screening.patients.csv").to_pylist()}

    never = decide(1.0)  # no probability reaches 1: every graded eye is "no referral"
    assert set(never) == {"7", "8", "A"}  # notes.txt is no one's eye
    assert never["7"]["decision"] == "refer: ungradable" and (never["7"]["graded"], never["7"]["ungradable"]) == (1, 1)
    assert never["8"]["decision"] == NO_REFERRAL and never["8"]["images"] == 2
    assert never["A"]["decision"] == NO_REFERRAL
    always = decide(0.0)
    assert {p: r["decision"] for p, r in always.items()} == {"7": REFER, "8": REFER, "A": REFER}
    assert always["8"]["worse_image"] in ("8_left", "8_right")
    assert always["8"]["max_prob"] == pytest.approx(max(r["prob"] for r in pacsv.read_csv(out).to_pylist()
                                                        if r["patient_id"] == "8"), rel=1e-6)
