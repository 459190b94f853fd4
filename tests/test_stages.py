"""A training stage on real Ray Train with a worker killed mid-epoch (Ray restarts the worker
group, the stage resumes from its last checkpoint), and the stage helpers that need no Ray.
The stages' chaining and skipping run in tests/test_pipeline.py (one pipeline run shared by
its tests); the fit loop's logic (epochs, resume, early stopping, passes, EMA) without Ray in
tests/engine/test_fit.py."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drray.config import load_config
from tests.conftest import REPO

pytestmark = pytest.mark.ray
CI = REPO / "configs" / "ci.yaml"


def records(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def epochs(stage_dir: Path) -> list[int]:
    return [r["epoch"] for r in records(stage_dir) if "epoch" in r]


def test_pseudolabels_join_the_pool_and_every_mismatch_is_counted(tmp_path):
    """Distillation's join of the pseudo-label table with the pool: pool images without a
    pseudo-label and pseudo-labels without a pool image are counted, never dropped silently."""
    from jobs.distill import join_pseudolabels

    pool = [f"img{i}" for i in range(10)]
    ids = pool[5:] + [f"ghost_{i}" for i in range(3)] + ["img7"]  # 5 dropped, 3 ghosts, 1 duplicate row
    probs = [0.9, 0.2, 0.6, 0.4, 0.7, 0.9, 0.9, 0.9, 0.1]
    path = tmp_path / "pseudolabels.parquet"
    pq.write_table(pa.table({"image_id": ids, "prob": pa.array(probs, pa.float32()),
                             "label": pa.array([int(p >= 0.5) for p in probs], pa.int8())}), path)
    targets, join = join_pseudolabels(path, pool, "hard")
    assert join["pool_without_pseudolabel"] == 5 and join["pseudolabel_without_image"] == 3
    assert join["used"] == join["pool_images"] - 5 == len(targets) and join["duplicate_pseudolabel_rows"] == 1
    assert set(targets) == set(pool[5:]) and set(targets.values()) <= {0.0, 1.0}
    soft, _ = join_pseudolabels(path, pool, "soft")
    assert soft["img5"] == pytest.approx(0.9)
    with pytest.raises(FileNotFoundError, match="drray run pseudolabel"):
        join_pseudolabels(tmp_path / "missing.parquet", pool, "hard")


def test_worker_killed_mid_epoch_resumes_from_checkpoint(tmp_path, ray_session):
    """Two gloo workers; rank 1 is SIGKILLed during epoch 2 (or a little later); Ray restarts the group and the
    stage continues from the last checkpoint instead of epoch 0."""
    from jobs import common, pretrain, stages

    cfg = load_config(CI, [f"run.dir={tmp_path}", "pretrain.epochs=4", "pretrain.scaling.num_workers=2",
                           "pretrain.monitor_every=0"])
    manifest = common.prepared_eyepacs(cfg)
    stage = stages.resolve(cfg, manifest)["pretrain"].dir.path
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=pretrain.run(cfg)), daemon=True)
    worker.start()
    deadline = time.time() + 300
    # rank 1 dies once epoch 1 is logged: epoch 0's checkpoint report (a barrier on every rank) is
    # then behind both ranks, so Ray Train holds it
    while time.time() < deadline and not ((stage / "metrics.jsonl").exists() and 1 in epochs(stage)):
        assert worker.is_alive(), "the stage ended before the test could kill a worker"
        time.sleep(0.05)
    assert 1 in epochs(stage) and 3 not in epochs(stage), epochs(stage)
    os.kill(int((stage / "workers" / "rank1.pid").read_text()), signal.SIGKILL)
    worker.join(timeout=400)
    assert "result" in outcome, "the stage did not finish after the worker was killed"
    resumed = [r for r in records(stage) if r.get("event") == "resumed"]
    assert resumed and resumed[0]["epochs_done"] >= 1
    done = epochs(stage)
    assert done[-1] == 3 and done.count(0) == 1  # continued, never restarted from epoch 0


def test_forget_after_drops_epochs_that_will_be_trained_again(tmp_path):
    from drray.artifacts import StageDir
    from drray.engine.fit import forget_after

    lines = [{"epoch": 0}, {"event": "resumed", "epochs_done": 1}, {"epoch": 1}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "meta.json").write_text(json.dumps({"epoch": 2, "metrics": {"val_auc": 0.9}}))
    forget_after(StageDir(tmp_path), 1)
    assert records(tmp_path) == lines[:2]
    assert not (tmp_path / "best").exists()


def test_a_budget_smaller_than_a_batch_trains_on_full_batches_of_what_it_has(capsys):
    """ci's sweep at 10%: 24 labels, 12 of them to train on, batch 16: every batch is full
    (drop_last), so the batch shrinks to the images (a multiple of the workers), said once."""
    from jobs.common import batch_for

    assert batch_for(16, 40, 1, "teacher") == 16
    assert batch_for(16, 12, 1, "teacher") == 12 and "batch 12 instead of 16" in capsys.readouterr().err
    assert batch_for(16, 13, 2, "teacher") == 12
    with pytest.raises(ValueError, match="1 training images cannot feed 2 workers"):
        batch_for(16, 1, 2, "teacher")
