"""The public sets (APTOS 2019, IDRiD, DDR) on files laid out as they unpack, quirks included;
the macular-oedema risk (dme) from IDRiD and Messidor-2; one `drray prepare --source idrid`
and `drray partition` end to end."""

import json
import typing
from collections import Counter

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from drray.config import DatasetConfig
from drray.data.shards import read_manifest, shard_paths
from drray.data.sources import LAYOUTS, SOURCES, SourceError, collect_inputs
from jobs.cli import SOURCE_CHOICES, main
from tests.data.test_fundus import frame
from tests.data.test_sources import by_id, touch

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
