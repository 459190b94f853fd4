"""Where a stage's fit loop (``drray.engine.fit``) runs: on Ray Train, or in the driver process.
The adapters and the trainer factory, nothing of the loop itself.

Each worker runs :func:`drray.engine.fit.fit` with a :class:`RayTrainRuntime`: its shard of the
Ray Data streams, DDP, checkpoints reported on every rank (rank 0 carries the files) and restored
from ``ray.train.get_checkpoint()`` when Ray restarted the worker group (a worker failure) or
when the same command runs again (same run name and storage path). The driver's
:func:`fit_stage` builds the ``TorchTrainer`` and shows the stage's progress from its
``metrics.jsonl``; marking the stage complete is the stage graph's business (jobs.common).

With ``scaling.runtime`` "driver" (by default for one CPU worker) the same loop runs in the
job's own process over the same Ray Data streams, with :class:`drray.engine.fit.LocalRuntime`:
no controller, worker group or second torch import per stage (bench/fit_overhead.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import pickle
import signal
import threading
from pathlib import Path

from drray.config import ScalingConfig
from drray.distributed.datasets import Stream
from drray.distributed.resources import check_fits, training_demand
from drray.engine.fit import WHOLE_ON_RANK0, FitPlan, LocalRuntime, brief, fit
from drray.progress import say

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The worker: the engine's fit loop with Ray Train as its runtime
# ---------------------------------------------------------------------------------------------


class RayTrainRuntime:
    """:class:`drray.engine.fit.Runtime` inside a Ray Train worker: this rank's dataset shards,
    DDP through ``prepare_model``, checkpoints through ``ray.train.report`` / ``get_checkpoint``."""

    def __init__(self, own_datasets: dict | None = None):
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self._own = own_datasets  # built in this worker (one worker: nothing to split)
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def batches(self, stream: str, batch_size: int, *, drop_last: bool):
        source = self._own[stream] if self._own is not None else self._train.get_dataset_shard(stream)
        return one_pass(source, batch_size, drop_last)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        saved = self._train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        self._train.report(metrics, checkpoint=saved)

    def broadcast(self, value):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            holder = [value]
            dist.broadcast_object_list(holder, src=0)
            value = holder[0]
        return value


def one_pass(dataset, batch_size: int, drop_last: bool):
    """One pass of a Ray Dataset (or a worker's shard of one) as numpy batches. No local shuffle
    buffer: rows are shuffled upstream, and a buffer here would copy every batch again."""
    return dataset.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                prefetch_batches=8)


def train_worker(config: dict) -> dict:
    """The function every Ray Train worker runs (rank 0's return is the run's result). The plan
    (and, for one worker, the streams) arrive pickled by drray: Ray Train's controller process
    then never unpickles them, so it never imports torch and drray (measured: 2-3 s per fit)."""
    plan = pickle.loads(config["plan"])
    own = {name: s.build() for name, s in pickle.loads(config["streams"]).items()} if config["streams"] else None
    return fit(plan, RayTrainRuntime(own))


# ---------------------------------------------------------------------------------------------
# The driver side
# ---------------------------------------------------------------------------------------------


def fit_stage(plan: FitPlan, streams: dict[str, Stream], scaling: ScalingConfig, storage: str | Path, *,
              keep_checkpoints: int = 2, max_failures: int = 2) -> dict:
    """Train one stage where ``scaling.runtime`` says; resumes from this stage's checkpoints in
    ``storage/<stage dir name>`` (the same command finds its own checkpoints after the whole job
    died); returns rank 0's last metrics."""
    for path in (plan.out_dir, plan.init_backbone, plan.init_model):
        if path and not Path(path).is_absolute():
            raise ValueError(f"{plan.name}: {path} must be an absolute path (workers have their own cwd)")
    demand = training_demand(scaling.num_workers, scaling.cpus_per_worker, scaling.use_gpu, f"the {plan.name} stage")
    check_fits(demand, "lower scaling.num_workers or scaling.cpus_per_worker in its config section, "
                       "or set scaling.use_gpu=false")
    checkpoints = Path(storage).resolve() / plan.stage_dir.name
    with _EpochPrinter(plan.stage_dir.metrics_file, plan.name, plan.epochs):
        if scaling.resolved_runtime() == "driver":
            return _fit_in_driver(plan, streams, scaling, checkpoints, keep_checkpoints)
        return _fit_on_ray_train(plan, streams, scaling, checkpoints, keep_checkpoints, max_failures)


def _fit_on_ray_train(plan: FitPlan, streams: dict[str, Stream], scaling: ScalingConfig, checkpoints: Path,
                      keep_checkpoints: int, max_failures: int) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    split = scaling.num_workers > 1  # several workers share the streams through Ray Train's split
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"plan": pickle.dumps(plan), "streams": None if split else pickle.dumps(streams)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
            # CPU workers one per node where the nodes allow (each uses its CPUs as torch
            # threads; drray.distributed.scaling counts them so); GPU workers packed (NCCL)
            placement_strategy="PACK" if scaling.use_gpu else "SPREAD",
        ),
        run_config=ray.train.RunConfig(
            name=checkpoints.name, storage_path=str(checkpoints.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets={name: s.build() for name, s in streams.items()} if split else None,
        # every worker takes its share of the training streams; validation runs on rank 0 alone
        dataset_config=ray.train.DataConfig(datasets_to_split=[k for k in streams if k not in WHOLE_ON_RANK0]) if split else None,
    )
    with _sigint_handler_kept():
        result = trainer.fit()
    if result.error:
        raise result.error
    return result.return_value if isinstance(getattr(result, "return_value", None), dict) else {}


def _fit_in_driver(plan: FitPlan, streams: dict[str, Stream], scaling: ScalingConfig, checkpoints: Path,
                   keep_checkpoints: int) -> dict:
    """The fit loop in this process over the same Ray Data streams, as one Ray Train worker would
    run it: its CPUs reserved in the cluster (so Ray Data and concurrent trials see them taken),
    as many torch threads as it has CPUs, checkpoints kept beside the stage's other runs."""
    import ray
    import torch
    from ray.util.placement_group import placement_group, remove_placement_group

    reserved = placement_group([{"CPU": scaling.cpus_per_worker}])
    ray.get(reserved.ready(), timeout=600)
    threads = torch.get_num_threads()
    torch.set_num_threads(scaling.cpus_per_worker)
    try:
        datasets = {name: s.build() for name, s in streams.items()}
        passes = {name: functools.partial(one_pass, ds) for name, ds in datasets.items()}
        return fit(plan, LocalRuntime(passes, checkpoints, keep=keep_checkpoints))
    finally:
        torch.set_num_threads(threads)
        remove_placement_group(reserved)


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
        say(self.name, f"starting ({self.epochs} epochs)")
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
                text = f"epoch {record['epoch'] + 1}/{self.epochs}: {brief(record)}"
            say(self.name, text)


def plan_record(plan: FitPlan) -> dict:
    """The plan as done.json records it (JSON: the method by its class name and settings)."""
    record = dataclasses.asdict(plan)
    record["spec"] = plan.spec.to_dict()
    record["method"] = {"name": type(plan.method).__name__, **dataclasses.asdict(plan.method)}
    return record
