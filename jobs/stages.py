"""The stage graph in one place: one record per stage, and one pure function that resolves every
stage's key and directory for a config.

A stage has one name (its CLI job, its directory prefix, its row in ``pipeline.json`` and the
report), its config section, the stages whose outputs it reads, what its key is made of, and the
job function that runs it (``module:function``, imported when the stage runs: job modules never
import each other, they find each other's outputs here). The CLI, the pipeline, the sweep,
table1, evaluation and the report read this table.

The cache rule, the same for every keyed stage: a stage's output lives in
``<run.stages>/<name>-<key>/``, the key a hash of everything the output depends on (its config
section, the data's content hash, the target definition, the seed it trains with, the labels it
reads, its upstream stages' keys); it is complete when its ``done.json`` exists (written last).
A finished stage is skipped; a changed input gives another key, so another directory.
(Prepared data follows the same rule with its own names: a folder the user names, its key the
inputs' fingerprint and the parameters, ``manifest.json`` written last.)

Adding a stage: a record here, its job function, its tests.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from drray.artifacts import StageDir
from drray.config import (
    Config,
    ConfigError,
    FinetuneConfig,
    OofConfig,
    SemiSupervisedConfig,
    stages_dir,
    to_dict,
)

# finetune.start_from values that name a stage (anything else is a checkpoint directory)
START_FROM = {"pretrain": "pretrain", "distill": "distill"}


@dataclass(frozen=True)
class Stage:
    name: str
    what: str  # one line: --help, the pipeline's progress
    runner: str  # "module:function", run(cfg) -> result dict
    section: str | None = None  # its config section (a Config field)
    upstream: tuple[str, ...] = ()  # stages it reads, when the config does not say otherwise
    reads_labels: bool = False  # reads training grades: its key includes the labels section
    keyed: bool = True  # has a <name>-<key> directory
    publishes: bool = False  # its final model is published as RUN/models/<name>
    training: bool = False  # a Ray Train stage (its section has epochs, batch_size, scaling)
    key_fields: tuple[str, ...] | None = None  # the section's fields its output depends on (None: all)
    aliases: tuple[str, ...] = ()  # older CLI job names that still work

    def function(self) -> Callable[[Config], dict]:
        module, _, name = self.runner.partition(":")
        return getattr(importlib.import_module(module), name)

    def config(self, cfg: Config):
        return getattr(cfg, self.section) if self.section else None


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("prepare", "synthesise (where configured) and prepare every data set the config names",
          "jobs.prepare:run", keyed=False),
    Stage("pretrain", "stage 1: SimCLR pretraining on the unlabeled train pool",
          "jobs.pretrain:run", "pretrain", training=True),
    Stage("teacher", "stage 2: the teacher, fine-tuned from finetune.start_from (the SimCLR backbone)",
          "jobs.finetune:run_teacher", "finetune", ("pretrain",), reads_labels=True, publishes=True, training=True,
          aliases=("finetune",)),
    Stage("supervised", "baseline: the labeled subset alone, no pretraining",
          "jobs.finetune:run_supervised", "supervised", reads_labels=True, publishes=True, training=True),
    Stage("fixmatch", "baseline: FixMatch on the labeled subset + the unlabeled pool",
          "jobs.semisupervised:run_fixmatch", "fixmatch", reads_labels=True, publishes=True, training=True),
    Stage("mixmatch", "baseline: MixMatch on the labeled subset + the unlabeled pool",
          "jobs.semisupervised:run_mixmatch", "mixmatch", reads_labels=True, publishes=True, training=True),
    Stage("pseudolabel", "the teacher labels the unlabeled pool (Ray Data batch inference)",
          "jobs.pseudolabel:run", "pseudolabel", ("teacher",), key_fields=("threshold", "precision")),
    Stage("distill", "stage 3: the student learns the teacher's pseudo-labels",
          "jobs.distill:run", "distill", ("pseudolabel",), training=True),
    Stage("student", "stage 4: the distilled student fine-tuned on the labeled subset",
          "jobs.finetune:run_student", "student_finetune", ("distill",), reads_labels=True, publishes=True,
          training=True, aliases=("student-finetune",)),
    Stage("oof", "thresholds without validation images: each model retrained per fold of the budget (oof.folds)",
          "jobs.oof:run", "oof", reads_labels=True),
    Stage("evaluate", "AUC with 95% CIs, operating points, DeLong, ROC and t-SNE plots",
          "jobs.evaluate:run", "evaluate", reads_labels=True, keyed=False),
    Stage("report", "RUN/report.md and RUN/report.html", "drray.report:run", keyed=False),
)}
BASELINES = ("fixmatch", "mixmatch")  # the stages pipeline.baselines chooses from
# Published models (RUN/models/<name>) in the order of the paper's Table 1: tables, plots, reports.
MODEL_ORDER = ("supervised_100", "supervised", "mixmatch", "fixmatch", "teacher", "student")


def oof_models(cfg: Config) -> tuple[str, ...]:
    """The published models the oof stage fixes thresholds for (none when it is off)."""
    if not cfg.oof.folds:
        return ()
    published = [s.name for s in training_stages(cfg) if s.publishes]
    return tuple(n for n in published if not cfg.oof.models or n in cfg.oof.models)


def with_every_baseline(cfg: Config) -> Config:
    """``cfg`` training every baseline: table1's rows."""
    return replace(cfg, pipeline=replace(cfg.pipeline, baselines=BASELINES))


