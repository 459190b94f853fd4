"""Configuration: frozen dataclasses per stage, loaded from YAML with ``--set`` overrides.

Config is data. A YAML file (read with ``yaml.safe_load``, no code) is validated against the
dataclasses below: an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the file and the dotted key. Nothing is mutated during a run; derived values are pure
functions of the config (see :func:`run_dir`).

Overrides use dotted keys: ``--set pretrain.lr=1e-4 --set run.dir=/scratch/x``. Their values are
parsed as YAML scalars (so ``null``, ``true``, ``[a, b]`` work) and then checked like file values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    dir: str | None = None  # default: runs/<config file stem>
    # Where stage outputs are kept and found again (the stage cache; Ray Train's checkpoints
    # in <stages>/ray): default the run dir. Runs that name the same folder share every stage
    # whose inputs match, e.g. a sweep's trials share the one SimCLR pretraining.
    stages: str | None = None
    seed: int = 0
    num_cpus: int | None = None  # CPUs for a local Ray instance; None: all of them
    max_failures: int = 2  # times Ray Train restarts a stage's workers after a failure


@dataclass(frozen=True)
class SyntheticConfig:
    """Generate this data set with ``drray synth`` when its images are missing."""

    n: int = 1000  # images in the main folder (EyePACS: train/)
    test_n: int = 0  # EyePACS style: extra test/ folder with testLabels.csv
    style: Literal["eyepacs", "messidor2"] = "eyepacs"
    seed: int = 0
    original_size: bool = False  # EyePACS-sized frames (~3888x2592) instead of small ones
    frame_scale: float = 1.0  # smaller frames draw faster; the demo's 64 px outputs need little


# How an image's id is made from its file: the stem ('left'), or the path under the image folder
# without the extension ('patientA/left', for data sets that reuse names across folders).
IdFrom = Literal["stem", "path"]


@dataclass(frozen=True)
class DatasetConfig:
    """One raw data set and where its prepared shards live."""

    source: Literal["eyepacs", "messidor2", "folder", "aptos", "idrid", "ddr"] = "eyepacs"
    images: str = ""  # folder searched recursively for image files
    id_from: IdFrom = "stem"  # label rows name images the same way
    labels: tuple[str, ...] = ()  # label CSVs; relative paths are relative to `images`
    prepared: str = ""  # output of `drray prepare`: shards/, rejects.parquet, manifest.json
    partition: str | None = None  # CSV image_id,split (e.g. the Voets et al. partition)
    test_fraction: float | None = None  # seeded train/test partition of the pooled set
    # CSV image_id,patient_id (e.g. Messidor-2's exams): the images of a patient stay together in
    # splits and label subsets. Without it: a folder CSV's patient_id column, EyePACS 10_left ->
    # 10, else each image its own patient. A relative path is also looked up inside `images`.
    patients: str | None = None
    synthetic: SyntheticConfig | None = None  # generate when `images` is missing


@dataclass(frozen=True)
class DataConfig:
    size: int = 299  # output side in pixels; the fundus circle's diameter spans it
    # grade >= 2; grade >= 1; grade >= 2 or DME (Gulshan et al.; a data set that grades DME only)
    positive: Literal["referable", "any_dr", "referable_dme"] = "referable"
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = 95
    max_pixels: int = 178_956_970  # larger images are rejected as decompression bombs
    mask_outside: bool = True  # black out pixels outside the fundus circle
    prepare_batch: int = 16  # images per Ray Data task batch
    eyepacs: DatasetConfig = field(default_factory=DatasetConfig)
    external: DatasetConfig | None = None  # Messidor-2 style external test set


@dataclass(frozen=True)
class LabelsConfig:
    """Which training images keep their labels (the rest form the unlabeled pool)."""

    # The label budget: every labeled training image a method may see, validation included
    # (count, or fraction of the labeled train images).
    fraction: float | None = None
    count: int | None = 1000
    strategy: Literal["random", "balanced"] = "random"
    seed: int = 0
    # The budget's share held out to choose epochs, stop early and fix operating thresholds.
    # 0: no validation (last-epoch models, no early stopping; operating points then only from
    # out-of-fold predictions: the oof section).
    validation: float = 0.2
    # [j, k]: train on the budget less its fold j of k (whole patients, stratified by grade,
    # seeded by labels.seed). The oof stage sets it for the models it trains; null: all of it.
    fold: tuple[int, int] | None = None


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    vflip: float = 0.5
    rotation: float = 180.0  # degrees; fundus photographs have no canonical orientation
    jitter_strength: float = 0.5  # SimCLR's s: brightness/contrast/saturation 0.8s, hue 0.2s
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adam", "adamw", "sgd", "lars"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    warmup_epochs: int = 0
    schedule: Literal["constant", "cosine", "fixmatch_cosine"] = "constant"  # fixmatch_cosine: cos(7 pi k / 16 K)


@dataclass(frozen=True)
class ScalingConfig:
    # Ray Train workers. "auto": one per GPU of the Ray cluster with use_gpu, else one per node
    # (a CPU worker uses its cpus_per_worker as torch threads); as many as divide the batch.
    num_workers: int | Literal["auto"] = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1  # leave CPUs free: the Ray Data pipeline that feeds workers needs them
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    channels_last: bool = False
    sync_batchnorm: bool = True  # BatchNorm statistics over all workers' batches (CUDA, > 1 worker)
    compile: bool = False  # torch.compile the model (minutes of compiling first; faster steps on GPUs)
    # Where the fit loop runs. "ray": Ray Train workers. "driver": in the job's own process, fed by
    # the same Ray Data streams, its CPUs reserved in the Ray cluster, checkpoints in the same
    # place. "auto": the driver for one CPU worker (a Ray Train start-up costs ~6-10 s here and
    # buys one worker nothing), Ray Train otherwise.
    runtime: Literal["auto", "ray", "driver"] = "auto"

    def resolved_runtime(self) -> str:
        """Where the fit loop runs (num_workers resolved: see drray.distributed.scaling)."""
        if self.runtime != "auto":
            return self.runtime
        return "driver" if self.num_workers == 1 and not self.use_gpu else "ray"


@dataclass(frozen=True)
class PretrainConfig:
    """Stage 1: SimCLR on the unlabeled train pool."""

    backbone: str = "resnet50"
    init: Literal["random", "imagenet"] = "random"
    weights: str | None = None  # local ImageNet weights file when init=imagenet
    epochs: int = 100
    batch_size: int = 64  # global: split evenly across workers
    temperature: float = 0.5
    proj_hidden: int = 2048
    proj_out: int = 128
    gather_negatives: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    # Every N epochs (and after the last), a kNN probe AUC of the backbone's features: the
    # budget's labeled images vote on its validation images (no label outside the budget; nothing
    # trained). 0: off. In metrics.jsonl and on the console as knn_auc, in the report's curves.
    monitor_every: int = 0


@dataclass(frozen=True)
class FinetuneConfig:
    """Stages 2 and 4: supervised fine-tuning on the labeled subset."""

    # "pretrain" (the SimCLR backbone), "distill" (the student), a checkpoint directory, or
    # "none": `backbone` from scratch (or ImageNet), i.e. the supervised baseline
    start_from: str = "pretrain"
    backbone: str = "resnet50"  # used with start_from: none
    init: Literal["random", "imagenet"] = "random"  # used with start_from: none
    weights: str | None = None
    head_hidden: int | None = None  # None: Linear(features, 1); authors' code: 512
    epochs: int = 100
    batch_size: int = 32  # global
    dropout: float = 0.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="sgd", lr=0.05))
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    # Early stopping on validation AUC (the Voets et al. replication's supervised baseline):
    # stop once `patience` epochs in a row did not beat the best AUC by more than `min_delta`.
    # None: train every epoch. The model kept is the best by validation AUC either way.
    patience: int | None = None
    min_delta: float = 0.0


@dataclass(frozen=True)
class InferenceConfig:
    """Batch inference with Ray Data (pseudo-labels, evaluation): actors that hold the model."""

    batch_size: int = 128
    # Model actors: one per GPU with use_gpu, CPU actors otherwise. "auto": one per GPU of the
    # Ray cluster with use_gpu, else as many CPU actors as leave the data tasks their share.
    concurrency: int | Literal["auto"] = 1
    cpus_per_actor: int = 1  # also the actor's torch threads (it decodes its batches); leave CPUs for the shard reads
    use_gpu: bool = False
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"


@dataclass(frozen=True)
class PseudolabelConfig(InferenceConfig):
    """Between stages 2 and 3: the teacher labels the unlabeled pool (written to
    distill.pseudolabels, by default ``<teacher dir>/pseudolabels.parquet``)."""

    threshold: float = 0.5  # prob >= threshold -> label 1


@dataclass(frozen=True)
class EvaluateConfig(InferenceConfig):
    """Test-set evaluation of the final models: AUC with bootstrap CIs, operating points, DeLong."""

    models: tuple[str, ...] = ()  # "name=checkpoint dir" or a dir; empty: every model in RUN/models
    bootstrap: int = 2000  # resamples for the 95% AUC confidence interval
    seed: int = 0
    sensitivities: tuple[float, ...] = (0.9, 0.95)  # operating points chosen on validation data
    operating_sensitivity: float = 0.9  # the one stored with each model for `drray predict`
    # The referable share of the population to be screened, when the test sets' is not it (0-1):
    # each operating point also gets its PPV and NPV there (Bayes' rule). None: the test sets' own.
    prevalence: float | None = None
    tsne_images: int = 1000  # images per t-SNE panel (a seeded sample of the external, else EyePACS test set); 0: none


@dataclass(frozen=True)
class OofConfig:
    """Operating thresholds without a validation hold-out (labels.validation 0): out-of-fold
    predictions on the budget's own labeled images. Every model named here is trained again
    ``folds`` times, each time on the budget less one fold of whole patients, together with the
    labeled stages before it (the student: teacher, pseudo-labels, distillation and its
    fine-tuning, since its teacher saw every label); fold j's model predicts fold j, and the
    pooled predictions choose the model's threshold. No label outside the budget is read, and
    none from a test set. It costs ``folds`` times those stages (the student's chain the most)."""

    folds: int = 0  # 0: off (no validation images then fix no operating point); else >= 2
    models: tuple[str, ...] = ()  # the published models it fixes a threshold for; empty: all of them


@dataclass(frozen=True)
class DistillConfig:
    """Stage 3: the student learns the teacher's pseudo-labels on the unlabeled pool."""

    backbone: str = "densenet161"
    init: Literal["random", "imagenet"] = "random"
    weights: str | None = None
    targets: Literal["hard", "soft"] = "hard"
    pseudolabels: str | None = None  # Parquet image_id,prob,label; default: the teacher's pseudolabels
    jitter: float = 0.4  # colour-jitter noise on the student's input
    epochs: int = 200
    batch_size: int = 32  # global
    dropout: float = 0.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="sgd", lr=1e-4))
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint_every: int = 1
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class SemiSupervisedConfig:
    """What the FixMatch and MixMatch baselines share: a classifier (from scratch, ImageNet or
    the run's SimCLR backbone: ``init``) trained on the labeled subset plus the whole train
    split as unlabeled data (the labeled images included, as both papers do), evaluated with an
    EMA of its weights."""

    backbone: str = "resnet50"  # Table 1: ResNet50 for both
    # Where the backbone starts: "random", "imagenet" (`weights`, a local file: how the authors
    # started every model) or "pretrained": the SimCLR backbone of the run's pretraining stage
    # (the teacher's start; for users without ImageNet weights, so that the baselines start
    # alike with the teacher; `backbone` must then be pretrain.backbone)
    init: Literal["random", "imagenet", "pretrained"] = "random"
    weights: str | None = None
    epochs: int = 100  # passes over the unlabeled set
    batch_size: int = 64  # labeled images per step (global); the unlabeled batch is mu x this
    mu: int = 7
    lambda_u: float = 1.0  # weight of the unlabeled loss
    rampup_epochs: int = 0  # lambda_u ramps up linearly over these epochs (0: full weight from the first step)
    # ReMixMatch's distribution alignment (Berthelot et al. 2020): the unlabeled guesses scaled
    # to the labeled training images' positive share by the model's running mean prediction
    # before FixMatch thresholds them / MixMatch sharpens them. Off: the methods as published
    # (on CIFAR's balanced classes); with a ~20% referable prior their guesses collapse to
    # "not referable" (issue 15).
    distribution_alignment: bool = False
    ema_decay: float = 0.999  # the evaluated (and published) model is this EMA of the weights
    dropout: float = 0.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="fixmatch_cosine"))
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint_every: int = 1
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class FixMatchConfig(SemiSupervisedConfig):
    """Baseline: FixMatch (Sohn et al. 2020) in binary sigmoid form: the weak view's confident
    predictions (max(p, 1-p) >= threshold) are hard targets for the strong view."""

    threshold: float = 0.95
    randaugment_ops: int = 2  # RandAugment operations per strong view (random magnitude each)
    cutout: float = 0.5  # Cutout's largest square side, as a fraction of the image side


