"""A user's files are sacred: no command replaces or deletes anything drray did not write.

Every case here has real files that must survive byte for byte, and each refusal happens before
any work starts (Ray is made to fail if anything tries to start it)."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from drray.artifacts import (
    OUTPUT_MARK,
    Legacy,
    NotOurOutput,
    atomic_directory,
    check_replaceable,
    claim_folder,
    clear_own_files,
    mark_files,
)
from jobs.cli import main
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Every refusal below must come before Ray starts."""
    import drray.distributed.prepare as dp
    import drray.distributed.runtime as runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started although the command should have stopped before any work")

    monkeypatch.setattr(dp, "ensure_ray", refuse)
    monkeypatch.setattr(runtime, "ensure_ray", refuse)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def photos(tmp_path):
    """A user's folder of photographs, a labels file and a thesis beside them."""
    root = tmp_path / "photos"
    (root / "clinic").mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (64, 48), (120, 40, 20)).save(root / "clinic" / f"{name}.jpg")
    (root / "grades.csv").write_text("image_id,grade\na,0\nb,3\n")
    (root / "thesis.docx").write_bytes(b"four years of work")
    return root


def prepare_args(images, out, labels=None):
    args = ["prepare", "--source", "folder", "--images", str(images), "--out", str(out)]
    return args + (["--labels", str(labels)] if labels else [])


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_prepare_refuses_an_out_that_overlaps_the_images(photos, where):
    out = {"same": photos, "inside": photos / "clinic" / "prepared", "parent": photos.parent}[where]
    before = snapshot(photos.parent)
    result = CliRunner().invoke(main, prepare_args(photos, out, photos / "grades.csv"))
    assert result.exit_code == 1, result.output
    assert "--images" in result.output and "--out" in result.output
    assert snapshot(photos.parent) == before


def test_prepare_refuses_an_out_holding_the_label_file(photos, tmp_path):
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    (labels_dir / "grades.csv").write_text("image_id,grade\na,0\n")
    before = snapshot(labels_dir)
    result = CliRunner().invoke(main, prepare_args(photos / "clinic", labels_dir, labels_dir / "grades.csv"))
    assert result.exit_code == 1 and "holds the input file" in result.output
    assert snapshot(labels_dir) == before


def test_prepare_refuses_a_non_empty_folder_drray_did_not_write(photos, tmp_path):
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\chapter{Results}")
    result = CliRunner().invoke(main, prepare_args(photos / "clinic", mine))
    assert result.exit_code == 1
    assert "did not write" in result.output and "thesis.tex" in result.output
    assert (mine / "thesis.tex").read_text() == "\\chapter{Results}"
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_prepare_refuses_a_prepared_set_holding_a_users_file(photos, tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "shards").mkdir()
    json.dump({"written_by": "drray", "entries": ["manifest.json", "shards"]}, open(out / OUTPUT_MARK, "w"))
    (out / "notes.txt").write_text("my notes on this set")
    result = CliRunner().invoke(main, prepare_args(photos / "clinic", out))
    assert result.exit_code == 1 and "notes.txt" in result.output
    assert (out / "notes.txt").read_text() == "my notes on this set"


def test_atomic_directory_replaces_only_what_it_wrote(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final, what="test folder") as tmp:
        (tmp / "a.txt").write_text("1")
    assert json.loads((final / OUTPUT_MARK).read_text())["entries"] == ["a.txt"]
    with atomic_directory(final, what="test folder") as tmp:  # its own output: replaced
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == [OUTPUT_MARK, "b.txt"]
    (final / "user.txt").write_text("mine")
    with pytest.raises(NotOurOutput, match="user.txt"):
        with atomic_directory(final, what="test folder") as tmp:
            raise AssertionError("the work must not start")
    assert (final / "user.txt").read_text() == "mine" and (final / "b.txt").read_text() == "2"
    assert not list(tmp_path.glob(".out.*"))


