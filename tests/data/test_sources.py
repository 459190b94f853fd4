"""Label readers and the join of image files with label rows."""

import pytest

from drray.data.sources import SourceError, collect_inputs, parse_grade


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def by_id(report):
    return {i.image_id: i for i in report.items}


def test_eyepacs_train_and_test_labels(tmp_path):
    touch(tmp_path / "train" / "10_left.jpeg")
    touch(tmp_path / "train" / "10_right.jpeg")
    touch(tmp_path / "test" / "1_left.jpeg")
    touch(tmp_path / "test" / "2_left.png")  # any common format, matched by stem
    (tmp_path / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,3\n")
    (tmp_path / "testLabels.csv").write_text("image,level,Usage\n1_left,2,Public\n2_left,1,Private\n")
    report = collect_inputs("eyepacs", tmp_path, ["trainLabels.csv", "testLabels.csv"])
    items = by_id(report)
    assert {k: (v.grade, v.split, v.reject) for k, v in items.items()} == {
        "10_left": (0, "train", None), "10_right": (3, "train", None),
        "1_left": (2, "test", None), "2_left": (1, "test", None),
    }
    assert report.label_rows == 4 and len(report.label_files) == 2


def test_every_label_problem_is_a_reject_with_its_reason(tmp_path):
    for name in ["ok", "bad_text", "bad_range", "bad_frac", "dup_same", "dup_conflict", "unlabeled"]:
        touch(tmp_path / "train" / f"{name}.jpeg")
    touch(tmp_path / "other" / "ok.png")  # a second file with the same id
    (tmp_path / "trainLabels.csv").write_text(
        "image,level\nok,1\nbad_text,severe\nbad_range,7\nbad_frac,2.5\n"
        "dup_same,2\ndup_same,2\ndup_conflict,1\ndup_conflict,3\nmissing_image,0\n"
    )
    report = collect_inputs("eyepacs", tmp_path, ["trainLabels.csv"])
    reasons = {(i.image_id, i.path is not None): (i.reject_kind, i.reject) for i in report.items
               if i.reject_kind != "duplicate_image"}
    assert reasons[("ok", True)][0] is None
    assert reasons[("bad_text", True)][0] == "bad_grade" and "'severe' is not a number" in reasons[("bad_text", True)][1]
    assert "trainLabels.csv:3" in reasons[("bad_text", True)][1]
    assert reasons[("bad_range", True)][0] == "bad_grade" and "outside 0-4" in reasons[("bad_range", True)][1]
    assert reasons[("bad_frac", True)][0] == "bad_grade"
    assert reasons[("dup_same", True)][0] is None and report.duplicate_label_rows == 2
    assert reasons[("dup_conflict", True)][0] == "conflicting_grades"
    assert "1 and 3" in reasons[("dup_conflict", True)][1]
    assert reasons[("missing_image", False)][0] == "image_missing"
    assert reasons[("unlabeled", True)] == (None, None)
    dup = [i for i in report.items if i.image_id == "ok" and i.reject_kind == "duplicate_image"]
    assert len(dup) == 1 and "has the same name" in dup[0].reject
    # every file and every label row without a file is exactly one input
    assert len(report.items) == 8 + 1


def test_messidor2_drops_ungradable_and_counts_it(tmp_path):
    touch(tmp_path / "images" / "20051019_38557_0100_PP.png")
    touch(tmp_path / "images" / "IM000123.JPG")
    touch(tmp_path / "images" / "IM000124.JPG")
    (tmp_path / "messidor_data.csv").write_text(
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "20051019_38557_0100_PP.png,2,1,1\nIM000123.JPG,0,0,1\nIM000124.JPG,,,0\n"
    )
    items = by_id(collect_inputs("messidor2", tmp_path, ["messidor_data.csv"]))
    assert items["20051019_38557_0100_PP"].grade == 2 and items["20051019_38557_0100_PP"].split == "test"
    assert items["IM000123"].grade == 0
    assert items["IM000124"].reject_kind == "ungradable"


def test_folder_source_with_optional_split(tmp_path):
    touch(tmp_path / "a.tif")
    touch(tmp_path / "b.jpg")
    (tmp_path / "labels.csv").write_text("image_id,grade,split\na.tif,4,test\nb,0,\n")
    items = by_id(collect_inputs("folder", tmp_path, ["labels.csv"]))
    assert (items["a"].grade, items["a"].split) == (4, "test")
    assert (items["b"].grade, items["b"].split) == (0, "train")


def test_missing_columns_and_files_are_clear_errors(tmp_path):
    (tmp_path / "trainLabels.csv").write_text("name,grade\nx,1\n")
    with pytest.raises(SourceError, match="missing column.*image.*level"):
        collect_inputs("eyepacs", tmp_path, ["trainLabels.csv"])
    with pytest.raises(SourceError, match="label file nope.csv not found"):
        collect_inputs("eyepacs", tmp_path, ["nope.csv"])
    with pytest.raises(SourceError, match="does not exist"):
        collect_inputs("eyepacs", tmp_path / "absent", [])
    with pytest.raises(SourceError, match="unknown source"):
        collect_inputs("kaggle", tmp_path, [])


@pytest.mark.parametrize("text, grade, reason", [
    ("0", 0, None), ("4", 4, None), ("2.0", 2, None), ("5", None, "outside 0-4"),
    ("-1", None, "outside 0-4"), ("1.5", None, "outside 0-4"), ("", None, "empty"), ("x", None, "not a number"),
])
def test_parse_grade(text, grade, reason):
    parsed, why = parse_grade(text)
    assert parsed == grade
    assert (why is None) if reason is None else (reason in why)


def test_fingerprint_changes_with_inputs(tmp_path):
    touch(tmp_path / "a.jpeg")
    (tmp_path / "l.csv").write_text("image_id,grade\na,1\n")
    first = collect_inputs("folder", tmp_path, ["l.csv"]).fingerprint
    assert collect_inputs("folder", tmp_path, ["l.csv"]).fingerprint == first
    touch(tmp_path / "b.jpeg")
    assert collect_inputs("folder", tmp_path, ["l.csv"]).fingerprint != first