@dataclass(frozen=True)
class MixMatchConfig(SemiSupervisedConfig):
    """Baseline: MixMatch (Berthelot et al. 2019) in binary form: K weak views' mean prediction,
    sharpened, as the guessed label; MixUp over labeled and unlabeled; MSE on the unlabeled part."""

    mu: int = 1
    lambda_u: float = 75.0  # the paper's CIFAR-10 value; ramped up linearly over rampup_epochs
    rampup_epochs: int = 16
    temperature: float = 0.5
    alpha: float = 0.75
    augmentations: int = 2  # K
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=2e-3))


@dataclass(frozen=True)
class PipelineConfig:
    """What ``drray run pipeline`` (and each sweep trial) trains besides the paper's method and
    the supervised baseline."""

    baselines: tuple[Literal["fixmatch", "mixmatch"], ...] = ()


@dataclass(frozen=True)
class SweepConfig:
    """``drray run sweep``: the label-dependent stages repeated over label fractions (or counts)
    x seeds with Ray Tune, all from one shared pretraining. A seed draws the labeled subset
    (labels.seed, nested across fractions) and seeds the downstream training."""

    fractions: tuple[float, ...] = ()  # labels.fraction per trial; or give counts
    counts: tuple[int, ...] = ()  # labels.count per trial
    seeds: tuple[int, ...] = (0, 1, 2)
    concurrent_trials: int = 1  # trials at once; each needs the CPUs/GPUs of its largest stage
    trial_cpus: float = 0.5  # the trial's own process (evaluation metrics, plots, the report)
    max_failures: int = 1  # times a failed trial is retried before it counts as failed