def check_oof(cfg: Config, job: str = "pipeline") -> None:
    """The out-of-fold settings, before any work: folds 0 or at least 2, only without a
    validation hold-out (which chooses thresholds itself), models ``job`` publishes."""
    if job == "table1":
        cfg = with_every_baseline(cfg)
    where = cfg.origin().of
    folds, fold = cfg.oof.folds, cfg.labels.fold
    if folds == 1:
        raise ConfigError(f"{where('oof.folds')}: key 'oof.folds' is 1: out-of-fold predictions need at least 2 "
                          f"folds (5 is usual; 0: off)")
    if folds and cfg.labels.validation:
        raise ConfigError(f"{where('oof.folds')}: key 'oof.folds' is {folds}, but labels.validation is "
                          f"{cfg.labels.validation:g}: the validation images choose the thresholds then; set "
                          f"labels.validation=0 to train on the whole budget and choose them out of fold")
    published = [s.name for s in training_stages(cfg) if s.publishes]
    unknown = [m for m in cfg.oof.models if m not in published]
    if unknown:
        raise ConfigError(f"{where('oof.models')}: key 'oof.models': {unknown[0]!r} is not a model this config "
                          f"trains (it trains: {', '.join(published)}; a baseline also needs pipeline.baselines)")
    if fold is not None and not (fold[1] >= 2 and 0 <= fold[0] < fold[1]):
        raise ConfigError(f"{where('labels.fold')}: key 'labels.fold': {list(fold)!r} is not [j, k] with "
                          f"0 <= j < k and k >= 2")


def fold_config(cfg: Config, fold: int) -> Config:
    """``cfg`` with its budget less fold ``fold`` of oof.folds (labels.fold): every stage that
    reads labels, and what follows them, gets a key of its own."""
    return replace(cfg, labels=replace(cfg.labels, fold=(fold, cfg.oof.folds)))


def chain_of(cfg: Config, name: str) -> list[str]:
    """Stage ``name`` and every stage it reads, transitively, in the stage table's order."""
    needed, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo += upstream_of(cfg, STAGES[n])
    return [n for n in STAGES if n in needed]


def stage(name: str) -> Stage:
    """A stage by its name or an alias; an unknown name raises, naming the stages."""
    for s in STAGES.values():
        if name == s.name or name in s.aliases:
            return s
    raise KeyError(f"unknown stage {name!r}; the stages: {', '.join(STAGES)}")


def training_stages(cfg: Config) -> list[Stage]:
    """The Ray Train stages a pipeline run of ``cfg`` trains (the baselines it names included)."""
    return [s for s in STAGES.values()
            if s.training and s.name != "pretrain" and (s.name not in BASELINES or s.name in cfg.pipeline.baselines)]


# --- keys ------------------------------------------------------------------------------------------


