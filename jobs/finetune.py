"""Stages 2 and 4, ``drray run teacher`` and ``drray run student`` (and the supervised baseline):
supervised fine-tuning on the labeled subset, with validation AUC per epoch, the best and the
last model.

One job for all three: the config section says what to start from (``start_from``): the SimCLR
backbone (``pretrain``), the distilled student (``distill``), any drray checkpoint directory, or
nothing (``none``: the backbone from scratch, or from ImageNet weights).
"""

from __future__ import annotations

from pathlib import Path

from drray.artifacts import StageDir, atomic_write_json
from drray.config import Config, FinetuneConfig
from drray.distributed.datasets import Selection, Stream
from drray.engine.checkpoint import read_meta
from drray.engine.model import ModelSpec
from drray.methods import Classify
from jobs import common, stages


def _start_point(cfg: Config, r: stages.Resolved) -> Path | None:
    """The checkpoint directory to start from (an upstream stage's model, or the user's); None: scratch."""
    section: FinetuneConfig = r.stage.config(cfg)
    if section.start_from == "none":
        return None
    if r.upstream:
        (upstream,) = r.upstream.values()
        model = StageDir(upstream).model
        if not (model / "model.pt").is_file():
            raise FileNotFoundError(f"{r.stage.section}.start_from={section.start_from}: no model at {model}; "
                                    f"run `drray run {section.start_from}` with the same config first")
        return model
    return Path(section.start_from).resolve()


def run(cfg: Config, name: str = "teacher") -> dict:
    manifest, r = common.resolved(cfg, name)
    if done := common.finished(cfg, r):
        return done
    section: FinetuneConfig = r.stage.config(cfg)
    start = _start_point(cfg, r)
    size = cfg.data.size
    if start is None:
        spec = ModelSpec("classifier", section.backbone, size, section.init, section.weights,
                         head_hidden=section.head_hidden, dropout=section.dropout)
        whole_model = False
    else:
        start_spec = ModelSpec.from_dict(read_meta(start)["spec"])
        spec = ModelSpec("classifier", start_spec.backbone, size, head_hidden=section.head_hidden,
                         dropout=section.dropout)
        whole_model = start_spec.kind == "classifier" and start_spec.head_hidden == section.head_hidden
    common.start_stage(cfg, r.dir)
    subset = common.labeled_subset(cfg)
    atomic_write_json(r.dir.subset_file, subset.record())
    method = Classify.from_config(section)
    plan = common.fit_plan(
        cfg, r, spec=spec, method=method, n_rows=len(subset.labeled),
        init_model=str(start) if whole_model else None,
        init_backbone=str(start) if start is not None and not whole_model else None,
        validate=bool(subset.validation), patience=section.patience if subset.validation else None,
        min_delta=section.min_delta,
    )
    prepared = cfg.data.eyepacs.prepared
    datasets = {
        "train": Stream(Selection(prepared, method.train_views, size, split="train", targets=subset.labeled),
                               plan.batch_size, epochs_per_pass=plan.epochs_per_pass),
        "val": common.labeled_stream(cfg, subset.validation),
    }
    return common.fit(cfg, r, plan, datasets)


def run_teacher(cfg: Config) -> dict:
    return run(cfg, "teacher")


def run_student(cfg: Config) -> dict:
    return run(cfg, "student")


def run_supervised(cfg: Config) -> dict:
    return run(cfg, "supervised")
