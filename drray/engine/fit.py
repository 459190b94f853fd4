"""The fit loop every training stage runs: epochs, resume, validation, early stopping, the best
and the final model, and the metrics log. It needs no Ray: it talks to its surroundings through
a small :class:`Runtime` (where batches come from, how checkpoints are reported and restored,
which rank it is). ``drray.distributed.train`` adapts it to Ray Train; :class:`LocalRuntime`
runs it in a plain process (tests, tools), with checkpoints in a folder.

What rank 0 writes into the stage directory (:class:`drray.artifacts.StageDir`):
``metrics.jsonl`` (one line per epoch, and events: resumed, stopped_early), ``best/`` (the best
model by validation AUC), ``model/`` (the final model), ``workers/rank<N>.pid``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from drray.artifacts import StageDir, atomic_directory, atomic_write_text
from drray.config import OptimConfig
from drray.engine.checkpoint import MODEL_LEGACY, load_training_state, save_checkpoint
from drray.engine.ema import EMA
from drray.engine.loop import make_scaler, resolve_precision, train_epoch
from drray.engine.model import ModelSpec, init_backbone_from, unwrap
from drray.engine.optim import build_optimizer, build_scheduler, parameter_groups
from drray.engine.predict import predict
from drray.engine.stopping import should_stop
from drray.methods import Method, augment_batch

# Epochs and events are logged at debug level: the console shows them once, from metrics.jsonl
# (drray.distributed.train follows it), wherever the loop runs.
log = logging.getLogger(__name__)

EMA_FILE = "ema.pt"  # in a training checkpoint, beside model.pt (the raw weights)
VALIDATION_BATCH = 256
PROBE_STREAMS = ("probe_train", "probe_val")  # labeled features that vote, and the images they vote on
# Streams rank 0 reads whole (validation, the probe); the others are split across workers.
WHOLE_ON_RANK0 = ("val", *PROBE_STREAMS)


@dataclass(frozen=True)
class FitPlan:
    """Everything the loop needs to train one stage: picklable (Ray sends it to its workers)."""

    name: str  # the stage, e.g. "pretrain"; also the console prefix
    out_dir: str  # the stage's directory (absolute: workers run in directories of their own)
    spec: ModelSpec
    method: Method
    epochs: int
    batch_size: int  # per worker, of the "train" stream
    steps_per_epoch: int
    optim: OptimConfig
    num_workers: int = 1  # the workers the batch is split over (its "auto" resolved)
    precision: str = "auto"
    channels_last: bool = False
    init_backbone: str | None = None  # checkpoint dir whose backbone starts this model
    init_model: str | None = None  # checkpoint dir whose whole model starts this one
    validate: bool = False  # validation AUC on the "val" stream every epoch (rank 0)
    checkpoint_every: int = 1
    seed: int = 0
    epochs_per_pass: int = 1  # epochs in one pass of the "train" stream (datasets.repeat)
    patience: int | None = None  # early stopping on val_auc (engine.stopping); None: every epoch
    min_delta: float = 0.0
    unlabeled_batch: int = 0  # per worker, of the "unlabeled" stream (FixMatch / MixMatch)
    ema_decay: float | None = None  # validate, keep and publish this EMA of the weights
    probe_every: int = 0  # kNN probe AUC (engine.probe) every N epochs on the "probe_*" streams (rank 0)
    sync_batchnorm: bool = True  # BatchNorm statistics over every worker's batch (several CUDA workers)
    compile: bool = False  # torch.compile the model's forward (in place: checkpoints keep their keys)

    @property
    def stage_dir(self) -> StageDir:
        return StageDir(Path(self.out_dir))


class Runtime(Protocol):
    """What the loop needs from where it runs."""

    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as this runtime trains it (DDP across workers), on its device."""

    def batches(self, stream: str, batch_size: int, *, drop_last: bool) -> Iterable[dict]:
        """One pass of this rank's share of a named stream ("train", "unlabeled", "val");
        ``drop_last``: only full batches (training steps must all be the same size on every rank)."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The last reported checkpoint's directory (None on a fresh start)."""

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        """Called on every rank the same number of times (a barrier where distributed)."""

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""


# ---------------------------------------------------------------------------------------------


