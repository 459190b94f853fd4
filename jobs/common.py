"""What the stage jobs share: prepared data, the labeled subset, stage directories and keys.

A stage's directory is ``RUN/<stage>-<key>``, the key a hash of its config section, the data
it reads and its upstream stage's key: a changed setting gets a fresh directory, the same
settings find their own again (and Ray Train's checkpoints in ``RUN/ray``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from drray.artifacts import atomic_directory
from drray.config import Config, ScalingConfig, run_dir, stages_dir, to_dict
from drray.data.shards import read_index
from drray.data.splits import binary_target, sample_labeled
from drray.distributed.runtime import ensure_ray
from drray.distributed.train import Scaling, StageRun, fit_stage
from drray.engine.checkpoint import MODEL_LEGACY, read_meta
from jobs.prepare import ensure_prepared

log = logging.getLogger(__name__)


def key_of(*parts) -> str:
    text = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def prepared_eyepacs(cfg: Config) -> dict:
    """Make sure the training data is prepared (synthesised first where configured); start Ray."""
    manifest = ensure_prepared("eyepacs", cfg.data.eyepacs, cfg)
    ensure_ray(cfg.run.num_cpus)
    return manifest


def data_key(cfg: Config, manifest: dict) -> str:
    """What every stage's key includes: the prepared data, the target definition and the run's
    seed (it seeds every stage's training)."""
    return key_of(manifest["content_hash"], cfg.data.positive, cfg.run.seed)


def training_seed(cfg: Config, stage: str) -> int:
    """The seed of a stage's training. Stages after pretraining also follow ``labels.seed``: a
    sweep's seeds then vary both the labeled subset and the initialisation, while the one
    pretraining they share keeps ``run.seed``. (labels.seed 0 leaves run.seed unchanged.)"""
    return cfg.run.seed if stage == "pretrain" else cfg.run.seed + 1_000_003 * cfg.labels.seed


@dataclass(frozen=True)
class LabeledSubset:
    labeled: dict[str, float]  # image_id -> binary target
    validation: dict[str, float]
    available: int  # labeled train images outside the validation hold-out: what a fraction is of


def labeled_subset(cfg: Config) -> LabeledSubset:
    """The seeded, nested labeled subset and validation hold-out of the train split."""
    index = read_index(cfg.data.eyepacs.prepared).to_pylist()
    rows = [r for r in index if r["split"] == "train" and r["grade"] is not None]
    if not rows:
        raise ValueError(f"{cfg.data.eyepacs.prepared}: no labeled images in the train split")
    ids = [r["image_id"] for r in rows]
    grades = [r["grade"] for r in rows]
    lab = cfg.labels
    labeled, validation = sample_labeled(ids, grades, fraction=lab.fraction, count=lab.count,
                                         strategy=lab.strategy, seed=lab.seed, positive=cfg.data.positive,
                                         val_count=lab.val_count)
    grade_of = dict(zip(ids, grades, strict=True))
    target = lambda i: float(binary_target(grade_of[i], cfg.data.positive))  # noqa: E731
    return LabeledSubset({i: target(i) for i in labeled}, {i: target(i) for i in validation},
                         len(rows) - len(validation))


def pool_ids(cfg: Config) -> list[str]:
    """The unlabeled pool: every prepared train-split image (labels unused)."""
    return [r["image_id"] for r in read_index(cfg.data.eyepacs.prepared).to_pylist() if r["split"] == "train"]


def stage_dir(cfg: Config, stage: str, key: str) -> Path:
    """``<run.stages or RUN>/<stage>-<key>``, absolute: Ray workers run in directories of their own."""
    path = (stages_dir(cfg) / f"{stage}-{key}").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def storage(cfg: Config) -> Path:
    """Where Ray Train keeps checkpoints for resumption (next to the stage directories)."""
    return stages_dir(cfg) / "ray"


def scaling_of(cfg: Config, scaling: ScalingConfig, keep_checkpoints: int) -> Scaling:
    return Scaling(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                   cpus_per_worker=scaling.cpus_per_worker, keep_checkpoints=keep_checkpoints,
                   max_failures=cfg.run.max_failures)


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    return max(1, n_rows // global_batch)


def stage_run(cfg: Config, section, section_name: str, *, name: str, out: Path, spec, step: str,
              n_rows: int, **extra) -> StageRun:
    """A stage's StageRun from its config section (epochs, batch_size, optim, scaling,
    checkpoint_every): what every training stage sets the same way."""
    return StageRun(
        name=name, out_dir=str(out), spec=spec, step=step, epochs=section.epochs,
        batch_size=per_worker_batch(section.batch_size, section.scaling, section_name),
        steps_per_epoch=steps_per_epoch(n_rows, section.batch_size), optim=to_dict(section.optim),
        precision=section.scaling.precision, channels_last=section.scaling.channels_last,
        checkpoint_every=section.checkpoint_every, seed=training_seed(cfg, section_name),
        epochs_per_pass=epochs_per_pass(section.epochs, n_rows), **extra,
    )


def fit(cfg: Config, section, run: StageRun, datasets: dict) -> dict:
    return fit_stage(run, datasets, scaling_of(cfg, section.scaling, section.keep_checkpoints), storage(cfg))


def epochs_per_pass(epochs: int, n_rows: int) -> int:
    """Epochs streamed by one pass of a stage's pipeline: EPOCHS_PER_PASS, or more for a small
    labeled subset (each pass costs seconds to start; its epochs cost little)."""
    from drray.distributed.datasets import EPOCHS_PER_PASS, MIN_ROWS_PER_PASS

    return max(1, min(epochs, max(EPOCHS_PER_PASS, -(-MIN_ROWS_PER_PASS // max(n_rows, 1)))))


def per_worker_batch(global_batch: int, scaling: ScalingConfig, what: str) -> int:
    if global_batch % scaling.num_workers:
        raise ValueError(f"{what}.batch_size {global_batch} is not divisible by "
                         f"{what}.scaling.num_workers {scaling.num_workers}")
    return global_batch // scaling.num_workers


def final_model(out: Path) -> Path:
    """A stage's model: the best by validation AUC where the stage validated, else the last."""
    best = out / "best"
    return best if (best / "model.pt").is_file() else out / "model"


def finished(out: Path, stage: str) -> dict | None:
    """What a stage that already completed in ``out`` returned (then it is skipped), else None:
    the same keys as a fresh run's result."""
    if (out / "done.json").is_file() and (out / "model" / "model.pt").is_file():
        log.info("%s: complete in %s, skipped", stage, out)
        result = {"stage": stage, "dir": str(out), "skipped": True,
                  "metrics": json.loads((out / "done.json").read_text())["metrics"]}
        join = out / "pseudolabel_join.json"
        if join.is_file():
            result["pseudolabel_join"] = json.loads(join.read_text())
        return result
    return None


def publish_model(cfg: Config, name: str, stage_out: Path, manifest: dict) -> Path:
    """``RUN/models/<name>``: the stage's final model (weights hard-linked, not copied, where the
    file system allows) with its preprocessing, for ``drray predict`` and ``drray run evaluate``."""
    source = final_model(stage_out)
    meta = read_meta(source)
    meta.update(source=str(source), preprocessing=manifest["params"], positive=cfg.data.positive)
    final = run_dir(cfg) / "models" / name
    with atomic_directory(final, what="published model folder", legacy=MODEL_LEGACY) as tmp:
        try:
            os.link(source / "model.pt", tmp / "model.pt")
        except OSError:
            shutil.copyfile(source / "model.pt", tmp / "model.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return final
