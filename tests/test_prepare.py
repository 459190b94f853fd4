"""`drray prepare` end to end on real Ray: every bad-input kind is rejected with its reason,
counts add up, output is replaced atomically, and `drray run prepare` builds data from a config."""

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from drray.data.shards import SHARD_SCHEMA, read_index, read_manifest, shard_paths
from jobs.cli import main
from tests.conftest import REPO
from tests.data.test_fundus import frame, png_header_only

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def messy_eyepacs(tmp_path_factory, synthetic_eyepacs):
    """An EyePACS-style folder with good images and one of every kind of bad input."""
    root = tmp_path_factory.mktemp("messy")
    shutil.copytree(synthetic_eyepacs / "train", root / "train")
    good = sorted(p.stem for p in (root / "train").glob("*.jpeg"))[:12]
    for p in (root / "train").glob("*.jpeg"):
        if p.stem not in good:
            p.unlink()
    train = root / "train"
    buf = io.BytesIO()
    frame().save(buf, format="JPEG")
    (train / "90_left.jpeg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])  # truncated
    (train / "90_right.jpeg").write_bytes(b"")  # empty
    (train / "91_left.jpeg").write_text("<html>not an image</html>")  # non-image
    (train / "91_right.png").write_bytes(png_header_only(60_000, 60_000))  # decompression bomb
    Image.new("RGB", (400, 300), (2, 2, 2)).save(train / "92_left.jpeg")  # no visible fundus
    frame().convert("L").save(train / "92_right.png")  # grayscale: fine
    frame().convert("CMYK").save(train / "93_left.jpg")  # CMYK: fine
    Image.fromarray(np.asarray(frame().convert("L"), dtype=np.uint16) * 257).save(train / "93_right.png")  # 16-bit
    frame().save(train / "94_left.tif")  # bad grade
    frame().save(train / "94_right.jpeg")  # grade out of range
    frame().save(train / "95_left.jpeg")  # conflicting duplicate grades
    frame().save(train / "95_right.jpeg")  # no label row: unlabeled
    (root / "extra").mkdir()
    frame().save(root / "extra" / "95_left.png")  # the same id a second time
    rows = [f"{i},{g}" for i, g in zip(good, [0, 1, 2, 3, 4, 0, 0, 2, 0, 1, 0, 3], strict=True)]
    rows += ["90_left,0", "90_right,1", "91_left,0", "91_right,2", "92_left,0", "92_right,2", "93_left,0",
             "93_right,3", "94_left,severe", "94_right,9", "95_left,1", "95_left,4", "99_left,2"]
    (root / "trainLabels.csv").write_text("image,level\n" + "\n".join(rows) + "\n")
    return root


EXPECTED_REJECTS = {
    "90_left": "corrupt", "90_right": "empty", "91_left": "not_image", "91_right": "decompression_bomb",
    "92_left": "no_fundus", "94_left": "bad_grade", "94_right": "bad_grade", "95_left": "conflicting_grades",
    "99_left": "image_missing",
}


def test_every_bad_input_is_rejected_with_its_reason(ray_session, messy_eyepacs, tmp_path):
    out = tmp_path / "prepared"
    result = CliRunner().invoke(main, [
        "prepare", "--source", "eyepacs", "--images", str(messy_eyepacs), "--labels", "trainLabels.csv",
        "--out", str(out), "--size", "48",
    ])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    counts = manifest["counts"]
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    kinds = {}
    for r in rejects:
        kinds.setdefault(r["image_id"], []).append(r["kind"])
        assert r["reason"], r
    # one of the two files named 95_left is a duplicate id; the kept one has conflicting grades
    assert sorted(kinds.pop("95_left")) == ["conflicting_grades", "duplicate_image"]
    expected = {k: v for k, v in EXPECTED_REJECTS.items() if k != "95_left"}
    assert {k: v[0] for k, v in kinds.items()} == expected
    index = read_index(out).to_pylist()
    prepared = {r["image_id"]: r["grade"] for r in index}
    assert set(prepared) == set(sorted(p.stem for p in (messy_eyepacs / "train").glob("*.jpeg"))[:12]) | {
        "92_right", "93_left", "93_right", "95_right"}
    assert prepared["95_right"] is None and prepared["93_right"] == 3
    # the accounting: every input is prepared or rejected, never both, never neither
    n_files = sum(1 for p in messy_eyepacs.rglob("*") if p.is_file() and p.suffix != ".csv")
    assert counts["inputs"] == n_files + 1  # + the label row without an image
    assert counts["prepared"] + counts["rejected"] == counts["inputs"]
    assert counts["prepared"] == len(index) and counts["rejected"] == len(rejects)
    assert counts["unlabeled"] == 1
    assert counts["rejected_by_reason"]["bad_grade"] == 2
    assert "rejected" in result.output and "inputs prepared" in result.output
    # shard rows hold decodable size x size RGB images and the fundus geometry
    table = pq.read_table(shard_paths(out)[0])
    assert table.schema.equals(SHARD_SCHEMA)
    row = table.slice(0, 1).to_pylist()[0]
    img = Image.open(io.BytesIO(row["image"]))
    assert img.size == (48, 48) and img.mode == "RGB"
    assert row["fundus_r"] > 0 and row["orig_width"] > 0


def test_rerun_replaces_and_strict_fails(ray_session, messy_eyepacs, tmp_path):
    out = tmp_path / "prepared"
    args = ["prepare", "--source", "eyepacs", "--images", str(messy_eyepacs), "--labels", "trainLabels.csv",
            "--out", str(out), "--size", "32"]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = read_manifest(out)["counts"]
    (out / "shards" / "stray.parquet").write_bytes(b"left over")  # must not survive a rerun
    result = CliRunner().invoke(main, args + ["--strict"])
    assert result.exit_code == 3, result.output
    assert read_manifest(out)["counts"] == first  # no duplicated rows after the rerun
    assert not (out / "shards" / "stray.parquet").exists()
    assert len(read_index(out)) == first["prepared"]
    assert not list(tmp_path.glob(".prepared.*"))  # no temporaries left


def test_nothing_prepared_is_an_error(ray_session, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpeg").write_bytes(b"")
    result = CliRunner().invoke(main, ["prepare", "--source", "folder", "--images", str(tmp_path / "imgs"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no image could be prepared" in result.output
    assert read_manifest(tmp_path / "out")["counts"]["rejected"] == 1


def test_failed_prepare_leaves_the_previous_output(ray_session, messy_eyepacs, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    args = ["prepare", "--source", "eyepacs", "--images", str(messy_eyepacs), "--labels", "trainLabels.csv",
            "--out", str(out), "--size", "32"]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = read_manifest(out)

    import drray.distributed.prepare as dp

    def crash(*args, **kwargs):
        yield from ()
        raise RuntimeError("killed")

    monkeypatch.setattr(dp, "_run_pipeline", crash)
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert read_manifest(out) == before
    assert not list(tmp_path.glob(".prepared.*"))


def test_partition_and_test_fraction(ray_session, synthetic_eyepacs, tmp_path):
    part = tmp_path / "part.csv"
    part.write_text("image_id,split\n10_left,test\n10_right,train\n")
    out = tmp_path / "p"
    result = CliRunner().invoke(main, [
        "prepare", "--source", "eyepacs", "--images", str(synthetic_eyepacs), "--labels", "trainLabels.csv",
        "--labels", "testLabels.csv", "--out", str(out), "--size", "32", "--partition", str(part)])
    assert result.exit_code == 0, result.output
    splits = {r["image_id"]: r["split"] for r in read_index(out).to_pylist()}
    assert splits["10_left"] == "test" and splits["10_right"] == "train"
    assert sum(s == "unassigned" for s in splits.values()) == len(splits) - 2
    result = CliRunner().invoke(main, [
        "prepare", "--source", "eyepacs", "--images", str(synthetic_eyepacs), "--labels", "trainLabels.csv",
        "--labels", "testLabels.csv", "--out", str(out), "--size", "32", "--test-fraction", "0.2"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["counts"]["by_split"] == {"test": 10, "train": 40}


def test_run_prepare_from_a_fresh_config(tmp_path):
    """The console script, from nothing: synthesise, prepare, summarise, write the resolved config."""
    d = tmp_path
    sets = [f"run.dir={d}/run", f"data.eyepacs.images={d}/raw/e", f"data.eyepacs.prepared={d}/prep/e",
            f"data.external.images={d}/raw/m", f"data.external.prepared={d}/prep/m",
            "data.eyepacs.synthetic.n=24", "data.eyepacs.synthetic.test_n=8", "data.external.synthetic.n=8"]
    cmd = [sys.executable, "-m", "jobs.cli", "run", "prepare", "--config", str(REPO / "configs" / "ci.yaml")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "32 of 32 inputs prepared" in proc.stdout
    summary = json.loads((d / "run" / "data.json").read_text())
    assert summary["eyepacs"]["prepared"] == 32 and summary["external"]["inputs"] == 8
    assert (d / "run" / "config.resolved.yaml").is_file()
    # a second run finds everything up to date and changes nothing
    stamp = (d / "prep" / "e" / "manifest.json").stat().st_mtime_ns
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and "up to date" in proc.stderr
    assert (d / "prep" / "e" / "manifest.json").stat().st_mtime_ns == stamp


def test_missing_real_data_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "jobs.cli", "run", "prepare", "--config", str(REPO / "configs" / "paper.yaml"),
           "--set", f"run.dir={tmp_path}", "--set", f"data.eyepacs.images={tmp_path}/nothing"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1
    assert "data.eyepacs.images" in proc.stderr and "not found" in proc.stderr


def test_a_run_that_prepares_nothing_keeps_the_good_set(ray_session, messy_eyepacs, tmp_path):
    out = tmp_path / "prepared"
    good = ["prepare", "--source", "eyepacs", "--images", str(messy_eyepacs), "--labels", "trainLabels.csv",
            "--out", str(out), "--size", "32"]
    assert CliRunner().invoke(main, good).exit_code == 0
    before = read_manifest(out)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.jpeg").write_bytes(b"")
    (junk / "y.png").write_text("not an image")
    result = CliRunner().invoke(main, ["prepare", "--source", "folder", "--images", str(junk), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "no image could be prepared" in result.output and "kept" in result.output
    assert read_manifest(out) == before and len(read_index(out)) == before["counts"]["prepared"]
    assert not list(tmp_path.glob(".prepared.*"))


def test_inputs_of_every_kind_one_row_each(ray_session, tmp_path):
    """A folder as users have them: a file name that is not UTF-8, a .webp, a README.txt, a
    latin-1 label CSV with splits in any case, an empty grade and a split drray does not know."""
    images = tmp_path / "clinic"
    images.mkdir()
    frame().save(images / os.fsdecode(b"caf\xe9.jpg"), format="JPEG")  # latin-1 bytes, not UTF-8
    frame(seed=1).save(images / "eye.webp")
    frame(seed=2).save(images / "zoë.png")
    frame(seed=3).save(images / "odd.png")
    (images / "README.txt").write_text("photographs from the clinic, 2024")
    (images / ".DS_Store").write_bytes(b"\0")  # hidden: not an input
    (images / "grades.csv").write_bytes(
        "image_id,grade,split\ncafé.jpg,2, Test \neye.webp,,\nzoë,1,Validation\nodd,0,holdout\n".encode("latin-1"))
    out = tmp_path / "prepared"
    result = CliRunner().invoke(main, ["prepare", "--source", "folder", "--images", str(images),
                                       "--labels", "grades.csv", "--out", str(out), "--size", "32"])
    assert result.exit_code == 0, result.output
    index = {r["image_id"]: r for r in read_index(out).to_pylist()}
    rejects = {r["image_id"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert {k: (v["grade"], v["split"]) for k, v in index.items()} == {
        "café": (2, "test"), "eye": (None, "train"), "zoë": (1, "val")}
    assert {k: v["kind"] for k, v in rejects.items()} == {"README": "unsupported_format", "odd": "bad_split"}
    assert "grades.csv:5" in rejects["odd"]["reason"] and rejects["README"]["path"].endswith("README.txt")
    paths = pq.read_table(shard_paths(out)[0], columns=["path"]).column("path").to_pylist()
    assert str(images / "caf\\xe9.jpg") in paths  # the name's byte, printable
    counts = read_manifest(out)["counts"]
    assert counts["inputs"] == 5 == len(index) + len(rejects)  # every non-hidden file but the labels
    assert counts["rejected_by_reason"] == {"bad_split": 1, "unsupported_format": 1}
    assert counts["unlabeled"] == 1 and read_manifest(out)["id_from"] == "stem"


def test_one_job_prepares_a_data_set_at_a_time(tmp_path, capsys):
    """Jobs started together on one data set (a SLURM array's trials) take turns: the second
    waits, saying for what, and then finds the first one's output (reused, not redone)."""
    import threading
    import time

    from drray.distributed.prepare import preparation_lock

    prepared = tmp_path / "prepared" / "eyepacs"
    order = []

    def second():
        with preparation_lock(prepared, "eyepacs", notice_after_s=0.05):
            order.append("second")

    with preparation_lock(prepared, "eyepacs"):
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.5)
        order.append("first done")
    waiting.join(timeout=10)
    assert order == ["first done", "second"]
    assert "waiting for another job preparing data.eyepacs into" in capsys.readouterr().err
    assert sorted(p.name for p in prepared.parent.iterdir()) == [".eyepacs.lock"]  # nothing else made


def test_a_job_waits_for_the_lock_before_looking_at_the_data(tmp_path, monkeypatch):
    import threading
    import time

    import drray.distributed.prepare as dp
    from drray.config import Config, DatasetConfig

    ds = DatasetConfig(images=str(tmp_path), prepared=str(tmp_path / "prepared"))
    looked = []
    monkeypatch.setattr(dp, "_ensure_prepared", lambda name, ds, cfg: looked.append(name) or {})
    with dp.preparation_lock(Path(ds.prepared), "eyepacs"):
        job = threading.Thread(target=dp.ensure_prepared, args=("eyepacs", ds, Config()))
        job.start()
        time.sleep(0.5)
        assert job.is_alive() and not looked  # waiting, not reading a folder being written
    job.join(timeout=10)
    assert looked == ["eyepacs"]


def test_missing_images_are_named_before_anything_is_created(tmp_path):
    from drray.config import Config, DatasetConfig
    from drray.distributed.prepare import ensure_prepared

    ds = DatasetConfig(images=str(tmp_path / "nowhere"), prepared=str(tmp_path / "out" / "prepared"))
    with pytest.raises(FileNotFoundError, match="data.eyepacs.images: folder .*nowhere not found"):
        ensure_prepared("eyepacs", ds, Config())
    assert not (tmp_path / "out").exists()  # no lock, no folder for a typo


@pytest.mark.parametrize("refusal", [errno.EACCES, errno.EROFS])
def test_a_read_only_prepared_location_needs_no_lock(tmp_path, monkeypatch, refusal):
    """A prepared set on a read-only share (CI runs as root, who writes anywhere: the refusal
    is made by the lock itself; filelock raises EROFS on a read-only mount, EACCES without
    permission). Any other failure to lock is raised."""
    import filelock

    from drray.distributed.prepare import preparation_lock

    def refuse(code):
        def acquire(self, *args, **kwargs):
            raise OSError(code, os.strerror(code), self.lock_file)
        return acquire

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse(refusal))
    entered = []
    with preparation_lock(tmp_path / "share" / "eyepacs", "eyepacs"):
        entered.append(True)
    assert entered
    monkeypatch.setattr(filelock.FileLock, "acquire", refuse(errno.ENOSPC))
    with pytest.raises(OSError, match="No space left"), preparation_lock(tmp_path / "share" / "eyepacs", "eyepacs"):
        pass


def test_a_synthesis_killed_half_way_leaves_no_data_set_behind(tmp_path, monkeypatch):
    """The next run must not take a half-written folder for the data set (it once failed with
    'label file trainLabels.csv not found' after a cancelled SLURM job)."""
    import drray.data.synthetic as synthetic
    from drray.config import SyntheticConfig
    from drray.distributed.prepare import synthesise

    images = tmp_path / "raw" / "eyepacs"
    real = synthetic.synthesize

    def killed(out, *args, **kwargs):
        (Path(out) / "train").mkdir(parents=True)
        (Path(out) / "train" / "1_left.jpeg").write_bytes(b"half")
        raise KeyboardInterrupt  # scancel

    monkeypatch.setattr(synthetic, "synthesize", killed)
    with pytest.raises(KeyboardInterrupt):
        synthesise(images, SyntheticConfig(n=4, frame_scale=0.3))
    assert not images.exists()  # only a temporary beside it
    monkeypatch.setattr(synthetic, "synthesize", real)
    synthesise(images, SyntheticConfig(n=4, frame_scale=0.3))
    assert (images / "trainLabels.csv").is_file() and len(list((images / "train").glob("*.jpeg"))) == 4
    assert sorted(p.name for p in images.parent.iterdir()) == ["eyepacs"]  # the temporary removed
