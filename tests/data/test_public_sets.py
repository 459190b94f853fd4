"""The public sets (APTOS 2019, IDRiD, DDR) on files laid out as they unpack, quirks included;
the macular-oedema risk (dme) from IDRiD and Messidor-2, and the positive class it makes
(referable_dme); one `drray prepare --source idrid` and `drray partition` end to end."""

import json
import typing
from collections import Counter

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from drray.config import Config, DataConfig, DatasetConfig, LabelsConfig, RunConfig
from drray.data.shards import read_manifest, shard_paths
from drray.data.sources import LAYOUTS, SOURCES, SourceError, collect_inputs
from drray.data.splits import binary_target
from drray.distributed.prepare import check_positive, ensure_prepared
from jobs.cli import SOURCE_CHOICES, main
from jobs.common import labeled_subset
from tests.data.test_fundus import frame
from tests.data.test_sources import by_id, prepare_here, touch, without_ray

GRADING = "B. Disease Grading"
IDRID_IMAGES = f"{GRADING}/1. Original Images"
IDRID_TRUTH = f"{GRADING}/2. Groundtruths"
# the real header: a trailing space, then empty columns
IDRID_HEADER = "Image name,Retinopathy grade,Risk of macular edema ,,,,,,,,"


def image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    frame(w=120, h=80, cx=60, cy=40, r=38, seed=seed).save(path)
    return path


def idrid_csv(path, rows):
    """As IDRiD ships it: CRLF, padded with empty columns, a padding row at the end."""
    lines = [IDRID_HEADER] + [f"{name},{grade},{dme},,,,,,,," for name, grade, dme in rows] + [",,,,,,,,,,"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())


@pytest.fixture
def idrid(tmp_path):
    root = tmp_path / "IDRiD"
    train, test = root / IDRID_IMAGES / "a. Training Set", root / IDRID_IMAGES / "b. Testing Set"
    for i, name in enumerate(["IDRiD_001", "IDRiD_002", "IDRiD_003"]):
        image(train / f"{name}.jpg", seed=i)
    for i, name in enumerate(["IDRiD_001", "IDRiD_002"]):  # the testing set reuses the names
        image(test / f"{name}.jpg", seed=10 + i)
    image(test / "IDRiD_099.jpg", seed=20)  # no label row: unlabeled, still a test image
    idrid_csv(root / IDRID_TRUTH / "a. IDRiD_Disease Grading_Training Labels.csv",
              [("IDRiD_001", 3, 2), ("IDRiD_002", 0, 0), ("IDRiD_003", 4, "")])
    idrid_csv(root / IDRID_TRUTH / "b. IDRiD_Disease Grading_Testing Labels.csv",
              [("IDRiD_001", 1, 0), ("IDRiD_002", 2, 7), ("IDRiD_004", 2, 1)])
    # the localisation part of the download holds the same photographs: not inputs of this set
    image(root / "C. Localization" / "1. Original Images" / "a. Training Set" / "IDRiD_001.jpg")
    return root


def test_idrid_ids_name_their_set_and_keep_the_macular_oedema_risk(idrid):
    report = collect_inputs("idrid", idrid, [])
    items = by_id(report)
    got = {k: (v.grade, v.dme, v.split, v.reject_kind) for k, v in items.items()}
    assert got == {
        "train/IDRiD_001": (3, 2, "train", None), "train/IDRiD_002": (0, 0, "train", None),
        "train/IDRiD_003": (4, None, "train", None),  # an empty risk: not graded
        "test/IDRiD_001": (1, 0, "test", None),
        "test/IDRiD_002": (None, None, "test", "bad_grade"),  # risk 7 is no risk IDRiD grades
        "test/IDRiD_099": (None, None, "test", None),
        "test/IDRiD_004": (None, None, "test", "image_missing"),
    }
    assert "macular-oedema risk 7 is outside 0-2" in items["test/IDRiD_002"].reject
    assert "Testing Labels.csv:3" in items["test/IDRiD_002"].reject
    assert report.label_rows == 6  # the padding rows are no label rows
    assert len(report.label_files) == 2 and all(p.is_file() for p in report.label_files)