@dataclass(frozen=True)
class Table1Config:
    """``drray run table1``: the label draws its rows are computed on. A claim about an ordering
    is judged on several draws with their intervals, not one point estimate."""

    # labels.seed per draw: each seed's rows in RUN/seeds/seed-<N>/, all from one pretraining, and
    # RUN/table1.md the mean +- sd over them. Empty: labels.seed alone, the rows in RUN itself.
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class ClusterShare:
    """How much of the Ray cluster one job may fill: 1/``jobs`` of it (a sweep's concurrent
    trials share it evenly), less the CPUs its own process already holds there (a Ray Tune
    trial's ``sweep.trial_cpus``)."""

    jobs: int = 1
    reserved_cpus: float = 0.0


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    pseudolabel: PseudolabelConfig = field(default_factory=PseudolabelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    student_finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(start_from="distill"))
    # The supervised baseline: the same labels, no pretraining, no pseudo-labels.
    supervised: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(start_from="none"))
    fixmatch: FixMatchConfig = field(default_factory=FixMatchConfig)
    mixmatch: MixMatchConfig = field(default_factory=MixMatchConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    oof: OofConfig = field(default_factory=OofConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    table1: Table1Config = field(default_factory=Table1Config)
    # Where the config came from; not a YAML key. Relative paths in the file are relative
    # to the current directory (the repo root for the shipped configs), like any CLI path.
    source_file: str = field(default="", compare=False, metadata={"internal": True})
    # The --set overrides laid over the file, as (dotted key, "key=value"): for error messages.
    overrides: tuple[tuple[str, str], ...] = field(default=(), compare=False, metadata={"internal": True})
    # This job's share of the Ray cluster, which "auto" worker and actor counts fill
    # (drray.distributed.scaling): all of it, or a sweep trial's. Not a YAML key.
    share: ClusterShare = field(default_factory=ClusterShare, compare=False, metadata={"internal": True})

    def origin(self) -> Origin:
        return Origin(self.source_file or "<config>", dict(self.overrides))


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``section.key=value`` overrides, validate, return it frozen."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = _read_with_bases(path, ())
    origin = Origin(str(path))
    for item in overrides:
        origin.overrides[_apply_override(raw, item, path)] = item
    cfg = _build(Config, raw, "", origin)
    return dataclasses.replace(cfg, source_file=str(path), overrides=tuple(origin.overrides.items()))


@dataclass
class Origin:
    """Where a key's value came from, for error messages: the file, or the ``--set`` that gave it."""

    file: str
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key -> the --set item

    def of(self, key: str) -> str:
        """``--set item``, or ``file:line`` of the key (or of its section) in the file that set it."""
        key = key.split("[")[0]
        for given, item in self.overrides.items():
            if key == given or key.startswith(given + ".") or given.startswith(key + "."):
                return f"--set {item}"
        return _key_position(Path(self.file), key) or self.file


def _key_position(path: Path, key: str) -> str | None:
    """Where ``key`` (dotted) is written: the last file of the ``base`` chain that sets it, with
    its line. Looked up only when an error is reported, so loading stays one ``safe_load``."""
    positions: dict[str, str] = {}
    try:
        for file in reversed(_base_chain(path)):
            positions.update(_key_lines(file))
    except (OSError, yaml.YAMLError):
        return None
    parts = key.split(".")
    for depth in range(len(parts), 0, -1):  # the key, else the section it sits in
        if (found := positions.get(".".join(parts[:depth]))) is not None:
            return found
    return None


def _base_chain(path: Path) -> list[Path]:
    """This file, then its ``base``, then that file's base... (cycles were refused on loading)."""
    chain = [path]
    while len(chain) < 32 and isinstance(base := (yaml.safe_load(chain[-1].read_text()) or {}).get("base"), str):
        chain.append(chain[-1].parent / base)
    return chain


def _key_lines(path: Path) -> dict[str, str]:
    """dotted key -> "file:line" (as a person counts lines) for every mapping key in a YAML file."""
    found: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = _join(prefix, str(key_node.value))
                found[dotted] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, dotted)

    walk(yaml.compose(path.read_text()), "")
    return found


def read_yaml_mapping(path: Path, expected: str) -> dict:
    """A YAML file (``yaml.safe_load``: data, no code) whose top level is a mapping."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {expected}, got {type(raw).__name__}")
    return raw


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    """A config file's mapping; ``base: other.yaml`` (relative to this file) is read first and
    this file's sections laid over it, key by key (``configs/sweep-ci.yaml`` is ci.yaml + a sweep)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"{seen[-1] if seen else path}: config file {path} not found")
    raw = read_yaml_mapping(path, "the top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: key 'base': expected a file name, got {base!r}")
    return _merged(_read_with_bases(path.parent / base, seen + (path.resolve(),)), raw)


def config_from_dict(raw: dict, origin: str = "<dict>") -> Config:
    """Validate a plain mapping (e.g. a resolved config read back) into a Config."""
    return _build(Config, raw, "", Origin(origin))


def _apply_override(raw: dict, item: str, origin: Path) -> str:
    """Lay ``section.key=value`` over the raw mapping; return the dotted key."""
    key, eq, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not eq or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. --set pretrain.epochs=3)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not a YAML scalar: {exc}") from exc
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section (in {origin})")
        node = child
    node[parts[-1]] = value
    return key