def fit(plan: FitPlan, runtime: Runtime) -> dict:
    """Train ``plan`` from its start (or its latest checkpoint); return the last epoch's metrics."""
    rank = runtime.rank
    timeline = {"fit_started": time.time()}  # where a stage's start-up goes (workers/rank<N>.timeline.json)
    _seed(plan.seed, rank)
    out = plan.stage_dir
    if rank == 0:
        out.path.mkdir(parents=True, exist_ok=True)
    out.write_pid(rank)
    model = runtime.wrap(for_device(_initial_model(plan), plan, runtime))
    o = plan.optim
    optimizer = build_optimizer(parameter_groups(model, o.weight_decay), o.name, o.lr, o.weight_decay, o.momentum,
                                o.nesterov)
    scheduler = build_scheduler(optimizer, max(1, plan.epochs * plan.steps_per_epoch),
                                o.warmup_epochs * plan.steps_per_epoch, o.schedule)
    device = runtime.device
    dtype = resolve_precision(plan.precision, device)
    scaler = make_scaler(device, dtype)
    ema = EMA(model, plan.ema_decay) if plan.ema_decay is not None else None
    evaluated = ema.model if ema is not None else model  # what is validated, kept as best and published
    if plan.compile:  # after the EMA's copy: the average is only evaluated, and a compiled module does not deepcopy
        unwrap(model).compile()
    state = _Training(model, optimizer, scheduler, scaler, ema)

    start, metrics = _resume(plan, runtime, state)
    step = plan.method.step(steps_done=start * plan.steps_per_epoch)
    stream = None
    timeline["model_ready"] = time.time()
    for epoch in range(start, plan.epochs):
        if stream is None or (epoch - start) % plan.epochs_per_pass == 0:
            # One pass streams epochs_per_pass epochs; every rank starts passes at the same
            # epochs, so all ranks take the same number of equal batches (DDP needs that).
            stream = _batch_stream(plan, runtime)
        batches = itertools.islice(stream, plan.steps_per_epoch)
        generator = augmentation_generator(plan.seed, rank, epoch)  # the views are made on the device
        metrics = train_epoch(model, batches, step, optimizer, scheduler, scaler, device=device, dtype=dtype,
                              channels_last=plan.channels_last,
                              after_step=(lambda: ema.update(model)) if ema is not None else None,
                              augment=lambda batch, g=generator: augment_batch(plan.method, batch, g))
        expected = plan.steps_per_epoch * plan.batch_size
        if metrics["images"] < expected:  # never train on a silently shortened epoch
            raise RuntimeError(f"{plan.name} epoch {epoch}: the data pipeline delivered {metrics['images']} "
                               f"of {expected} images; is the selection smaller than counted?")
        metrics.update(epoch=epoch, torch_threads=torch.get_num_threads())
        if epoch == start:
            out.write_timeline(rank, {**timeline, "first_batch_s": metrics["first_batch_wait_s"],
                                      "first_epoch_s": metrics["seconds"]})
        if plan.validate and rank == 0:
            metrics["val_auc"] = validation_auc(evaluated, runtime, plan, dtype)
        if plan.probe_every and rank == 0 and ((epoch + 1) % plan.probe_every == 0 or epoch == plan.epochs - 1):
            metrics["knn_auc"] = probe_auc(evaluated, runtime, plan, dtype)
        _report(plan, runtime, epoch, metrics, state, evaluated)
        if plan.patience is not None and epoch < plan.epochs - 1 and _stop_early(plan, runtime, epoch):
            break
    if rank == 0:
        _save_model(out.model, plan, evaluated, metrics.get("epoch", plan.epochs - 1), metrics, "model folder")
    return metrics


@dataclass
class _Training:
    """The state a checkpoint holds."""

    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    scaler: Any
    ema: EMA | None


def _seed(seed: int, rank: int, epoch: int = 0) -> None:
    torch.manual_seed(seed * 1000 + rank + 7919 * epoch)
    np.random.seed(seed * 1000 + rank + 7919 * epoch)


