"""Table 1's semi-supervised baselines, ``drray run fixmatch`` and ``drray run mixmatch``: a
classifier trained from scratch (or ImageNet) on the same labeled subset as the teacher plus the
whole train split as unlabeled data, on the same engine and Ray Train layer as every stage
(distributed, checkpointed, resumable). Validated, kept as best and published: the EMA of the
weights.

One step = a batch of B labeled images (weak view: flip + translate) and mu x B unlabeled ones
(FixMatch: a weak and a strong view each; MixMatch: K weak views each); an epoch = one pass over
the unlabeled images. The labeled subset repeats as often as a pass needs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from drray.artifacts import atomic_write_json, write_resolved_config
from drray.config import Config, SemiSupervisedConfig
from drray.distributed.datasets import Selection, stage_dataset
from drray.engine.model import ModelSpec
from jobs import common

METHODS = ("fixmatch", "mixmatch")


def stage_key(cfg: Config, method: str, manifest: dict) -> str:
    return common.key_of(method, getattr(cfg, method), cfg.labels, cfg.data.size, common.data_key(cfg, manifest))


def output_dir(cfg: Config, method: str, manifest: dict) -> Path:
    return common.stage_dir(cfg, method, stage_key(cfg, method, manifest))


def run(cfg: Config, method: str) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown semi-supervised method {method!r}: choose {', '.join(METHODS)}")
    manifest = common.prepared_eyepacs(cfg)
    section: SemiSupervisedConfig = getattr(cfg, method)
    out = output_dir(cfg, method, manifest)
    if done := common.finished(out, method):
        return done
    write_resolved_config(out, cfg)
    subset = common.labeled_subset(cfg)
    atomic_write_json(out / "subset.json", {"labeled": sorted(subset.labeled), "validation": sorted(subset.validation)})
    pool = common.pool_ids(cfg)  # every train image, the labeled ones included (both papers)
    size = cfg.data.size
    unlabeled_global = section.mu * section.batch_size
    if len(pool) < unlabeled_global:
        raise ValueError(f"{method}: the unlabeled batch ({method}.mu x batch_size = {unlabeled_global}) is larger "
                         f"than the {len(pool)} train images: lower {method}.mu or {method}.batch_size")
    run_spec = common.stage_run(
        cfg, section, method, name=method, out=out, step=method, n_rows=len(pool) // section.mu,
        spec=ModelSpec("classifier", section.backbone, size, section.init, section.weights, dropout=section.dropout),
        validate=bool(subset.validation), ema_decay=section.ema_decay,
        unlabeled_batch=common.per_worker_batch(unlabeled_global, section.scaling, method),
        ssl=_settings(cfg, method, len(pool)),
    )
    _warn_if_ema_is_mostly_initial(method, section.ema_decay, run_spec.steps_per_epoch * run_spec.epochs)
    # enough copies of the labeled subset for every step of a pass to take B labeled images
    labeled_per_pass = run_spec.steps_per_epoch * section.batch_size * run_spec.epochs_per_pass
    copies = math.ceil(labeled_per_pass / max(1, len(subset.labeled)))
    prepared = cfg.data.eyepacs.prepared
    unlabeled_mode = Selection(prepared, method, size, split="train", views=getattr(section, "augmentations", 2),
                               strong_ops=getattr(section, "randaugment_ops", 2), cutout=getattr(section, "cutout", 0.5))
    datasets = {
        "train": stage_dataset(Selection(prepared, "weak", size, split="train", targets=subset.labeled),
                               run_spec.batch_size, full_shuffle=True, epochs_per_pass=copies),
        "unlabeled": stage_dataset(unlabeled_mode, run_spec.unlabeled_batch, epochs_per_pass=run_spec.epochs_per_pass),
        "val": stage_dataset(Selection(prepared, "eval", size, split="train", targets=subset.validation), 256),
    }
    metrics = common.fit(cfg, section, run_spec, datasets)
    return {"stage": method, "dir": str(out), "metrics": metrics}


def initial_weight_in_ema(decay: float, steps: int) -> float:
    """The share of the initial (random) weights left in an EMA after ``steps`` updates."""
    return decay ** steps


def _warn_if_ema_is_mostly_initial(method: str, decay: float, steps: int) -> None:
    """The references' 0.999 averages over ~1,000 steps; a short run evaluating that EMA
    evaluates mostly its random initialisation (seen at demo scale: validation AUC below 0.5)."""
    share = initial_weight_in_ema(decay, steps)
    if share > 0.1:
        print(f"[{method}] warning: after this run's {steps} steps the EMA of the weights (ema_decay {decay:g}) "
              f"still holds {share:.0%} of the initial weights, and the EMA is what is evaluated and published; "
              f"lower {method}.ema_decay (e.g. {1 - 3 / max(steps, 30):.3g}) or train longer", file=sys.stderr, flush=True)


def _settings(cfg: Config, method: str, n_pool: int) -> dict:
    section = getattr(cfg, method)
    if method == "fixmatch":
        return {"threshold": section.threshold, "lambda_u": section.lambda_u}
    steps_per_epoch = common.steps_per_epoch(n_pool // section.mu, section.batch_size)
    return {"temperature": section.temperature, "alpha": section.alpha, "lambda_u": section.lambda_u,
            "rampup_steps": section.rampup_epochs * steps_per_epoch}


def run_fixmatch(cfg: Config) -> dict:
    return run(cfg, "fixmatch")


def run_mixmatch(cfg: Config) -> dict:
    return run(cfg, "mixmatch")
