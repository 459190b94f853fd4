"""Stage 1, ``drray run pretrain``: SimCLR on the unlabeled train pool (labels unused for
training; ``pretrain.monitor_every`` probes the features with the label budget's images)."""

from __future__ import annotations

import time

from drray.artifacts import StageDir
from drray.config import Config, to_dict
from drray.distributed.datasets import Selection, Stream
from drray.engine.model import ModelSpec
from drray.methods import SimCLR
from drray.progress import say
from jobs import common


def run(cfg: Config) -> dict:
    _, r = common.resolved(cfg, "pretrain")
    if done := common.finished(cfg, r):
        return done
    p, size = cfg.pretrain, cfg.data.size
    common.start_stage(cfg, r.dir)
    method = SimCLR.from_config(p, size)
    probe = _probe_streams(cfg, r.dir) if p.monitor_every else {}
    plan = common.fit_plan(cfg, r, method=method, n_rows=len(common.pool_ids(cfg)),
                           spec=ModelSpec("simclr", p.backbone, size, p.init, p.weights, p.proj_hidden, p.proj_out),
                           probe_every=p.monitor_every if probe else 0)
    pool = Selection(cfg.data.eyepacs.prepared, method.train_views, size, split="train")
    return common.fit(cfg, r, plan, {"train": Stream(pool, plan.batch_size,
                                                            epochs_per_pass=plan.epochs_per_pass), **probe})


def _probe_streams(cfg: Config, out: StageDir) -> dict:
    """The monitor's images: the label budget's labeled subset votes on its validation hold-out
    (the grades the teacher will read anyway: no label outside the budget). The weights do not
    depend on them, so the stage's key does not: a sweep's shared pretraining shows the probe of
    the labels of the run that trained it (recorded in metrics.jsonl)."""
    subset = common.labeled_subset(cfg)
    if not subset.validation:
        say("pretrain", "monitor off: labels.validation is 0, so the probe has no images to vote on")
        return {}
    out.append_metrics(
        {"event": "monitor", "labeled": len(subset.labeled), "validation": len(subset.validation),
         "labels": to_dict(cfg.labels), "time": time.time()})
    return {"probe_train": common.labeled_stream(cfg, subset.labeled),
            "probe_val": common.labeled_stream(cfg, subset.validation)}
