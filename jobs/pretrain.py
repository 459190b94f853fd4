"""Stage 1, ``drray run pretrain``: SimCLR on the unlabeled train pool (labels unused)."""

from __future__ import annotations

from drray.config import Config
from drray.distributed.datasets import Selection, Stream
from drray.engine.model import ModelSpec
from drray.methods import SimCLR
from jobs import common


def run(cfg: Config) -> dict:
    _, r = common.resolved(cfg, "pretrain")
    if done := common.finished(cfg, r):
        return done
    p, size = cfg.pretrain, cfg.data.size
    common.start_stage(cfg, r.dir)
    method = SimCLR.from_config(p, size)
    plan = common.fit_plan(cfg, r, method=method, n_rows=len(common.pool_ids(cfg)),
                           spec=ModelSpec("simclr", p.backbone, size, p.init, p.weights, p.proj_hidden, p.proj_out))
    pool = Selection(cfg.data.eyepacs.prepared, method.train_views, size, split="train")
    return common.fit(cfg, r, plan, {"train": Stream(pool, plan.batch_size,
                                                            epochs_per_pass=plan.epochs_per_pass)})
