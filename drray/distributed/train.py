"""Every training stage as a Ray Train job: one worker function, one trainer factory.

The worker builds the model from a ModelSpec, resumes from ``ray.train.get_checkpoint()`` when
Ray restarted it (worker failure) or when the same command is run again (same run name and
storage path), runs the engine's loop over its shard of the Ray Data pipeline, and reports a
full-state checkpoint every ``checkpoint_every`` epochs on every rank (rank 0 carries the
files). Rank 0 also appends each epoch's metrics to ``metrics.jsonl``, keeps the best model by
validation AUC (``best/``) and writes the final model (``model/``) into the stage directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from drray.artifacts import atomic_directory, atomic_write_json, atomic_write_text
from drray.distributed.resources import Demand, check_fits, training_demand
from drray.engine.checkpoint import MODEL_LEGACY, load_training_state, save_checkpoint
from drray.engine.ema import EMA
from drray.engine.loop import make_scaler, predict, resolve_precision, train_epoch
from drray.engine.model import ModelSpec, init_backbone_from, unwrap
from drray.engine.optim import build_optimizer, build_scheduler
from drray.engine.steps import classify_step, fixmatch_step, mixmatch_step, simclr_step
from drray.engine.stopping import should_stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRun:
    """Everything a training worker needs, picklable and free of config objects."""

    name: str  # stage name, e.g. "pretrain"
    out_dir: str  # the stage's directory: metrics.jsonl, model/, best/, done.json
    spec: ModelSpec
    step: str  # "simclr" or "classify"
    epochs: int
    batch_size: int
    steps_per_epoch: int
    optim: dict  # OptimConfig fields
    precision: str = "auto"
    channels_last: bool = False
    temperature: float = 0.5
    gather: bool = True
    init_backbone: str | None = None  # checkpoint dir whose backbone starts this model
    init_model: str | None = None  # checkpoint dir whose whole model starts this one
    validate: bool = False
    checkpoint_every: int = 1
    seed: int = 0
    epochs_per_pass: int = 1  # epochs in one pass of the "train" dataset (datasets.repeat)
    patience: int | None = None  # early stopping on val_auc (engine.stopping); None: every epoch
    min_delta: float = 0.0
    # FixMatch / MixMatch: the "unlabeled" dataset's batch per worker, the method's settings
    # (engine.steps), and the decay of the weight average that is validated and published
    unlabeled_batch: int = 0
    ssl: dict | None = None
    ema_decay: float | None = None


@dataclass(frozen=True)
class Scaling:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    keep_checkpoints: int = 2
    max_failures: int = 2

    def demand(self, what: str) -> Demand:
        return training_demand(self.num_workers, self.cpus_per_worker, self.use_gpu, what)


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


def train_worker(config: dict) -> dict:
    import ray.train
    import ray.train.torch

    run: StageRun = config["run"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(run.seed * 1000 + rank)
    np.random.seed(run.seed * 1000 + rank)
    out = Path(run.out_dir)
    _write_pid(out, rank)

    device = ray.train.torch.get_device()
    model = _initial_model(run)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model.parameters(), run.optim["name"], run.optim["lr"],
                                run.optim["weight_decay"], run.optim["momentum"], run.optim["nesterov"])
    total_steps = max(1, run.epochs * run.steps_per_epoch)
    scheduler = build_scheduler(optimizer, total_steps, run.optim["warmup_epochs"] * run.steps_per_epoch,
                                run.optim["schedule"])
    dtype = resolve_precision(run.precision, device)
    scaler = make_scaler(device, dtype)
    ema = EMA(model, run.ema_decay) if run.ema_decay is not None else None
    evaluated = ema.model if ema is not None else model  # what is validated, kept as best and published

    start, metrics = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        single = ctx.get_world_size() == 1
        with checkpoint.as_directory() as d:
            done, metrics = load_training_state(d, model=model, optimizer=optimizer, scheduler=scheduler,
                                                scaler=scaler, restore_rng=single)
            if ema is not None:
                ema.load_state_dict(torch.load(Path(d) / EMA_FILE, map_location=device, weights_only=True))
        start = done + 1
        if not single:
            torch.manual_seed(run.seed * 1000 + rank + 7919 * start)
            np.random.seed(run.seed * 1000 + rank + 7919 * start)
        if rank == 0:
            _forget_after(out, start)
            _append_metrics(out, {"event": "resumed", "epochs_done": start, "time": time.time()})
            log.info("%s: resumed after epoch %d (its checkpoint)", run.name, start)

    step = _step_of(run, steps_done=start * run.steps_per_epoch)
    stream = None
    for epoch in range(start, run.epochs):
        if stream is None or (epoch - start) % run.epochs_per_pass == 0:
            # One pass streams epochs_per_pass epochs; every rank starts passes at the same
            # epochs, so all ranks take the same number of equal batches (DDP needs that).
            stream = _batch_stream(run)
        batches = itertools.islice(stream, run.steps_per_epoch)
        metrics = train_epoch(model, batches, step, optimizer, scheduler, scaler, device=device, dtype=dtype,
                              channels_last=run.channels_last,
                              after_step=(lambda: ema.update(model)) if ema is not None else None)
        expected = run.steps_per_epoch * run.batch_size
        if metrics["images"] < expected:  # never train on a silently shortened epoch
            raise RuntimeError(f"{run.name} epoch {epoch}: the data pipeline delivered {metrics['images']} "
                               f"of {expected} images; is the selection smaller than counted?")
        metrics.update(epoch=epoch, torch_threads=torch.get_num_threads())
        if run.validate and rank == 0:
            metrics["val_auc"] = _validation_auc(evaluated, run, device, dtype)
        _report(run, rank, epoch, metrics, model, optimizer, scheduler, scaler, ema)
        if run.patience is not None and epoch < run.epochs - 1 and _stop_early(run, rank, epoch):
            break
    if rank == 0:
        _finish(run, evaluated, metrics)
    return metrics


EMA_FILE = "ema.pt"  # in a training checkpoint, beside model.pt (the raw weights)


def _step_of(run: StageRun, steps_done: int):
    if run.step == "simclr":
        return simclr_step(run.temperature, run.gather)
    if run.step == "fixmatch":
        return fixmatch_step(run.ssl["threshold"], run.ssl["lambda_u"])
    if run.step == "mixmatch":
        return mixmatch_step(run.ssl["temperature"], run.ssl["alpha"], run.ssl["lambda_u"],
                             run.ssl["rampup_steps"], steps_done)
    return classify_step


def _batch_stream(run: StageRun):
    """One pass of the "train" dataset's batches; for FixMatch/MixMatch each zipped with a batch
    of the "unlabeled" dataset (the labeled dataset repeats enough to last the pass). No local
    shuffle buffer: rows are shuffled upstream, and a buffer here would copy every batch again."""
    import ray.train

    def batches(name: str, size: int):
        return ray.train.get_dataset_shard(name).iter_batches(batch_size=size, batch_format="numpy",
                                                             drop_last=True, prefetch_batches=8)

    labeled = batches("train", run.batch_size)
    if not run.unlabeled_batch:
        return iter(labeled)
    # not strict: the labeled stream is the longer by design; a short epoch fails in train_worker
    return ({**x, **u} for x, u in zip(labeled, batches("unlabeled", run.unlabeled_batch), strict=False))


def _stop_early(run: StageRun, rank: int, epoch: int) -> bool:
    """Rank 0 decides from the validation AUCs in metrics.jsonl (so a resumed run decides as
    the uninterrupted one would) and tells the other ranks: all must stop at the same epoch."""
    import torch.distributed as dist

    stop = False
    if rank == 0:
        path = Path(run.out_dir) / "metrics.jsonl"
        history = [r.get("val_auc") for r in map(json.loads, path.read_text().splitlines()) if "epoch" in r]
        stop = should_stop(history, run.patience, run.min_delta)
        if stop:
            _append_metrics(Path(run.out_dir), {"event": "stopped_early", "after_epoch": epoch, "patience": run.patience,
                                                "min_delta": run.min_delta, "time": time.time()})
            log.info("%s: stopped early after epoch %d (no val_auc gain > %g in %d epochs)",
                     run.name, epoch + 1, run.min_delta, run.patience)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        decision = [stop]
        dist.broadcast_object_list(decision, src=0)
        stop = decision[0]
    return stop


def _initial_model(run: StageRun) -> torch.nn.Module:
    model = run.spec.build()
    if run.init_backbone:
        init_backbone_from(model, run.init_backbone)
    if run.init_model:
        from drray.models.checkpoints import load_strict

        path = Path(run.init_model) / "model.pt"
        load_strict(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return model


def _validation_auc(model, run: StageRun, device, dtype) -> float | None:
    """Validation AUC on rank 0 with the unwrapped model: DDP's forward is a collective."""
    import ray.train
    from sklearn.metrics import roc_auc_score

    shard = ray.train.get_dataset_shard("val")
    batches = list(shard.iter_batches(batch_size=256, batch_format="numpy"))
    targets = np.concatenate([b["target"] for b in batches]) if batches else np.zeros(0)
    _, probs = predict(unwrap(model), batches, device=device, dtype=dtype, channels_last=run.channels_last)
    if len(np.unique(targets)) < 2:
        return None
    return float(roc_auc_score(targets, probs))