def augmentation_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's views on one rank (a CPU generator: views are drawn on the
    CPU and made on the device, drray.data.augment). A function of (seed, rank, epoch) alone,
    so a resumed run makes the epochs it trains again with the views the first run made, on
    one worker or many, and no two ranks or epochs share their draws."""
    mixed = np.random.SeedSequence([seed, rank, epoch]).generate_state(2, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & ((1 << 63) - 1))


def _resume(plan: FitPlan, runtime: Runtime, state: _Training) -> tuple[int, dict]:
    """(first epoch to train, the last finished epoch's metrics) from the latest checkpoint."""
    with runtime.latest_checkpoint() as d:
        if d is None:
            return 0, {}
        single = runtime.world_size == 1
        done, metrics = load_training_state(d, model=state.model, optimizer=state.optimizer,
                                            scheduler=state.scheduler, scaler=state.scaler, restore_rng=single)
        if state.ema is not None:
            state.ema.load_state_dict(torch.load(Path(d) / EMA_FILE, map_location=runtime.device, weights_only=True))
    start = done + 1
    if not single:  # each rank's RNG is not in the checkpoint: a fresh, distinct stream per rank
        _seed(plan.seed, runtime.rank, start)
    if runtime.rank == 0:
        forget_after(plan.stage_dir, start)
        plan.stage_dir.append_metrics({"event": "resumed", "epochs_done": start, "time": time.time()})
        log.debug("%s: resumed after epoch %d (its checkpoint)", plan.name, start)
    return start, metrics


def _batch_stream(plan: FitPlan, runtime: Runtime) -> Iterator[dict]:
    """One pass of the "train" stream's batches; with an unlabeled stream, each zipped with one
    of its batches (the labeled stream repeats enough to last the pass)."""
    labeled = runtime.batches("train", plan.batch_size, drop_last=True)
    if not plan.unlabeled_batch:
        return iter(labeled)
    # not strict: the labeled stream is the longer by design; a short epoch fails in fit()
    return ({**x, **u} for x, u in zip(labeled, runtime.batches("unlabeled", plan.unlabeled_batch, drop_last=True), strict=False))


def validation_auc(model: torch.nn.Module, runtime: Runtime, plan: FitPlan, dtype) -> float | None:
    """Validation AUC with the unwrapped model (DDP's forward is a collective): rank 0 only."""
    from sklearn.metrics import roc_auc_score

    batches = list(runtime.batches("val", VALIDATION_BATCH, drop_last=False))
    targets = np.concatenate([b["target"] for b in batches]) if batches else np.zeros(0)
    _, probs = predict(unwrap(model), batches, device=runtime.device, dtype=dtype, channels_last=plan.channels_last)
    if len(np.unique(targets)) < 2:
        return None
    return float(roc_auc_score(targets, probs))


def probe_auc(model: torch.nn.Module, runtime: Runtime, plan: FitPlan, dtype) -> float | None:
    """The kNN probe of the backbone's features (rank 0, unwrapped model like validation)."""
    from drray.engine.probe import knn_auc

    batches = {name: runtime.batches(name, VALIDATION_BATCH, drop_last=False) for name in PROBE_STREAMS}
    return knn_auc(unwrap(model).backbone, *batches.values(), runtime.device, dtype, plan.channels_last)


def _report(plan: FitPlan, runtime: Runtime, epoch: int, metrics: dict, state: _Training, evaluated) -> None:
    """Checkpoint and report on every rank (the report is a barrier); rank 0 writes the files."""
    last = epoch == plan.epochs - 1
    due = last or (epoch + 1) % max(1, plan.checkpoint_every) == 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if runtime.rank == 0:
            if due:
                save_checkpoint(tmp, model=state.model, spec=plan.spec, epoch=epoch, metrics=metrics,
                                optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler)
                if state.ema is not None:
                    torch.save(state.ema.state_dict(), Path(tmp) / EMA_FILE)
                checkpoint = Path(tmp)
            plan.stage_dir.append_metrics({"stage": plan.name, **metrics, "time": time.time()})
            _keep_best(plan, evaluated, metrics)
            log.debug("%s epoch %d/%d: %s", plan.name, epoch + 1, plan.epochs, brief(metrics))
        runtime.report({k: v for k, v in metrics.items() if v is not None}, checkpoint)


def _stop_early(plan: FitPlan, runtime: Runtime, epoch: int) -> bool:
    """Rank 0 decides from the validation AUCs in metrics.jsonl (so a resumed run decides as
    the uninterrupted one would) and tells the other ranks: all must stop at the same epoch."""
    stop = False
    if runtime.rank == 0:
        history = [r.get("val_auc") for r in plan.stage_dir.metrics() if "epoch" in r]
        stop = should_stop(history, plan.patience, plan.min_delta)
        if stop:
            plan.stage_dir.append_metrics({"event": "stopped_early", "after_epoch": epoch, "patience": plan.patience,
                                           "min_delta": plan.min_delta, "time": time.time()})
            log.debug("%s: stopped early after epoch %d (no val_auc gain > %g in %d epochs)",
                     plan.name, epoch + 1, plan.min_delta, plan.patience)
    return bool(runtime.broadcast(stop))


def for_device(model: torch.nn.Module, plan: FitPlan, runtime: Runtime) -> torch.nn.Module:
    """The model as this runtime's device trains it fastest (before DDP wraps it).

    - cuDNN benchmarks its kernels for the first batch's shapes: every step has the same ones.
    - SyncBatchNorm with several CUDA workers: SimCLR's BatchNorm over one GPU's share of the
      batch (16 pairs of 128 on 8 GPUs) lets positives be told apart by their batch statistics,
      the shortcut SimCLR's authors closed with global BatchNorm. Torch implements it on GPUs
      only; CPU workers keep per-worker statistics. Its state keys are BatchNorm's: checkpoints
      load into the plain model.
    - channels_last: the memory layout tensor cores and oneDNN convolve fastest.
    """
    if runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if plan.sync_batchnorm and runtime.world_size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _initial_model(plan: FitPlan) -> torch.nn.Module:
    model = plan.spec.build()
    if plan.init_backbone:
        init_backbone_from(model, plan.init_backbone)
    if plan.init_model:
        from drray.models.checkpoints import load_strict

        path = Path(plan.init_model) / "model.pt"
        load_strict(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return model


def _keep_best(plan: FitPlan, model, metrics: dict) -> None:
    auc = metrics.get("val_auc")
    if auc is None:
        return
    best = plan.stage_dir.best_metrics()
    if best is not None and best.get("val_auc", -1) >= auc:
        return
    _save_model(plan.stage_dir.best, plan, model, metrics["epoch"], metrics, "best-model folder")


def _save_model(folder: Path, plan: FitPlan, model, epoch: int, metrics: dict, what: str) -> None:
    with atomic_directory(folder, what=what, legacy=MODEL_LEGACY) as tmp:
        save_checkpoint(tmp, model=model, spec=plan.spec, epoch=epoch, metrics=metrics)


def forget_after(out: StageDir, start: int) -> None:
    """On resume, forget what epochs after the checkpoint wrote (they are trained again): their
    metrics lines and a best model chosen among them."""
    if out.metrics_file.is_file():
        kept = [line for line in out.metrics_file.read_text().splitlines(keepends=True)
                if json.loads(line).get("epoch", -1) < start]
        atomic_write_text(out.metrics_file, "".join(kept))
    best = out.best / "meta.json"
    if best.is_file() and json.loads(best.read_text())["epoch"] >= start:
        shutil.rmtree(out.best)


def brief(metrics: dict) -> str:
    keys = ("loss", "val_auc", "mask_rate", "guess_positive_rate", "knn_auc", "images_per_s", "lr")
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if metrics.get(k) is not None)


# ---------------------------------------------------------------------------------------------


class LocalRuntime:
    """One process, no Ray: batches from plain functions, checkpoints in ``checkpoints/`` (the
    newest ``keep`` kept), for tests and single-process tools. ``streams`` maps a stream's name
    to a function ``(batch_size, drop_last) -> iterable of batches`` giving one pass."""

    rank, world_size = 0, 1

    def __init__(self, streams: dict, checkpoints: str | Path, keep: int = 2, device: str = "cpu"):
        self.streams, self.checkpoints, self.keep = streams, Path(checkpoints), keep
        self.device = torch.device(device)

    def wrap(self, model):
        return model.to(self.device)

    def batches(self, stream: str, batch_size: int, *, drop_last: bool):
        return self.streams[stream](batch_size, drop_last)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        found = sorted(self.checkpoints.glob("checkpoint_*")) if self.checkpoints.is_dir() else []
        yield found[-1] if found else None

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.checkpoints.glob("checkpoint_*"))
        number = int(existing[-1].name.rsplit("_", 1)[1]) + 1 if existing else 0
        target = self.checkpoints / f"checkpoint_{number:06d}"
        tmp = self.checkpoints / f".{target.name}.tmp-{os.getpid()}"
        shutil.copytree(checkpoint, tmp)
        os.replace(tmp, target)
        for old in sorted(self.checkpoints.glob("checkpoint_*"))[:-self.keep]:
            shutil.rmtree(old)

    def broadcast(self, value):
        return value
