"""Label readers and the join of image files with label rows."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from drray.data.prepare import PrepareParams, prepare_rows
from drray.data.shards import SHARD_SCHEMA, read_index, read_manifest, shard_paths
from drray.data.sources import SourceError, collect_inputs, parse_grade
from drray.distributed import prepare as dp
from jobs.cli import main
from tests.data.test_fundus import frame


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
    ("-1", None, "outside 0-4"), ("1.5", None, "outside 0-4"), ("", None, None), ("x", None, "not a number"),
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


def os_path(folder, name: bytes):
    """A path whose file name is these bytes, as Python holds it (os.fsdecode)."""
    return folder / os.fsdecode(name)


def test_a_file_name_that_is_not_utf8_is_prepared_and_matched(tmp_path):
    """Bytes caf\xe9.jpg (latin-1) on Linux: the id is read as a latin-1 label CSV is, the
    image is prepared, and every string that reaches Parquet is valid UTF-8."""
    frame().save(os_path(tmp_path, b"caf\xe9.jpg"), format="JPEG")
    touch(os_path(tmp_path, b"caf\xe9.txt"))
    (tmp_path / "labels.csv").write_bytes("image_id,grade\ncafé.jpg,2\n".encode("latin-1"))
    report = collect_inputs("folder", tmp_path, ["labels.csv"])
    image, text = sorted(report.items, key=lambda i: i.path)
    assert (image.image_id, image.grade, image.reject) == ("café", 2, None)
    assert text.reject_kind == "unsupported_format" and ".txt files are not images" in text.reject
    table = prepare_rows([vars(image)], PrepareParams(size=32))
    row = table.to_pylist()[0]
    assert row["kind"] is None and row["image"]
    assert row["path"] == str(tmp_path / "caf\\xe9.jpg")  # printable: the byte as \xe9
    # the way it travels through Ray Data: the path as bytes
    moved = {**vars(image), "path": os.fsencode(image.path)}
    assert prepare_rows([moved], PrepareParams(size=32)).to_pylist()[0]["kind"] is None
    pa.table({"path": [row["path"]], "image_id": [image.image_id]})  # encodes: valid UTF-8


def test_a_latin1_label_csv_is_read_and_matched(tmp_path):
    touch(tmp_path / "zoë.jpg")
    touch(tmp_path / "rene\u0301.png")  # decomposed, as macOS writes names
    (tmp_path / "labels.csv").write_bytes("image_id,grade\nzoë.jpg,1\nrené,3\n".encode("latin-1"))
    items = by_id(collect_inputs("folder", tmp_path, ["labels.csv"]))
    assert {k: (v.grade, v.reject) for k, v in items.items()} == {"zoë": (1, None), "rené": (3, None)}


def test_every_file_is_an_input_and_unsupported_ones_are_rejects(tmp_path):
    frame().save(tmp_path / "eye.webp")
    touch(tmp_path / "sub" / "README.txt")
    touch(tmp_path / "Thumbs.db")
    touch(tmp_path / "notes")  # no extension
    touch(tmp_path / "other.csv")  # a CSV that was not given as labels is a file like any other
    touch(tmp_path / ".DS_Store")  # hidden files and folders are not inputs
    touch(tmp_path / ".git" / "config")
    (tmp_path / "labels.csv").write_text("image_id,grade\neye.webp,2\nREADME,1\n")
    items = collect_inputs("folder", tmp_path, ["labels.csv"]).items
    kinds = {os.path.basename(i.path or "-"): (i.image_id, i.reject_kind) for i in items}
    assert kinds == {
        "eye.webp": ("eye", None), "README.txt": ("README", "unsupported_format"),
        "Thumbs.db": ("Thumbs", "unsupported_format"), "notes": ("notes", "unsupported_format"),
        "other.csv": ("other", "unsupported_format"),
        "-": ("README", "image_missing"),  # the label row: a .txt file is no image for it
    }
    reasons = {os.path.basename(i.path): i.reject for i in items if i.path}
    assert "unsupported format: .db files are not images drray reads" in reasons["Thumbs.db"]
    assert ".webp" in reasons["Thumbs.db"] and "without an extension" in reasons["notes"]
    webp = next(i for i in items if i.image_id == "eye")
    assert webp.grade == 2
    assert prepare_rows([vars(webp)], PrepareParams(size=32)).to_pylist()[0]["kind"] is None  # read


def test_id_from_path_tells_apart_files_of_different_folders(tmp_path):
    touch(tmp_path / "patientA" / "left.jpg")
    touch(tmp_path / "patientB" / "left.jpg")
    touch(tmp_path / "patientB" / "right.png")
    (tmp_path / "labels.csv").write_text(
        "image_id,grade\npatientA/left.jpg,1\npatientB/left,3\npatientB\\right.png,0\n")
    report = collect_inputs("folder", tmp_path, ["labels.csv"], id_from="path")
    items = by_id(report)
    assert {k: (v.grade, v.reject) for k, v in items.items()} == {
        "patientA/left": (1, None), "patientB/left": (3, None), "patientB/right": (0, None)}
    stem = collect_inputs("folder", tmp_path, [], id_from="stem")
    dup = [i for i in stem.items if i.reject_kind == "duplicate_image"]
    assert len(dup) == 1 and "--id-from path" in dup[0].reject
    assert stem.fingerprint != collect_inputs("folder", tmp_path, [], id_from="path").fingerprint
    with pytest.raises(SourceError, match="unknown id_from 'name': choose one of stem, path"):
        collect_inputs("folder", tmp_path, [], id_from="name")


def test_csv_splits_are_normalised_and_unknown_ones_rejected(tmp_path):
    names = ["a", "b", "c", "d", "e", "f"]
    for name in names:
        touch(tmp_path / f"{name}.jpg")
    (tmp_path / "labels.csv").write_text(
        "image_id,grade,split\na,0,Test\nb,1, TEST \nc,2,valid\nd,3,Validation\ne,4,\nf,0,holdout\n")
    items = by_id(collect_inputs("folder", tmp_path, ["labels.csv"]))
    assert {k: items[k].split for k in "abcde"} == {"a": "test", "b": "test", "c": "val", "d": "val", "e": "train"}
    assert items["f"].reject_kind == "bad_split"
    assert "split 'holdout' is not one of train, val, test" in items["f"].reject
    assert "labels.csv:7" in items["f"].reject


def test_an_empty_grade_is_unlabeled(tmp_path):
    for name in ["a", "b", "c"]:
        touch(tmp_path / f"{name}.jpg")
    (tmp_path / "labels.csv").write_text("image_id,grade,split\na,,test\nb, \nc,\nc,2\n")
    items = by_id(collect_inputs("folder", tmp_path, ["labels.csv"]))
    assert {k: (v.grade, v.split, v.reject) for k, v in items.items()} == {
        "a": (None, "test", None), "b": (None, "train", None),
        "c": (2, "train", None),  # an empty grade says nothing: the other row labels it
    }


# ---------------------------------------------------------------------------------------------
# Patients: every shard row names one
# ---------------------------------------------------------------------------------------------


def without_ray(monkeypatch):
    """drray prepare's driver as it is (items -> todo rows -> prepare_rows -> shards, rejects,
    manifest), the Ray Data map run in this process: the contract's plumbing in a second."""
    monkeypatch.setattr(dp, "ensure_ray", lambda num_cpus=None: None)
    monkeypatch.setattr(dp, "_run_pipeline", lambda todo, params, batch_size: iter([prepare_rows(todo, params)]))