def _report(run: StageRun, rank: int, epoch: int, metrics: dict, model, optimizer, scheduler, scaler,
            ema: EMA | None = None) -> None:
    """Checkpoint and report on every rank (the report is a barrier); rank 0 writes the files."""
    import ray.train

    last = epoch == run.epochs - 1
    due = last or (epoch + 1) % max(1, run.checkpoint_every) == 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            if due:
                save_checkpoint(tmp, model=model, spec=run.spec, epoch=epoch, metrics=metrics,
                                optimizer=optimizer, scheduler=scheduler, scaler=scaler)
                if ema is not None:
                    torch.save(ema.state_dict(), Path(tmp) / EMA_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            _append_metrics(Path(run.out_dir), {"stage": run.name, **metrics, "time": time.time()})
            _keep_best(run, ema.model if ema is not None else model, metrics)
            log.info("%s epoch %d/%d: %s", run.name, epoch + 1, run.epochs, _brief(metrics))
        ray.train.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)


def _keep_best(run: StageRun, model, metrics: dict) -> None:
    auc = metrics.get("val_auc")
    if auc is None:
        return
    best_meta = Path(run.out_dir) / "best" / "meta.json"
    if best_meta.is_file() and json.loads(best_meta.read_text())["metrics"].get("val_auc", -1) >= auc:
        return
    with atomic_directory(Path(run.out_dir) / "best", what="best-model folder", legacy=MODEL_LEGACY) as tmp:
        save_checkpoint(tmp, model=model, spec=run.spec, epoch=metrics["epoch"], metrics=metrics)


