"""`drray run pseudolabel` on real Ray Data (ci scale) with a teacher checkpoint made here
(training is tested elsewhere): one row per pool image, provenance, skip/redo, a killed job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from drray.artifacts import atomic_write_json
from drray.config import load_config
from drray.data.transforms import iter_eval_batches
from drray.engine.checkpoint import load_model, save_checkpoint
from drray.engine.model import ModelSpec
from drray.engine.predict import predict
from tests.conftest import REPO

pytestmark = pytest.mark.ray
CI = REPO / "configs" / "ci.yaml"


def make_teacher(cfg, seed: int) -> Path:
    """A finished teacher stage with random weights (seeded) where the pipeline expects it."""
    from jobs import common, stages

    manifest = common.prepared_eyepacs(cfg)
    out = stages.resolve(cfg, manifest)["teacher"].dir.path
    spec = ModelSpec("classifier", "resnet18", cfg.data.size)
    torch.manual_seed(seed)
    save_checkpoint(out / "model", model=spec.build(), spec=spec, epoch=0, metrics={})
    atomic_write_json(out / "done.json", {"stage": "teacher", "metrics": {}})
    return out


@pytest.fixture()
def cfg(tmp_path, ray_session):
    return load_config(CI, [f"run.dir={tmp_path}", "pseudolabel.precision=fp32", "pseudolabel.batch_size=32"])


def test_every_pool_image_gets_one_row_with_provenance(cfg):
    from jobs import common, pseudolabel

    teacher = make_teacher(cfg, seed=0)
    result = pseudolabel.run(cfg)
    table = pq.read_table(result["path"])
    pool = common.pool_ids(cfg)
    assert sorted(table.column("image_id").to_pylist()) == sorted(pool)
    assert table.schema.field("prob").type == "float" and table.schema.field("label").type == "int8"
    meta = pseudolabel.read_provenance(Path(result["path"]))
    assert meta["teacher"] == str(teacher / "model") and len(meta["teacher_sha256"]) == 64
    assert meta["threshold"] == 0.5 and meta["preprocessing"]["size"] == cfg.data.size
    assert meta["pool_content_hash"] == common.prepared_eyepacs(cfg)["content_hash"]
    # the same numbers as the teacher in a plain loop; labels are the thresholded probabilities
    model, _ = load_model(teacher / "model")
    ids, probs = predict(model, iter_eval_batches(cfg.data.eyepacs.prepared, split="train"),
                         device=torch.device("cpu"), dtype=None)
    got = dict(zip(table.column("image_id").to_pylist(), table.column("prob").to_numpy(), strict=True))
    np.testing.assert_allclose([got[i] for i in ids], probs, atol=1e-5)
    assert (table.column("label").to_numpy() == (table.column("prob").to_numpy() >= 0.5)).all()

    # same teacher: skipped; another teacher: redone
    assert pseudolabel.run(cfg)["skipped"] is True
    make_teacher(cfg, seed=1)
    again = pseudolabel.run(cfg)
    assert again["skipped"] is False
    assert pseudolabel.read_provenance(Path(again["path"]))["teacher_sha256"] != meta["teacher_sha256"]


def test_killed_job_leaves_no_table_and_rerun_completes(cfg, tmp_path):
    from jobs import common, stages

    make_teacher(cfg, seed=0)
    settings = [f"run.dir={tmp_path}", "pseudolabel.batch_size=8"]
    out = stages.pseudolabels_path(load_config(CI, settings), common.prepared_eyepacs(cfg))
    cmd = [sys.executable, "-m", "jobs.cli", "run", "pseudolabel", "--config", str(CI)]
    for item in settings:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.parent.glob(f".{out.name}.tmp-*")):
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed job left a table that distillation would trust"
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert pq.read_metadata(out).num_rows == len(common.pool_ids(cfg))
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "the stale temporary was not cleaned"
    assert json.loads(again.stdout)["skipped"] is False


class Batches:
    """Stands in for the Ray Dataset of predictions: the actor's output batches, as given."""

    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, **_):
        return iter(self.batches)


def tiny_pool(folder: Path, ids: list[str]) -> Path:
    """A prepared set's shards and manifest, as far as the driver reads them (ids and splits)."""
    (folder / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ids + ["t0"], "split": ["train"] * len(ids) + ["test"]}),
                   folder / "shards" / "shard-00000.parquet")
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"file": "shard-00000.parquet"}]}))
    return folder


def predicted(ids, probs, errors=None) -> dict:
    from drray.distributed.inference import DECODE_ERROR, prob_column

    return {"image_id": np.array(ids, dtype=object), prob_column("teacher"): np.array(probs, np.float32),
            DECODE_ERROR: np.array(errors or [""] * len(ids), dtype=object)}


@pytest.mark.parametrize("case", ["complete", "missing", "duplicated"])
def test_the_table_streams_to_disk_with_the_undecodable_beside_it_and_only_when_complete(tmp_path, monkeypatch, case):
    """The driver's side alone (no Ray): batches as the model actor returns them."""
    from drray.distributed.inference import Inference
    from jobs import pseudolabel

    pool = tiny_pool(tmp_path / "pool", [f"p{i}" for i in range(5)])
    cfg = load_config(CI, [f"run.dir={tmp_path}", f"data.eyepacs.prepared={pool}"])
    batches = [predicted(["p0", "p1", "p2"], [0.9, np.nan, 0.2], ["", "UnidentifiedImageError: no image", ""]),
               predicted({"complete": ["p3", "p4"], "missing": ["p3"], "duplicated": ["p3", "p4", "p0"]}[case],
                         {"complete": [0.6, 0.1], "missing": [0.6], "duplicated": [0.6, 0.1, 0.9]}[case])]
    monkeypatch.setattr(pseudolabel, "predictions", lambda *a, **k: Batches(batches))
    out = tmp_path / "stage" / "pseudolabels.parquet"
    if case != "complete":
        with pytest.raises(RuntimeError, match="1 missing" if case == "missing" else "1 duplicated"):
            pseudolabel._write(out, cfg, {"teacher": "t"}, Inference())
        assert not out.exists() and not list(out.parent.iterdir())  # nothing a later stage would trust
        return
    assert pseudolabel._write(out, cfg, {"teacher": "t"}, Inference()) == {"images": 4, "undecodable": 1}
    table = pq.read_table(out)
    assert table.column("image_id").to_pylist() == ["p0", "p2", "p3", "p4"]
    assert table.column("label").to_pylist() == [1, 0, 1, 0]
    assert pq.read_table(out.with_name(pseudolabel.UNDECODABLE)).to_pylist() == [
        {"image_id": "p1", "reason": "UnidentifiedImageError: no image"}]
    assert pseudolabel._summary(out)["undecodable"] == 1