def prepare_here(monkeypatch, source, images, labels, out, **kwargs):
    """``drray prepare`` without Ray; the shards' rows by id and the manifest's counts."""
    without_ray(monkeypatch)
    manifest = dp.prepare_source(source=source, images=images, labels=labels, out=out,
                                 params=PrepareParams(size=32), **kwargs)
    return {r["image_id"]: r for r in read_index(out).to_pylist()}, manifest["counts"]


def test_eyepacs_patients_come_from_the_ids_and_others_are_their_own(monkeypatch, tmp_path):
    images = tmp_path / "eyepacs"
    (images / "train").mkdir(parents=True)
    for i, name in enumerate(["10_left", "10_right", "11_left", "IM000123", "12_lefty"]):
        frame(seed=i).save(images / "train" / f"{name}.jpeg")
    (images / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,2\n11_left,1\n")
    rows, counts = prepare_here(monkeypatch, "eyepacs", images, ["trainLabels.csv"], tmp_path / "out")
    assert {k: r["patient_id"] for k, r in rows.items()} == {
        "10_left": "10", "10_right": "10", "11_left": "11", "IM000123": "IM000123", "12_lefty": "12_lefty"}
    assert counts["prepared"] == 5 and counts["patients"] == 4
    schema = pq.read_schema(shard_paths(tmp_path / "out")[0])
    assert schema.field("patient_id").type == pa.string() and not schema.field("patient_id").nullable
    assert schema.equals(SHARD_SCHEMA)
    # the rule is the one prepare_rows falls back on for a row without a patient (drray predict's)
    assert prepare_rows([{"image_id": "7_right", "path": None}], PrepareParams(size=32)).to_pylist()[0][
        "patient_id"] == "7"


def test_a_folder_csv_names_patients_and_dme(monkeypatch, tmp_path):
    images = tmp_path / "clinic"
    images.mkdir()
    for i, name in enumerate(["a", "b", "c", "d", "10_left"]):
        frame(seed=i).save(images / f"{name}.png")
    (images / "labels.csv").write_text(
        "image_id,grade,split,patient_id,dme\na.png,0,,p1,1\nb,2,,p1,0\nc,1,test,,\n"
        "d,1,,p2,\nd,1,,p3,\n10_left,0,,,2\n")
    items = by_id(collect_inputs("folder", images, ["labels.csv"]))
    assert items["d"].reject_kind == "conflicting_grades" and "conflicting patients p2 and p3" in items["d"].reject
    rows, counts = prepare_here(monkeypatch, "folder", images, ["labels.csv"], tmp_path / "out")
    assert {k: (r["patient_id"], r["dme"], r["split"]) for k, r in rows.items()} == {
        "a": ("p1", 1, "train"), "b": ("p1", 0, "train"), "c": ("c", None, "test"),  # empty: its own
        "10_left": ("10", 2, "train")}  # no patient_id: the EyePACS rule, as everywhere
    assert counts["patients"] == 3


def test_a_messidor2_exam_file_groups_its_images(monkeypatch, tmp_path):
    images = tmp_path / "messidor"
    names = ["20051019_38557_0100_PP.png", "20051019_38558_0100_PP.png", "IM000123.JPG", "IM000124.JPG"]
    (images / "images").mkdir(parents=True)
    for i, name in enumerate(names):
        frame(seed=i).save(images / "images" / name, format="PNG" if name.endswith("png") else "JPEG")
    (images / "messidor_data.csv").write_text(
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        + "".join(f"{n},{g},{d},1\n" for n, g, d in zip(names, [0, 2, 1, 0], [1, 0, 0, 0], strict=True)))
    # the exam file: ids with or without the extension, as label rows name images; inside --images
    (images / "exams.csv").write_text("image_id,patient_id\n20051019_38557_0100_PP.png,exam1\n"
                                      "20051019_38558_0100_PP,exam1\nIM000123.JPG,exam2\n")
    out = tmp_path / "out"
    without_ray(monkeypatch)
    result = CliRunner().invoke(main, ["prepare", "--source", "messidor2", "--images", str(images), "--labels",
                                       "messidor_data.csv", "--patients", "exams.csv", "--out", str(out),
                                       "--size", "32"])
    assert result.exit_code == 0, result.output
    rows = {r["image_id"]: r for r in read_index(out).to_pylist()}
    assert {k: (r["patient_id"], r["dme"]) for k, r in rows.items()} == {
        "20051019_38557_0100_PP": ("exam1", 1), "20051019_38558_0100_PP": ("exam1", 0),
        "IM000123": ("exam2", 0), "IM000124": ("IM000124", 0)}  # not in the file: its own patient
    manifest = read_manifest(out)
    assert manifest["counts"]["inputs"] == 4 and manifest["counts"]["patients"] == 3  # exams.csv: no input
    assert "exams.csv" in {os.path.basename(f["path"]) for f in manifest["label_files"]}
    first = collect_inputs("messidor2", images, ["messidor_data.csv"], patients="exams.csv").fingerprint
    (images / "exams.csv").write_text("image_id,patient_id\nIM000123,exam2\nIM000124,exam2\n")
    assert collect_inputs("messidor2", images, ["messidor_data.csv"], patients="exams.csv").fingerprint != first
    # a pooled --test-fraction keeps an exam's images on one side, whatever the seed
    for seed in range(6):
        split = {i.image_id: i.split for i in dp._with_splits(
            collect_inputs("messidor2", images, ["messidor_data.csv"], patients="exams.csv").items, None, 0.5, seed)}
        assert split["IM000123"] == split["IM000124"]
    with pytest.raises(SourceError, match="patients file nope.csv not found"):
        collect_inputs("messidor2", images, ["messidor_data.csv"], patients="nope.csv")


# ---------------------------------------------------------------------------------------------
# Failures that are not the file's: tried again, never kept as the data set's for good
# ---------------------------------------------------------------------------------------------


def failing_reads(monkeypatch, failures: dict[str, list[int]]):
    """Image.open fails for the named files with each errno of their list in turn (0: reads),
    then reads."""
    import drray.data.fundus as fundus

    real_open, calls = fundus.Image.open, []

    def open_(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        pending = failures.get(os.path.basename(path))
        if pending and (code := pending.pop(0)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fundus.Image, "open", open_)
    monkeypatch.setattr("drray.data.prepare.RETRY_WAITS_S", (0.01, 0.01))
    return calls


def two_eyes(tmp_path):
    images = tmp_path / "eyepacs"
    (images / "train").mkdir(parents=True)
    for i, name in enumerate(["10_left", "10_right", "11_left"]):
        frame(seed=i).save(images / "train" / f"{name}.jpeg")
    (images / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,2\n11_left,1\n")
    return images


def test_a_read_that_fails_for_a_passing_reason_is_tried_again(monkeypatch, tmp_path):
    """Too many open files, then an I/O error, then the file reads: prepared. A read refused
    for good (permissions) is an unreadable reject at once, not a contents reject."""
    import errno

    images = two_eyes(tmp_path)
    calls = failing_reads(monkeypatch, {"10_left.jpeg": [errno.EMFILE, errno.EIO], "11_left.jpeg": [errno.EACCES]})
    rows, counts = prepare_here(monkeypatch, "eyepacs", images, ["trainLabels.csv"], tmp_path / "out")
    assert set(rows) == {"10_left", "10_right"} and calls.count("10_left.jpeg") == 3
    assert calls.count("11_left.jpeg") == 1 and counts["rejected_by_reason"] == {"unreadable": 1}
    reject = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()[0]
    assert reject["image_id"] == "11_left" and "Permission denied" in reject["reason"]


def test_a_reject_that_reads_now_is_prepared_on_the_next_run(monkeypatch, tmp_path, capsys):
    """A set whose inputs did not change is kept, unless an image that the system failed to
    read last time reads now: then it is prepared again (once the permission was fixed, say),
    once: an image that reads in that look but fails in the pipeline again is not looked at on
    every later run (each would prepare the whole set again)."""
    import errno

    images, out = two_eyes(tmp_path), tmp_path / "out"
    calls = failing_reads(monkeypatch, {"11_left.jpeg": [errno.EACCES, errno.EACCES, 0, errno.EACCES, 0]})
    prepare_here(monkeypatch, "eyepacs", images, ["trainLabels.csv"], out)

    def rerun():
        return dp.prepare_source(source="eyepacs", images=images, labels=["trainLabels.csv"], out=out,
                                 params=PrepareParams(size=32), reuse_current=True)

    assert rerun().get("reused") is True  # still unreadable: the set stands
    again = rerun()  # reads in the look, fails in the pipeline
    assert "reused" not in again and again["counts"]["rejected"] == 1 and again["retried_rejects"] == ["11_left"]
    assert "read now (11_left): preparing the set again" in capsys.readouterr().err
    looked = calls.count("11_left.jpeg")
    assert rerun().get("reused") is True and calls.count("11_left.jpeg") == looked  # not looked at again
    (images / "train" / "11_left.jpeg").touch()  # new inputs: every reject gets its look again
    now = rerun()
    assert now["counts"]["prepared"] == 3 and now["counts"]["rejected"] == 0 and now["retried_rejects"] == []


def test_an_input_lost_on_its_way_is_prepared_again_then_fails_the_preparation(monkeypatch, tmp_path, capsys):
    """A row that does not come back from the pipeline is sent once more; lost again, the
    preparation fails and the set already there stays as it was."""
    images, out = two_eyes(tmp_path), tmp_path / "out"
    prepare_here(monkeypatch, "eyepacs", images, ["trainLabels.csv"], out)
    before = read_manifest(out)["content_hash"]
    calls = []

    def losing(times):
        def run(todo, params, batch_size):
            calls.append([r["image_id"] for r in todo])
            return iter([prepare_rows(todo[:-1] if len(calls) <= times else todo, params)])
        return run

    def prepare_again():
        (images / "train" / "11_left.jpeg").touch()  # inputs changed: prepared again
        return dp.prepare_source(source="eyepacs", images=images, labels=["trainLabels.csv"], out=out,
                                 params=PrepareParams(size=32), reuse_current=True)

    monkeypatch.setattr(dp, "_run_pipeline", losing(2))
    with pytest.raises(dp.PreparedDataError, match=r"1 input\(s\) came back neither prepared nor rejected \(11_left\)"):
        prepare_again()
    assert calls[1] == ["11_left"] and read_manifest(out)["content_hash"] == before and len(read_index(out)) == 3
    calls.clear()
    monkeypatch.setattr(dp, "_run_pipeline", losing(1))
    assert prepare_again()["counts"]["prepared"] == 3 and len(read_index(out)) == 3
    assert "1 image(s) did not come back from the pipeline (11_left): preparing them again" in capsys.readouterr().err


def test_the_same_rows_give_the_same_shards_however_they_arrive(tmp_path):
    """The pipeline delivers batches of sizes that vary run to run: the shards' files (and so
    the set's content hash, which every stage's key includes) must not follow them."""
    import pyarrow.parquet as pq

    from drray.data.shards import ShardWriter

    n = 1234
    rows = pa.table({name: pa.array([f"{name}{i}" for i in range(n)]) if SHARD_SCHEMA.field(name).type == pa.string()
                     else pa.array([None] * n, SHARD_SCHEMA.field(name).type) for name in SHARD_SCHEMA.names})

    def written(splits: list[int], name: str) -> list[dict]:
        writer, start = ShardWriter(tmp_path / name, rows_per_shard=500, rows_per_group=250), 0
        for size in splits:
            writer.write(rows.slice(start, size))
            start += size
        writer.write(rows.slice(start))
        return writer.close()

    a, b = written([16] * 40, "a"), written([7, 300, 1, 250, 64], "b")
    assert [s["sha256"] for s in a] == [s["sha256"] for s in b] and [s["rows"] for s in a] == [500, 500, 234]
    groups = [pq.ParquetFile(tmp_path / "a" / s["file"]).metadata.row_group(g).num_rows
              for s in a for g in range(pq.ParquetFile(tmp_path / "a" / s["file"]).metadata.num_row_groups)]
    assert groups == [250, 250, 250, 250, 234]
