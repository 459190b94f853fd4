"""Stage 3, ``drray run distill``: the student learns the teacher's pseudo-labels on the
unlabeled pool, with noise on its input (colour jitter, flips).

Pseudo-labels come from the Parquet contract (``image_id``, ``prob``, ``label``): the pseudolabel
stage's table, or ``distill.pseudolabels``. A pool image without a pseudo-label, or a
pseudo-label without a pool image, is counted and reported in ``pseudolabel_join.json``, never
dropped silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from drray.artifacts import atomic_write_json
from drray.config import Config
from drray.distributed.datasets import Selection, Stream
from drray.engine.model import ModelSpec
from drray.methods import Classify
from jobs import common, stages

log = logging.getLogger(__name__)


def join_pseudolabels(path: Path, pool: list[str], targets: str) -> tuple[dict[str, float], dict]:
    """Targets for the pool images from the pseudo-label table, and the counts of the join."""
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-labels {path} not found: run `drray run pseudolabel` with the same "
                                f"config, or point distill.pseudolabels at a Parquet table (image_id, prob, label)")
    table = pq.read_table(path, columns=["image_id", "prob", "label"]).to_pylist()
    column = "label" if targets == "hard" else "prob"
    labels = {r["image_id"]: float(r[column]) for r in table}
    pool_set = set(pool)
    counts = {
        "pool_images": len(pool_set), "pseudolabels": len(labels),
        "used": len(pool_set & labels.keys()),
        "pool_without_pseudolabel": len(pool_set - labels.keys()),
        "pseudolabel_without_image": len(labels.keys() - pool_set),
        "duplicate_pseudolabel_rows": len(table) - len(labels),
        "targets": targets,
    }
    return {i: labels[i] for i in pool if i in labels}, counts


def run(cfg: Config) -> dict:
    manifest, r = common.resolved(cfg, "distill")
    if done := common.finished(cfg, r):
        return done
    d = cfg.distill
    targets, counts = join_pseudolabels(stages.pseudolabels_path(cfg, manifest), common.pool_ids(cfg), d.targets)
    if not targets:
        raise ValueError("distill: no pool image has a pseudo-label")
    common.start_stage(cfg, r.dir)
    join = r.dir.file(common.PSEUDOLABEL_JOIN)
    atomic_write_json(join, counts)
    if counts["pool_without_pseudolabel"] or counts["pseudolabel_without_image"]:
        log.warning("distill: %d pool images have no pseudo-label, %d pseudo-labels match no pool image "
                    "(see %s)", counts["pool_without_pseudolabel"], counts["pseudolabel_without_image"], join)
    size = cfg.data.size
    method = Classify.from_config(d)
    plan = common.fit_plan(cfg, r, method=method, n_rows=len(targets),
                           spec=ModelSpec("classifier", d.backbone, size, d.init, d.weights, dropout=d.dropout))
    selection = Selection(cfg.data.eyepacs.prepared, method.train_views, size, split="train", targets=targets)
    datasets = {"train": Stream(selection, plan.batch_size, epochs_per_pass=plan.epochs_per_pass)}
    return {**common.fit(cfg, r, plan, datasets), "pseudolabel_join": counts}