def _finish(run: StageRun, model, metrics: dict) -> None:
    with atomic_directory(Path(run.out_dir) / "model", what="model folder", legacy=MODEL_LEGACY) as tmp:
        save_checkpoint(tmp, model=model, spec=run.spec, epoch=metrics.get("epoch", run.epochs - 1), metrics=metrics)


def _forget_after(out: Path, start: int) -> None:
    """On resume, forget what epochs after the checkpoint wrote (they are trained again): their
    metrics lines and a best model chosen among them."""
    path = out / "metrics.jsonl"
    if path.is_file():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if json.loads(line).get("epoch", -1) < start]
        atomic_write_text(path, "".join(kept))
    best = out / "best" / "meta.json"
    if best.is_file() and json.loads(best.read_text())["epoch"] >= start:
        shutil.rmtree(out / "best")


def _append_metrics(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _write_pid(out: Path, rank: int) -> None:
    """Which process is which rank: for operators (and the fault-injection tests)."""
    (out / "workers").mkdir(parents=True, exist_ok=True)
    (out / "workers" / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")


def _brief(metrics: dict) -> str:
    keys = ("loss", "val_auc", "images_per_s", "lr")
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if metrics.get(k) is not None)


# ---------------------------------------------------------------------------------------------
# The driver side
# ---------------------------------------------------------------------------------------------


def fit_stage(run: StageRun, datasets: dict, scaling: Scaling, storage: str | Path) -> dict:
    """Run one stage as a TorchTrainer; resumes if ``storage`` holds this stage's checkpoints.

    The run name is the stage directory's name, so the same command finds its own checkpoints
    again after the whole job died.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    for path in (run.out_dir, run.init_backbone, run.init_model):
        if path and not Path(path).is_absolute():
            raise ValueError(f"{run.name}: {path} must be an absolute path (workers have their own cwd)")
    check_fits(scaling.demand(f"the {run.name} stage"),
               "lower scaling.num_workers or scaling.cpus_per_worker in its config section, or set scaling.use_gpu=false")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"run": run},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=Path(run.out_dir).name,
            storage_path=str(Path(storage).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=scaling.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
        ),
        datasets=datasets,
        # every worker takes its share of the training data; validation runs on rank 0 alone
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in datasets if k != "val"]),
    )
    with _EpochPrinter(Path(run.out_dir) / "metrics.jsonl", run.name, run.epochs), _sigint_handler_kept():
        result = trainer.fit()
    if result.error:
        raise result.error
    metrics = result.return_value if isinstance(getattr(result, "return_value", None), dict) else {}
    atomic_write_json(Path(run.out_dir) / "done.json", {"stage": run.name, "metrics": metrics,
                                                        "run": _run_record(run)})
    return metrics


@contextlib.contextmanager
def _sigint_handler_kept():
    """Put back the SIGINT handler that ``fit()`` replaces. Ray Train 2.60 installs one (in the
    main thread) whose closure holds the run's controller actor, so the controller, its
    DatasetManager and SplitCoordinator stayed alive after the run until the next fit replaced
    the handler: measured here, a finished stage's actors polled (the coordinator at up to a
    full core) through the whole next stage, and through a whole sweep after its pretraining."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _EpochPrinter:
    """Shows the stage's progress on the driver's console by following its metrics.jsonl
    (worker logs stay in Ray's files), so it works the same locally and on a cluster."""

    def __init__(self, path: Path, name: str, epochs: int, interval: float = 0.5):
        self.path, self.name, self.epochs, self.interval = path, name, epochs, interval
        self._stop = threading.Event()
        self._offset = path.stat().st_size if path.exists() else 0
        self._seen: set[str] = set()  # lines already shown (a resume may rewrite the file)
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self):
        print(f"[{self.name}] starting ({self.epochs} epochs)", file=sys.stderr, flush=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._print_new()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self._print_new()

    def _print_new(self) -> None:
        if not self.path.exists():
            return
        if self.path.stat().st_size < self._offset:  # rewritten on resume: read it again
            self._offset = 0
        with open(self.path) as f:
            f.seek(self._offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits for next time
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            if line in self._seen:
                continue
            self._seen.add(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "resumed":
                text = f"resumed from the checkpoint after epoch {record['epochs_done']}"
            elif record.get("event") == "stopped_early":
                text = (f"stopped early after epoch {record['after_epoch'] + 1}: validation AUC did not improve by more "
                        f"than {record['min_delta']:g} in {record['patience']} epochs")
            else:
                text = f"epoch {record['epoch'] + 1}/{self.epochs}: {_brief(record)}"
            print(f"[{self.name}] {text}", file=sys.stderr, flush=True)


def _run_record(run: StageRun) -> dict:
    record = dataclasses.asdict(run)
    record["spec"] = run.spec.to_dict()
    return record
