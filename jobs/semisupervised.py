"""Table 1's semi-supervised baselines, ``drray run fixmatch`` and ``drray run mixmatch``: a
classifier started from scratch, ImageNet or the run's SimCLR backbone (``init``), trained on the
same labeled subset as the teacher plus the whole train split as unlabeled data, on the same
engine and Ray Train layer as every stage (distributed, checkpointed, resumable). Validated,
kept as best and published: the EMA of the weights.

One step = a batch of B labeled images (weak view: flip + translate) and mu x B unlabeled ones
(FixMatch: a weak and a strong view each; MixMatch: K weak views each: the method's
``unlabeled_views``); an epoch = one pass over the unlabeled images. The labeled subset repeats
as often as a pass needs.
"""

from __future__ import annotations

import math

from drray.artifacts import StageDir, atomic_write_json
from drray.config import Config, FixMatchConfig, MixMatchConfig, SemiSupervisedConfig
from drray.distributed.datasets import Selection, Stream
from drray.engine.checkpoint import read_meta
from drray.engine.model import ModelSpec
from drray.methods import FixMatch, MixMatch
from drray.progress import say
from jobs import common, stages


def method_of(section: SemiSupervisedConfig, n_pool: int, labeled_prior: float) -> FixMatch | MixMatch:
    """``labeled_prior``: the labeled training images' positive share (distribution alignment's target)."""
    steps_per_epoch = common.steps_per_epoch(n_pool // section.mu, section.batch_size)
    if isinstance(section, FixMatchConfig):
        return FixMatch.from_config(section, steps_per_epoch, labeled_prior)
    assert isinstance(section, MixMatchConfig), section
    return MixMatch.from_config(section, steps_per_epoch, labeled_prior)


def initial_model(cfg: Config, r: stages.Resolved) -> tuple[ModelSpec, str | None]:
    """The baseline's model, and the checkpoint folder whose backbone starts it: with init
    ``pretrained`` the pretraining stage's model (the SimCLR backbone the teacher starts from),
    else None (random or ImageNet weights, ``init`` and ``weights``)."""
    section: SemiSupervisedConfig = r.stage.config(cfg)
    name, size = r.stage.name, cfg.data.size
    if section.init != "pretrained":
        return ModelSpec("classifier", section.backbone, size, section.init, section.weights,
                         dropout=section.dropout), None
    model = StageDir(r.upstream["pretrain"]).model
    if not (model / "model.pt").is_file():
        raise FileNotFoundError(f"{name}.init=pretrained: no pretrained model at {model}; run "
                                f"`drray run pretrain` with the same config first")
    pretrained = ModelSpec.from_dict(read_meta(model)["spec"]).backbone
    if pretrained != section.backbone:
        raise ValueError(f"{name}.init=pretrained starts from the pretraining's {pretrained} backbone, but "
                         f"{name}.backbone is {section.backbone}: set {name}.backbone={pretrained}")
    return ModelSpec("classifier", section.backbone, size, dropout=section.dropout), str(model)


def run(cfg: Config, name: str) -> dict:
    _, r = common.resolved(cfg, name)
    if done := common.finished(cfg, r):
        return done
    section: SemiSupervisedConfig = r.stage.config(cfg)
    pool = common.pool_ids(cfg)  # every train image, the labeled ones included (both papers)
    unlabeled_global = section.mu * section.batch_size
    if len(pool) < unlabeled_global:
        raise ValueError(f"{name}: the unlabeled batch ({name}.mu x batch_size = {unlabeled_global}) is larger "
                         f"than the {len(pool)} train images: lower {name}.mu or {name}.batch_size")
    common.start_stage(cfg, r.dir)
    subset = common.labeled_subset(cfg)
    atomic_write_json(r.dir.subset_file, subset.record())
    size = cfg.data.size
    method = method_of(section, len(pool), sum(subset.labeled.values()) / max(1, len(subset.labeled)))
    spec, start = initial_model(cfg, r)
    scaling = common.stage_scaling(cfg, r)
    plan = common.fit_plan(
        cfg, r, method=method, n_rows=len(pool) // section.mu, streamed_rows=len(pool), spec=spec,
        init_backbone=start, scaling=scaling, validate=bool(subset.validation), ema_decay=section.ema_decay,
        unlabeled_batch=common.per_worker_batch(unlabeled_global, scaling, name),
    )
    _warn_if_ema_is_mostly_initial(name, section.ema_decay, plan.steps_per_epoch * plan.epochs)
    # enough copies of the labeled subset for every step of a pass to take B labeled images
    labeled_per_pass = plan.steps_per_epoch * section.batch_size * plan.epochs_per_pass
    copies = math.ceil(labeled_per_pass / max(1, len(subset.labeled)))
    prepared = cfg.data.eyepacs.prepared
    datasets = {
        "train": Stream(Selection(prepared, method.train_views, size, split="train", targets=subset.labeled),
                               plan.batch_size, epochs_per_pass=copies),
        "unlabeled": Stream(Selection(prepared, method.unlabeled_views, size, split="train"),
                                   plan.unlabeled_batch, epochs_per_pass=plan.epochs_per_pass),
        "val": common.labeled_stream(cfg, subset.validation),
    }
    return common.fit(cfg, r, plan, datasets)


def initial_weight_in_ema(decay: float, steps: int) -> float:
    """The share of the initial (random) weights left in an EMA after ``steps`` updates."""
    return decay ** steps


def _warn_if_ema_is_mostly_initial(method: str, decay: float, steps: int) -> None:
    """The references' 0.999 averages over ~1,000 steps; a short run evaluating that EMA
    evaluates mostly its random initialisation (seen at demo scale: validation AUC below 0.5)."""
    share = initial_weight_in_ema(decay, steps)
    if share > 0.1:
        say(method, f"warning: after this run's {steps} steps the EMA of the weights (ema_decay {decay:g}) "
              f"still holds {share:.0%} of the initial weights, and the EMA is what is evaluated and published; "
              f"lower {method}.ema_decay (e.g. {1 - 3 / max(steps, 30):.3g}) or train longer")


def run_fixmatch(cfg: Config) -> dict:
    return run(cfg, "fixmatch")


def run_mixmatch(cfg: Config) -> dict:
    return run(cfg, "mixmatch")