def test_the_public_sets_name_no_patients_each_image_is_its_own(idrid, tmp_path):
    assert all(i.patient_id == i.image_id for i in collect_inputs("idrid", idrid, []).items)
    touch(tmp_path / "train_images" / "000c1434d8d7.png")
    (tmp_path / "train.csv").write_text("id_code,diagnosis\n000c1434d8d7,2\n")
    assert [i.patient_id for i in collect_inputs("aptos", tmp_path, []).items] == ["000c1434d8d7"]


def test_idrid_a_missing_label_file_names_the_expected_path(idrid):
    (idrid / IDRID_TRUTH / "b. IDRiD_Disease Grading_Testing Labels.csv").unlink()
    with pytest.raises(SourceError, match=r"label file .*2\. Groundtruths/b\. IDRiD_Disease Grading_Testing "
                                          r"Labels\.csv not found; --images must be the folder .* B\. Disease Grading/"):
        collect_inputs("idrid", idrid, [])
    with pytest.raises(SourceError, match=r"image folder .*1\. Original Images not found"):
        collect_inputs("idrid", idrid / GRADING, [])  # one level too deep
    with pytest.raises(SourceError, match="layout fixes its ids"):
        collect_inputs("idrid", idrid, [], id_from="path")


def test_aptos_test_images_are_the_unlabeled_pool(tmp_path):
    for i, name in enumerate(["000c1434d8d7", "001639a390f0", "0024cdab0c1e"]):
        touch(tmp_path / "train_images" / f"{name}.png", bytes([i]))
    touch(tmp_path / "train_images" / "notes.txt")
    touch(tmp_path / "test_images" / "0005cfc8afb6.png")
    touch(tmp_path / "test_images" / "003f0afdcd15.png")
    (tmp_path / "train.csv").write_text("id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n0024cdab0c1e,x\n")
    (tmp_path / "test.csv").write_text("id_code\n0005cfc8afb6\n003f0afdcd15\n00436515870c\n")
    (tmp_path / "sample_submission.csv").write_text("id_code,diagnosis\n0005cfc8afb6,0\n")  # not labels
    report = collect_inputs("aptos", tmp_path, [])
    got = {k: (v.grade, v.split, v.reject_kind) for k, v in by_id(report).items()}
    assert got == {
        "000c1434d8d7": (2, "train", None), "001639a390f0": (4, "train", None),
        "0024cdab0c1e": (None, "train", "bad_grade"), "notes": (None, "train", "unsupported_format"),
        "0005cfc8afb6": (None, "train", None), "003f0afdcd15": (None, "train", None),
        "00436515870c": (None, "train", "image_missing"),
    }
    assert [p.name for p in report.label_files] == ["train.csv", "test.csv"]
    # without test.csv and test_images/ (only the training part downloaded) it still reads
    (tmp_path / "test.csv").unlink()
    assert len(collect_inputs("aptos", tmp_path, []).items) == 6
    (tmp_path / "train.csv").unlink()
    with pytest.raises(SourceError, match=r"label file .*train\.csv not found.*train\.csv and train_images/"):
        collect_inputs("aptos", tmp_path, [])


