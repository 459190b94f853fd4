"""Stage 1, ``drray run pretrain``: SimCLR on the unlabeled train pool (labels unused)."""

from __future__ import annotations

import logging

from drray.artifacts import write_resolved_config
from drray.config import Config
from drray.data.transforms import AugmentSpec
from drray.distributed.datasets import Selection, stage_dataset
from drray.distributed.train import StageRun, fit_stage
from drray.engine.model import ModelSpec
from jobs import common

log = logging.getLogger(__name__)


def stage_key(cfg: Config, manifest: dict) -> str:
    return common.key_of("pretrain", cfg.pretrain, cfg.data.size, common.data_key(cfg, manifest))


def output_dir(cfg: Config, manifest: dict):
    return common.stage_dir(cfg, "pretrain", stage_key(cfg, manifest))


def run(cfg: Config) -> dict:
    manifest = common.prepared_eyepacs(cfg)
    p = cfg.pretrain
    out = output_dir(cfg, manifest)
    if done := common.finished(out, "pretrain"):
        return done
    write_resolved_config(out, cfg)
    size = cfg.data.size
    augment = AugmentSpec(size=size, **common.to_dict(p.augment))
    n_pool = len(common.pool_ids(cfg))
    selection = Selection(cfg.data.eyepacs.prepared, "simclr", size, split="train", augment=augment)
    run_spec = StageRun(
        name="pretrain", out_dir=str(out),
        spec=ModelSpec("simclr", p.backbone, size, p.init, p.weights, p.proj_hidden, p.proj_out),
        step="simclr", epochs=p.epochs, batch_size=common.per_worker_batch(p.batch_size, p.scaling, "pretrain"),
        steps_per_epoch=common.steps_per_epoch(n_pool, p.batch_size), optim=common.to_dict(p.optim),
        precision=p.scaling.precision, channels_last=p.scaling.channels_last, temperature=p.temperature,
        gather=p.gather_negatives, checkpoint_every=p.checkpoint_every, seed=cfg.run.seed,
        epochs_per_pass=common.epochs_per_pass(p.epochs),
    )
    datasets = {"train": stage_dataset(selection, run_spec.batch_size, epochs_per_pass=run_spec.epochs_per_pass)}
    metrics = fit_stage(run_spec, datasets, common.scaling_of(cfg, p.scaling, p.keep_checkpoints), common.storage(cfg))
    return {"stage": "pretrain", "dir": str(out), "metrics": metrics}
