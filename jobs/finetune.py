"""Stages 2 and 4, ``drray run finetune`` (teacher) and ``drray run student-finetune``: supervised
fine-tuning on the labeled subset, with validation AUC per epoch, the best and the last model.

One job for both: the config section says what to start from (``start_from``): the SimCLR
backbone (``pretrain``), the distilled student (``distill``), or any drray checkpoint directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from drray.artifacts import atomic_write_json, write_resolved_config
from drray.config import Config, FinetuneConfig
from drray.distributed.datasets import Selection, stage_dataset
from drray.engine.checkpoint import read_meta
from drray.engine.model import ModelSpec
from jobs import common

log = logging.getLogger(__name__)
STAGE_NAMES = {"finetune": "teacher", "student_finetune": "student", "supervised": "supervised"}


def _start_point(cfg: Config, section: FinetuneConfig, manifest: dict) -> tuple[Path | None, str]:
    """(checkpoint dir to start from, its stage key) for ``start_from``; None: from scratch."""
    if section.start_from == "none":
        return None, "scratch"
    if section.start_from == "pretrain":
        from jobs import pretrain

        return pretrain.output_dir(cfg, manifest) / "model", pretrain.stage_key(cfg, manifest)
    if section.start_from == "distill":
        from jobs import distill

        return distill.output_dir(cfg, manifest) / "model", distill.stage_key(cfg, manifest)
    path = Path(section.start_from).resolve()
    return path, common.key_of(str(path.resolve()), read_meta(path).get("metrics"))


def stage_key(cfg: Config, section_name: str, manifest: dict) -> str:
    section: FinetuneConfig = getattr(cfg, section_name)
    _, upstream = _start_point(cfg, section, manifest)
    return common.key_of(section_name, section, cfg.labels, upstream, common.data_key(cfg, manifest))


def output_dir(cfg: Config, section_name: str, manifest: dict) -> Path:
    return common.stage_dir(cfg, STAGE_NAMES[section_name], stage_key(cfg, section_name, manifest))


def run(cfg: Config, section_name: str = "finetune") -> dict:
    manifest = common.prepared_eyepacs(cfg)
    section: FinetuneConfig = getattr(cfg, section_name)
    name = STAGE_NAMES[section_name]
    out = output_dir(cfg, section_name, manifest)
    if done := common.finished(out, name):
        return done
    start, _ = _start_point(cfg, section, manifest)
    size = cfg.data.size
    if start is None:
        spec = ModelSpec("classifier", section.backbone, size, section.init, section.weights,
                         head_hidden=section.head_hidden, dropout=section.dropout)
        whole_model = False
    else:
        if not (start / "model.pt").is_file():
            raise FileNotFoundError(f"{section_name}.start_from={section.start_from}: no model at {start}; "
                                    f"run that stage first")
        start_spec = ModelSpec.from_dict(read_meta(start)["spec"])
        spec = ModelSpec("classifier", start_spec.backbone, size, head_hidden=section.head_hidden,
                         dropout=section.dropout)
        whole_model = start_spec.kind == "classifier" and start_spec.head_hidden == section.head_hidden
    write_resolved_config(out, cfg)
    subset = common.labeled_subset(cfg)
    atomic_write_json(out / "subset.json", {"labeled": sorted(subset.labeled), "validation": sorted(subset.validation)})
    run_spec = common.stage_run(
        cfg, section, section_name, name=name, out=out, spec=spec, step="classify", n_rows=len(subset.labeled),
        init_model=str(start) if whole_model else None,
        init_backbone=str(start) if start is not None and not whole_model else None,
        validate=bool(subset.validation), patience=section.patience if subset.validation else None,
        min_delta=section.min_delta,
    )
    prepared = cfg.data.eyepacs.prepared
    datasets = {
        "train": stage_dataset(Selection(prepared, "train", size, split="train", targets=subset.labeled),
                               run_spec.batch_size, full_shuffle=True, epochs_per_pass=run_spec.epochs_per_pass),
        "val": stage_dataset(Selection(prepared, "eval", size, split="train", targets=subset.validation),
                             256),
    }
    metrics = common.fit(cfg, section, run_spec, datasets)
    return {"stage": name, "dir": str(out), "metrics": metrics}


def run_student(cfg: Config) -> dict:
    return run(cfg, "student_finetune")


def run_supervised(cfg: Config) -> dict:
    return run(cfg, "supervised")