def test_ddr_grade_5_is_ungradable_and_the_lists_are_no_inputs(tmp_path):
    grading = tmp_path / "DR_grading"
    lists = {"train": ["007-0004-000.jpg 0", "007-0007-000.jpg 5", "007-0008-000.jpg"],
             "valid": ["20170413102628830.jpg 2", ""], "test": ["007-1789-100.jpg 4", "007-1790-100.jpg 1"]}
    for split, lines in lists.items():
        for line in filter(None, lines):
            touch(grading / split / line.split()[0])
        (grading / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (grading / "test" / "007-1790-100.jpg").unlink()
    report = collect_inputs("ddr", tmp_path, [])
    got = {k: (v.grade, v.split, v.reject_kind) for k, v in by_id(report).items()}
    assert got == {
        "007-0004-000": (0, "train", None), "007-0007-000": (None, "train", "ungradable"),
        "007-0008-000": (None, "train", "bad_grade"), "20170413102628830": (2, "val", None),
        "007-1789-100": (4, "test", None), "007-1790-100": (None, "test", "image_missing"),
    }
    assert "ungradable (grade 5 in train.txt:2)" in by_id(report)["007-0007-000"].reject
    assert Counter(i.reject_kind for i in report.items)["unsupported_format"] == 0  # the .txt lists
    (grading / "valid.txt").unlink()
    with pytest.raises(SourceError, match=r"label file .*DR_grading/valid\.txt not found"):
        collect_inputs("ddr", tmp_path, [])
    # --labels given: read instead of the layout's own
    assert {i.image_id for i in collect_inputs("ddr", tmp_path, ["DR_grading/test.txt"]).items
            if i.grade is not None} == {"007-1789-100"}


def test_messidor2_keeps_the_adjudicated_dme(tmp_path):
    for name in ["a", "b", "c"]:
        touch(tmp_path / f"{name}.png")
    (tmp_path / "m.csv").write_text("image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
                                    "a.png,2,1,1\nb.png,0,0,1\nc.png,1,0,1\nc.png,1,1,1\n")
    items = by_id(collect_inputs("messidor2", tmp_path, ["m.csv"]))
    assert (items["a"].dme, items["b"].dme) == (1, 0)
    assert items["c"].reject_kind == "conflicting_grades" and "macular-oedema risks 0 and 1" in items["c"].reject


def test_every_source_is_offered_everywhere():
    assert SOURCE_CHOICES == SOURCES == typing.get_args(typing.get_type_hints(DatasetConfig)["source"])
    assert set(LAYOUTS) <= set(SOURCES)


@pytest.mark.ray
def test_prepare_and_partition_idrid_end_to_end(ray_session, idrid, tmp_path):
    out, part = tmp_path / "prepared", tmp_path / "idrid-partition.csv"
    args = ["prepare", "--source", "idrid", "--images", str(idrid), "--out", str(out), "--size", "32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(shard_paths(out)[0], columns=["image_id", "grade", "dme", "split"]).to_pylist()
    assert {r["image_id"]: (r["grade"], r["dme"], r["split"]) for r in rows} == {
        "train/IDRiD_001": (3, 2, "train"), "train/IDRiD_002": (0, 0, "train"), "train/IDRiD_003": (4, None, "train"),
        "test/IDRiD_001": (1, 0, "test"), "test/IDRiD_099": (None, None, "test")}
    counts = read_manifest(out)["counts"]
    assert counts["inputs"] == counts["prepared"] + counts["rejected"] == 7
    # IDRiD publishes no patients: each image its own, through Ray Data into the shards
    patients = pq.read_table(shard_paths(out)[0], columns=["image_id", "patient_id"]).to_pylist()
    assert all(r["patient_id"] == r["image_id"] for r in patients) and counts["patients"] == 5
    assert counts["rejected_by_reason"] == {"bad_grade": 1, "image_missing": 1}

    # a partition of the prepared set, by file, used to prepare again: its splits, checked by hash
    result = CliRunner().invoke(main, ["partition", "--prepared", str(out), "--test-fraction", "0.4",
                                       "--out", str(part)])
    assert result.exit_code == 0, result.output
    manifest = json.loads(part.with_suffix(".manifest.json").read_text())
    assert manifest["counts"]["images"] == 5 and manifest["seed"] == 0
    result = CliRunner().invoke(main, args + ["--partition", str(part)])
    assert result.exit_code == 0, result.output
    splits = {r["image_id"]: r["split"] for r in pq.read_table(shard_paths(out)[0], columns=["image_id", "split"]).to_pylist()}
    assert splits == dict(line.split(",") for line in part.read_text().split()[1:])
    part.write_text(part.read_text().replace("test/IDRiD_099,", "test/IDRiD_098,"))
    result = CliRunner().invoke(main, args + ["--partition", str(part)])
    assert result.exit_code != 0 and "its ids are not the ones idrid-partition.manifest.json records" in result.output


def messidor2(root, rows):
    """A Messidor-2 folder: (name, grade, dme) rows, all gradable."""
    for i, (name, _, _) in enumerate(rows):
        image(root / "images" / name, seed=i)
    (root / "messidor_data.csv").write_text(
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        + "".join(f"{name},{grade},{dme},1\n" for name, grade, dme in rows))
    return root


def test_referable_dme_counts_macular_oedema_and_is_refused_where_none_is_graded(monkeypatch, tmp_path):
    images = messidor2(tmp_path / "m", [("a.png", 0, 1), ("b.png", 0, 0), ("c.png", 2, 0), ("d.png", 1, ""),
                                        ("e.png", 1, 1)])
    rows, _ = prepare_here(monkeypatch, "messidor2", images, ["messidor_data.csv"], tmp_path / "pm")
    # as evaluation reads a prepared set: binary_target(grade, positive, dme)
    targets = {k: binary_target(r["grade"], "referable_dme", r.get("dme")) for k, r in rows.items()}
    assert targets == {"a": 1, "b": 0, "c": 1, "d": 0, "e": 1}  # a: grade 0, DME 1; d: DME not graded
    assert {k: binary_target(r["grade"], "referable", r["dme"]) for k, r in rows.items()}["a"] == 0
    check_positive("external", DatasetConfig(source="messidor2", prepared=str(tmp_path / "pm")), "referable_dme")

    eyepacs = tmp_path / "e"
    for i, name in enumerate(["10_left", "10_right"]):
        image(eyepacs / "train" / f"{name}.jpeg", seed=i)
    (eyepacs / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,3\n")
    ds = DatasetConfig(source="eyepacs", images=str(eyepacs), labels=("trainLabels.csv",),
                       prepared=str(tmp_path / "pe"))
    without_ray(monkeypatch)
    cfg = Config(data=DataConfig(size=32, positive="referable_dme", eyepacs=ds))
    with pytest.raises(ValueError) as error:  # where a run first reads the set: before any training
        ensure_prepared("eyepacs", ds, cfg)
    message = str(error.value)
    assert "data.eyepacs (eyepacs" in message and "records no DME" in message and "2 labeled images" in message
    assert "idrid: Risk of macular edema 0-2" in message and "messidor2: adjudicated_dme 0-1" in message
    assert "data.positive=referable" in message
    ensure_prepared("eyepacs", ds, Config(data=DataConfig(size=32, eyepacs=ds)))  # referable: fine


def test_the_labeled_subset_takes_whole_patients_and_their_dme(monkeypatch, tmp_path):
    images = tmp_path / "clinic"
    names = ["a", "b", "c", "d", "e", "f"]
    for i, name in enumerate(names):
        image(images / f"{name}.png", seed=i)
    (images / "labels.csv").write_text("image_id,grade,patient_id,dme\n" + "".join(
        f"{n},{g},{p},{d}\n" for n, g, p, d in zip(names, [0, 0, 2, 1, 0, 0], ["p1", "p1", "p2", "p2", "p3", "p4"],
                                                    [1, 0, 0, 0, 0, ""], strict=True)))
    ds = DatasetConfig(source="folder", images=str(images), labels=("labels.csv",), prepared=str(tmp_path / "p"))
    prepare_here(monkeypatch, "folder", images, ["labels.csv"], ds.prepared)
    patient = {"a": "p1", "b": "p1", "c": "p2", "d": "p2", "e": "p3", "f": "p4"}
    for seed in range(8):
        cfg = Config(data=DataConfig(positive="referable_dme", eyepacs=ds),
                     labels=LabelsConfig(count=4, seed=seed, validation=0.5), run=RunConfig(dir=str(tmp_path / "run")))
        subset = labeled_subset(cfg)
        for part in (subset.labeled, subset.validation):
            assert {i for i in patient if patient[i] in {patient[j] for j in part}} == set(part)  # whole patients
        assert subset.labeled and subset.used in (4, 5)
        expected = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0, "e": 0.0, "f": 0.0}  # a: grade 0, DME 1
        assert {**subset.labeled, **subset.validation} == {i: expected[i] for i in {**subset.labeled, **subset.validation}}
