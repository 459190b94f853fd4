"""The four training stages on real Ray Train (ci scale): chaining, checkpoints, skipping,
a worker killed mid-epoch, and a whole command killed and run again."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from drray.config import load_config
from drray.data.transforms import iter_eval_batches
from drray.engine.checkpoint import load_model
from drray.engine.loop import predict
from tests.conftest import REPO

pytestmark = pytest.mark.ray
CI = REPO / "configs" / "ci.yaml"


def records(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def epochs(stage_dir: Path) -> list[int]:
    return [r["epoch"] for r in records(stage_dir) if "epoch" in r]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, ray_session):
    return load_config(CI, [f"run.dir={tmp_path_factory.mktemp('run')}"])


def write_pseudolabels(teacher_dir: Path, prepared: str, drop: int, ghosts: int) -> Path:
    model, _ = load_model(teacher_dir / "model")
    ids, probs = predict(model, iter_eval_batches(prepared, split="train"), device=torch.device("cpu"), dtype=None)
    ids = ids[drop:] + [f"ghost_{i}" for i in range(ghosts)]
    probs = list(probs[drop:]) + [0.9] * ghosts
    path = teacher_dir / "pseudolabels.parquet"
    pq.write_table(pa.table({"image_id": ids, "prob": pa.array(probs, pa.float32()),
                             "label": pa.array([int(p >= 0.5) for p in probs], pa.int8())}), path)
    return path


def test_four_stages_chain_and_skip_when_done(cfg):
    from jobs import distill, finetune, pretrain

    pre = Path(pretrain.run(cfg)["dir"])
    assert epochs(pre) == [0, 1]
    state = torch.load(pre / "model" / "model.pt", weights_only=True)
    assert any(k.startswith("projection.") for k in state) and any(k.startswith("backbone.") for k in state)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(pre))

    teacher = Path(finetune.run(cfg)["dir"])
    assert [r.get("val_auc") is not None for r in records(teacher)] == [True, True]
    assert (teacher / "best" / "model.pt").is_file() and (teacher / "model" / "model.pt").is_file()
    subset = json.loads((teacher / "subset.json").read_text())
    assert len(subset["labeled"]) == cfg.labels.count and len(subset["validation"]) == cfg.labels.val_count
    # the teacher's backbone is the pretrained one at the start: its first conv was loaded, not random
    torch.load(teacher / "model" / "model.pt", weights_only=True)

    write_pseudolabels(teacher, cfg.data.eyepacs.prepared, drop=5, ghosts=3)
    result = distill.run(cfg)
    join = result["pseudolabel_join"]
    assert join["pool_without_pseudolabel"] == 5 and join["pseudolabel_without_image"] == 3
    assert join["used"] == join["pool_images"] - 5

    student = Path(finetune.run_student(cfg)["dir"])
    model, meta = load_model(student / "model")
    assert meta["spec"]["backbone"] == cfg.distill.backbone and meta["spec"]["kind"] == "classifier"

    # a second run of a finished stage is skipped: nothing new in its metrics
    before = (pre / "metrics.jsonl").read_text()
    assert pretrain.run(cfg)["stage"] == "pretrain"
    assert (pre / "metrics.jsonl").read_text() == before


def test_worker_killed_mid_epoch_resumes_from_checkpoint(tmp_path, ray_session):
    """Two gloo workers; rank 1 is SIGKILLed during epoch 2; Ray restarts the group and the
    stage continues from the last checkpoint instead of epoch 0."""
    from jobs import common, pretrain

    cfg = load_config(CI, [f"run.dir={tmp_path}", "pretrain.epochs=4", "pretrain.scaling.num_workers=2"])
    manifest = common.prepared_eyepacs(cfg)
    stage = pretrain.output_dir(cfg, manifest)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=pretrain.run(cfg)), daemon=True)
    worker.start()
    deadline = time.time() + 300
    while time.time() < deadline and not ((stage / "metrics.jsonl").exists() and epochs(stage)):
        time.sleep(0.2)
    assert epochs(stage), "first epoch never finished"
    time.sleep(0.5)  # into the next epoch
    os.kill(int((stage / "workers" / "rank1.pid").read_text()), signal.SIGKILL)
    worker.join(timeout=400)
    assert "result" in outcome, "the stage did not finish after the worker was killed"
    resumed = [r for r in records(stage) if r.get("event") == "resumed"]
    assert resumed and resumed[0]["epochs_done"] >= 1
    done = epochs(stage)
    assert done[-1] == 3 and done.count(0) == 1  # continued, never restarted from epoch 0


def test_epochs_span_several_pipeline_passes(tmp_path, ray_session, monkeypatch):
    """A pass of the data pipeline streams several epochs; a new pass starts where the last
    ended, and every epoch still gets its full number of batches."""
    import drray.distributed.datasets as datasets
    from jobs import pretrain

    monkeypatch.setattr(datasets, "EPOCHS_PER_PASS", 2)
    monkeypatch.setattr(datasets, "MIN_ROWS_PER_PASS", 1)
    cfg = load_config(CI, [f"run.dir={tmp_path}", "pretrain.epochs=3"])
    stage = Path(pretrain.run(cfg)["dir"])
    done = [r for r in records(stage) if "epoch" in r]
    assert [r["epoch"] for r in done] == [0, 1, 2]
    assert len({r["images"] for r in done}) == 1 and done[0]["images"] > 0


def test_forget_after_drops_epochs_that_will_be_trained_again(tmp_path):
    from drray.distributed.train import _forget_after

    lines = [{"epoch": 0}, {"event": "resumed", "epochs_done": 1}, {"epoch": 1}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "meta.json").write_text(json.dumps({"epoch": 2, "metrics": {"val_auc": 0.9}}))
    _forget_after(tmp_path, 1)
    assert records(tmp_path) == lines[:2]
    assert not (tmp_path / "best").exists()


def test_supervised_baseline_stops_early_on_validation_auc(tmp_path, ray_session):
    """patience 1 with a gain no AUC can make (min_delta 1): epoch 2 cannot beat epoch 1, so
    the stage stops after 2 of its 5 epochs and keeps the best model."""
    from jobs import finetune

    cfg = load_config(CI, [f"run.dir={tmp_path}", "supervised.epochs=5", "supervised.patience=1",
                           "supervised.min_delta=1.0"])
    out = Path(finetune.run_supervised(cfg)["dir"])
    assert epochs(out) == [0, 1]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["after_epoch"] for r in lines if r.get("event") == "stopped_early"] == [1]
    assert (out / "best" / "model.pt").is_file() and (out / "model" / "model.pt").is_file()
