"""Stage 3, ``drray run distill``: the student learns the teacher's pseudo-labels on the
unlabeled pool, with noise on its input (colour jitter, flips).

Pseudo-labels come from the Parquet contract (``image_id``, ``prob``, ``label``). A pool image
without a pseudo-label, or a pseudo-label without a pool image, is counted and reported in
``pseudolabel_join.json``, never dropped silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from drray.artifacts import atomic_write_json, sha256_file, write_resolved_config
from drray.config import Config
from drray.distributed.datasets import Selection, stage_dataset
from drray.engine.model import ModelSpec
from jobs import common, pseudolabel

log = logging.getLogger(__name__)


def stage_key(cfg: Config, manifest: dict) -> str:
    labels = pseudolabel.output_path(cfg, manifest)
    labels_hash = sha256_file(labels) if labels.is_file() else "missing"
    return common.key_of("distill", cfg.distill, cfg.data.size, labels_hash, cfg.labels.seed,
                         common.data_key(cfg, manifest))


def output_dir(cfg: Config, manifest: dict) -> Path:
    return common.stage_dir(cfg, "distill", stage_key(cfg, manifest))


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
    manifest = common.prepared_eyepacs(cfg)
    d = cfg.distill
    out = output_dir(cfg, manifest)
    if done := common.finished(out, "distill"):
        return done
    targets, counts = join_pseudolabels(pseudolabel.output_path(cfg, manifest), common.pool_ids(cfg), d.targets)
    atomic_write_json(out / "pseudolabel_join.json", counts)
    if counts["pool_without_pseudolabel"] or counts["pseudolabel_without_image"]:
        log.warning("distill: %d pool images have no pseudo-label, %d pseudo-labels match no pool image "
                    "(see %s)", counts["pool_without_pseudolabel"], counts["pseudolabel_without_image"],
                    out / "pseudolabel_join.json")
    if not targets:
        raise ValueError("distill: no pool image has a pseudo-label")
    write_resolved_config(out, cfg)
    size = cfg.data.size
    run_spec = common.stage_run(
        cfg, d, "distill", name="distill", out=out, step="classify", n_rows=len(targets),
        spec=ModelSpec("classifier", d.backbone, size, d.init, d.weights, dropout=d.dropout),
    )
    selection = Selection(cfg.data.eyepacs.prepared, "train", size, split="train", targets=targets, jitter=d.jitter)
    datasets = {"train": stage_dataset(selection, run_spec.batch_size, epochs_per_pass=run_spec.epochs_per_pass)}
    metrics = common.fit(cfg, d, run_spec, datasets)
    return {"stage": "distill", "dir": str(out), "metrics": metrics, "pseudolabel_join": counts}