def key_of(*parts) -> str:
    text = json.dumps([to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def data_key(cfg: Config, manifest: dict) -> str:
    """What every stage's key includes: the prepared data, the target definition and the run's seed."""
    return key_of(manifest["content_hash"], cfg.data.positive, cfg.run.seed)


def training_seed(cfg: Config, name: str) -> int:
    """The seed a stage trains with. Stages after pretraining also follow ``labels.seed``: a
    sweep's seeds then vary both the labeled subset and the initialisation, while the one
    pretraining they share keeps ``run.seed``. (labels.seed 0 leaves run.seed unchanged.)"""
    return cfg.run.seed if name == "pretrain" else cfg.run.seed + 1_000_003 * cfg.labels.seed


@dataclass(frozen=True)
class Resolved:
    stage: Stage
    key: str
    dir: StageDir
    upstream: dict[str, Path]  # what it reads: upstream stage name -> that stage's directory or file


def upstream_of(cfg: Config, s: Stage) -> tuple[str, ...]:
    """The stages ``s`` reads for this config: a fine-tuning starts from what its start_from
    names (a stage, a checkpoint folder, or nothing); a semi-supervised baseline with init
    ``pretrained`` starts from the pretraining's backbone, as the teacher does; distillation
    reads a pseudo-label file of the user's instead of the pseudolabel stage when
    distill.pseudolabels names one."""
    section = s.config(cfg)
    if isinstance(section, FinetuneConfig):
        return (START_FROM[section.start_from],) if section.start_from in START_FROM else ()
    if isinstance(section, SemiSupervisedConfig):
        return ("pretrain",) if section.init == "pretrained" else ()
    if s.name == "distill" and cfg.distill.pseudolabels:
        return ()
    if s.name == "oof":
        return oof_models(cfg)
    return s.upstream


def resolve(cfg: Config, manifest: dict) -> dict[str, Resolved]:
    """Every keyed stage's key and directory for ``cfg`` and the prepared data's ``manifest``, in
    topological order. Pure: it creates nothing (it reads a checkpoint's meta.json or hashes a
    pseudo-label file only where the config names one of the user's)."""
    resolved: dict[str, Resolved] = {}
    root = stages_dir(cfg).resolve()

    def visit(s: Stage) -> Resolved:
        if s.name in resolved:
            return resolved[s.name]
        ups = {u: visit(STAGES[u]) for u in upstream_of(cfg, s)}
        key = key_of(s.name, _section_part(cfg, s), cfg.data.size, data_key(cfg, manifest),
                     training_seed(cfg, s.name), labels_part(cfg) if s.reads_labels else None,
                     {u: r.key for u, r in ups.items()}, _outside_input(cfg, s))
        resolved[s.name] = Resolved(s, key, StageDir(root / f"{s.name}-{key}"),
                                    {u: r.dir.path for u, r in ups.items()})
        return resolved[s.name]

    for s in STAGES.values():
        if s.keyed:
            visit(s)
    return resolved


# Settings that change what a stage logs, not what it computes: left out of its key, so turning
# them on reuses a finished stage (and adding one to a section keeps every earlier key).
UNKEYED = frozenset({"monitor_every"})
# Scaling settings added after stages were first keyed, and their defaults: at the default they
# are left out of the key, so run directories made before them keep their finished stages (a
# stage's hours of GPU time are not spent again because drray learnt a new option).
KEYED_UNLESS_DEFAULT = {"sync_batchnorm": True, "compile": False}


def labels_part(cfg: Config) -> dict:
    """The labels section in a key: labels.fold left out when unset (it came later; the keys of
    stages trained on the whole budget stay what they were)."""
    part = to_dict(cfg.labels)
    if part.get("fold") is None:
        part.pop("fold", None)
    return part


def settings_part(cfg: Config, leave_out: tuple[str, ...]) -> dict:
    """The whole config, less the sections ``leave_out``, as a key part (table1's seeds, a
    sweep's experiment). Settings added later are left out at their defaults (labels.fold, the
    oof section), so what was made before them is found again."""
    part = {k: v for k, v in to_dict(cfg).items() if k not in leave_out}
    part["labels"] = labels_part(cfg)
    if cfg.oof == OofConfig():
        part.pop("oof", None)
    return part


def _section_part(cfg: Config, s: Stage):
    section = s.config(cfg)
    if section is None:
        return None
    if s.key_fields is None:
        part = {k: v for k, v in to_dict(section).items() if k not in UNKEYED}
        if isinstance(part.get("scaling"), dict):
            part["scaling"] = {k: v for k, v in part["scaling"].items()
                               if not (k in KEYED_UNLESS_DEFAULT and v == KEYED_UNLESS_DEFAULT[k])}
        return part
    return {f: getattr(section, f) for f in s.key_fields}


def outside_input_file(cfg: Config, s: Stage) -> Path | None:
    """The file from outside the graph that the config has a stage read: the model of a
    checkpoint folder to start from, or a pseudo-label table of the user's."""
    section = s.config(cfg)
    if isinstance(section, FinetuneConfig) and section.start_from not in (*START_FROM, "none"):
        return Path(section.start_from).resolve() / "model.pt"
    if s.name == "distill" and cfg.distill.pseudolabels:
        return Path(cfg.distill.pseudolabels).resolve()
    return None


def _outside_input(cfg: Config, s: Stage) -> str | None:
    """The key part of an input from outside the graph: its path (its content is checked when
    the stage is found complete, see jobs.common.finished)."""
    path = outside_input_file(cfg, s)
    return str(path) if path is not None else None


PSEUDOLABELS = "pseudolabels.parquet"  # the pseudolabel stage's table, in its directory
OOF_PREDICTIONS = "oof_predictions.parquet"  # the oof stage's table, in its directory


def pseudolabels_path(cfg: Config, manifest: dict) -> Path:
    """The pseudo-label table distillation reads: distill.pseudolabels, else the pseudolabel stage's."""
    if cfg.distill.pseudolabels:
        return Path(cfg.distill.pseudolabels)
    return resolve(cfg, manifest)["pseudolabel"].dir.file(PSEUDOLABELS)