def test_atomic_directory_checks_again_before_the_swap(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with pytest.raises(NotOurOutput):
        with atomic_directory(final, what="test folder") as tmp:
            (tmp / "new.txt").write_text("new")
            (final / "arrived.txt").write_text("the user saved this meanwhile")
    assert (final / "arrived.txt").is_file() and not list(tmp_path.glob(".out.*"))


def test_legacy_outputs_are_recognised_by_what_they_hold(tmp_path):
    legacy = Legacy("model.pt", frozenset({"model.pt", "meta.json", "*.png"}))
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.pt").write_bytes(b"w")
    (old / "roc_test.png").write_bytes(b"p")
    check_replaceable(old, what="model folder", legacy=legacy)
    (old / "thesis.docx").write_bytes(b"x")
    with pytest.raises(NotOurOutput, match="thesis.docx"):
        check_replaceable(old, what="model folder", legacy=legacy)
    with pytest.raises(NotOurOutput, match="is not a folder"):
        check_replaceable(old / "model.pt", what="model folder", legacy=legacy)


def test_synth_refuses_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "holiday"
    mine.mkdir()
    (mine / "beach.jpeg").write_bytes(b"not a fundus")
    result = CliRunner().invoke(main, ["synth", str(mine), "--n", "2", "--workers", "1"])
    assert result.exit_code == 1 and "did not write" in result.output
    assert snapshot(mine) == {"beach.jpeg": b"not a fundus"}


def test_synth_rerun_leaves_no_stale_images_and_keeps_users_files_out(tmp_path):
    out = tmp_path / "synthetic"
    assert CliRunner().invoke(main, ["synth", str(out), "--n", "6", "--test-n", "2", "--workers", "1"]).exit_code == 0
    assert len(list((out / "train").glob("*.jpeg"))) == 6
    result = CliRunner().invoke(main, ["synth", str(out), "--n", "3", "--workers", "1"])
    assert result.exit_code == 0, result.output
    images = sorted(p.stem for p in (out / "train").glob("*.jpeg"))
    rows = (out / "trainLabels.csv").read_text().splitlines()[1:]
    assert len(images) == 3 and sorted(r.split(",")[0] for r in rows) == images
    assert not (out / "test").exists() and not (out / "testLabels.csv").exists()
    (out / "train" / "my_note.txt").write_text("do not delete")
    result = CliRunner().invoke(main, ["synth", str(out), "--n", "2", "--workers", "1"])
    assert result.exit_code == 1 and "my_note.txt" in result.output
    assert (out / "train" / "my_note.txt").read_text() == "do not delete"
    assert len(list((out / "train").glob("*.jpeg"))) == 3


def test_clear_own_files_removes_only_listed_files(tmp_path):
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(b"1")
    mark_files(folder, what="test")
    clear_own_files(folder, what="test")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("existing", ["notes.csv", "scan.parquet", "photo.csv"])
def test_predict_never_overwrites_a_users_file(tmp_path, existing):
    model = tmp_path / "model"
    model.mkdir()
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / existing
    content = b"patient,notes\n1,call back\n" if existing != "scan.parquet" else b"PAR1 not ours"
    out.write_bytes(content)
    result = CliRunner().invoke(main, ["predict", "--model", str(model), "--images", str(images), "--out", str(out)])
    assert result.exit_code == 1 and "not a table drray predict wrote" in result.output
    assert out.read_bytes() == content


def test_run_dir_must_be_drrays(tmp_path):
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    config = str(REPO / "configs" / "ci.yaml")
    result = CliRunner().invoke(main, ["run", "pipeline", "--config", config, "--set", f"run.dir={mine}"])
    assert result.exit_code == 1 and "run.dir" in result.output and "did not write" in result.output
    assert snapshot(mine) == {"report.md": b"my own report"}
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = CliRunner().invoke(main, ["run", "evaluate", "--config", config, "--set", f"run.dir={a_file}"])
    assert result.exit_code == 1 and "is a file" in result.output and "Traceback" not in result.output


def test_a_run_dir_is_claimed_once_and_accepted_again(tmp_path):
    run = claim_folder(tmp_path / "run", what="run directory")
    (run / "report.md").write_text("drray's report")
    assert claim_folder(run, what="run directory") == run
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "config.resolved.yaml").write_text("run: {}\n")
    claim_folder(old, what="run directory", legacy_signs=["config.resolved.yaml"])
    assert (old / OUTPUT_MARK).is_file()