def _build(cls: type, raw: Any, prefix: str, origin: Origin) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin.of(prefix)}: key {prefix or '<top>'!r}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        if (why := REMOVED.get(_join(prefix, key))) is not None:
            raise ConfigError(f"{origin.of(_join(prefix, key))}: key {_join(prefix, key)!r} was removed: {why}")
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{origin.of(_join(prefix, key))}: unknown key {_join(prefix, key)!r}{hint} "
            f"(known keys here: {', '.join(fields)})"
        )
    values = {
        name: _coerce(hints[name], _over_section_default(fields[name], raw[name]), _join(prefix, name), origin)
        for name in fields
        if name in raw
    }
    for name, value in values.items():
        _check_range(name, value, _join(prefix, name), origin)
    return cls(**values)


# Keys of earlier versions, and what replaced them (a plain "unknown key" would not say).
REMOVED = {"labels.val_count": "validation images are part of the label budget since 2026-12-01; set "
                               "labels.validation to their share of labels.count / labels.fraction (e.g. 0.2)"}


def _over_section_default(f: dataclasses.Field, value: Any) -> Any:
    """A partly given section keeps the defaults of its field, not only of its class: a
    ``student_finetune:`` section without ``start_from`` still starts from ``distill``."""
    if f.default_factory is dataclasses.MISSING or not isinstance(value, dict):
        return value
    default = f.default_factory()
    return _merged(to_dict(default), value) if dataclasses.is_dataclass(default) else value


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(base[key], value) if isinstance(base.get(key), dict) and isinstance(value, dict) else value
    return out


