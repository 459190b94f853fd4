"""Stage 1, ``drray run pretrain``: SimCLR on the unlabeled train pool (labels unused)."""

from __future__ import annotations

import logging

from drray.artifacts import write_resolved_config
from drray.config import Config
from drray.data.transforms import AugmentSpec
from drray.distributed.datasets import Selection, stage_dataset
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
    run_spec = common.stage_run(
        cfg, p, "pretrain", name="pretrain", out=out, step="simclr", n_rows=n_pool,
        spec=ModelSpec("simclr", p.backbone, size, p.init, p.weights, p.proj_hidden, p.proj_out),
        temperature=p.temperature, gather=p.gather_negatives,
    )
    datasets = {"train": stage_dataset(selection, run_spec.batch_size, epochs_per_pass=run_spec.epochs_per_pass)}
    metrics = common.fit(cfg, p, run_spec, datasets)
    return {"stage": "pretrain", "dir": str(out), "metrics": metrics}