def _coerce(tp: Any, value: Any, key: str, origin: Origin) -> Any:
    """Check ``value`` against type ``tp``; return it converted (lists to tuples, ...)."""
    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, origin)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else _type_error(key, origin, tp, value)
    if dataclasses.is_dataclass(tp):
        if value is None:
            raise _type_error(key, origin, tp, value)
        return _build(tp, value, key, origin)
    if origin_tp is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{origin.of(key)}: key {key!r}: {value!r} is not one of {choices}")
        return value
    if origin_tp is tuple:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list | tuple):
            raise _type_error(key, origin, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]", origin) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{origin.of(key)}: key {key!r}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]", origin) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, origin, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, origin, tp, value)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, origin, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, origin, tp, value)
    raise ConfigError(f"{origin.of(key)}: key {key!r}: unsupported field type {tp!r}")  # a schema bug


def _type_error(key: str, origin: Origin, tp: Any, value: Any) -> ConfigError:
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return ConfigError(f"{origin.of(key)}: key {key!r}: expected {name}, got {value!r}")


@dataclass(frozen=True)
class Range:
    """The values a numeric key admits (for a list, each of its values)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def admits(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE_INT, NON_NEGATIVE, PROBABILITY = Range(1), Range(0), Range(0, 1)
SHARE = Range(0, 1, lo_open=True)  # a fraction of something that must not be empty
# Allowed values by key name: a name means the same thing in every section that has it.
RANGES: dict[str, Range] = {
    **dict.fromkeys(("epochs", "batch_size", "n", "num_workers", "cpus_per_worker", "concurrency",
                     "cpus_per_actor", "bootstrap", "mu", "augmentations", "checkpoint_every",
                     "keep_checkpoints", "prepare_batch", "proj_hidden", "proj_out", "head_hidden",
                     "concurrent_trials", "patience", "count", "counts", "num_cpus", "max_pixels"), POSITIVE_INT),
    **dict.fromkeys(("test_n", "warmup_epochs", "monitor_every", "max_failures", "rampup_epochs", "tsne_images",
                     "randaugment_ops", "weight_decay", "min_delta", "lambda_u", "jitter_strength", "jitter",
                     "seeds", "folds", "fold"),
                    NON_NEGATIVE),
    **dict.fromkeys(("hflip", "vflip", "jitter_prob", "grayscale_prob", "blur_prob", "threshold", "cutout"),
                    PROBABILITY),
    **dict.fromkeys(("fraction", "fractions", "crop_scale"), SHARE),
    **dict.fromkeys(("lr", "temperature", "alpha", "frame_scale", "trial_cpus"), Range(0, lo_open=True)),
    **dict.fromkeys(("sensitivities", "operating_sensitivity", "prevalence"), Range(0, 1, lo_open=True, hi_open=True)),
    **dict.fromkeys(("dropout", "ema_decay", "momentum", "validation"), Range(0, 1, hi_open=True)),
    "size": Range(16),
    "jpeg_quality": Range(1, 100),
    "rotation": Range(0, 180),
}


def _check_range(name: str, value: Any, key: str, origin: Origin) -> None:
    allowed = RANGES.get(name)
    if allowed is None or value is None:
        return
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, int | float) and not isinstance(v, bool) and not allowed.admits(v):
            raise ConfigError(f"{origin.of(key)}: key {key!r}: {value!r} is out of range (allowed: {allowed})")
    if name == "seeds" and len(set(value)) < len(value):  # a seed twice would count one draw twice
        repeated = sorted({v for v in value if value.count(v) > 1})
        raise ConfigError(f"{origin.of(key)}: key {key!r}: {list(value)!r} repeats seed {repeated[0]}; give each seed once")
    if name == "crop_scale" and value[0] > value[1]:
        raise ConfigError(f"{origin.of(key)}: key {key!r}: {value!r}: the smallest crop exceeds the largest")


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


# ---------------------------------------------------------------------------------------------
# Derived values and writing
# ---------------------------------------------------------------------------------------------


def run_dir(cfg: Config) -> Path:
    """The job's run directory: ``run.dir``, else ``runs/<config file stem>``."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    stem = Path(cfg.source_file).stem if cfg.source_file else "default"
    return Path("runs") / stem


def stages_dir(cfg: Config) -> Path:
    """Where stage outputs live: ``run.stages``, else the run directory."""
    return Path(cfg.run.stages) if cfg.run.stages else run_dir(cfg)


def to_dict(obj: Any) -> Any:
    """A plain, YAML-ready mapping of a config (tuples become lists, internal fields dropped)."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not f.metadata.get("internal")
        }
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
