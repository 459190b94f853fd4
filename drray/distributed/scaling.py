"""Counts a config leaves to the allocation: ``num_workers: auto`` (training) and
``concurrency: auto`` (inference), resolved from the Ray cluster the job runs on, so one config
fills a 1-GPU workstation and an 8-GPU node alike.

- Training with ``use_gpu``: one worker per GPU. Without GPUs: one worker per node (a CPU worker
  uses its ``cpus_per_worker`` as torch threads; several workers on one node would only split
  them and add an all-reduce). Never more than the CPUs allow (each worker's CPUs plus the data
  tasks' share, drray.distributed.resources), and a count that divides the stage's global batch
  (DDP needs equal per-worker batches).
- Inference with ``use_gpu``: one model actor per GPU. Without: as many CPU actors as leave the
  shard-reading tasks their share (the actors decode their own batches).

A job that shares the cluster with others (a sweep's concurrent trials) counts its share only,
less what its own process holds there (``Config.share``). The resolved count goes into the stage's plan (done.json); the stage's key
keeps "auto", so the same stage found again on another allocation is reused, not retrained.
"""

from __future__ import annotations

import dataclasses
import logging

from drray.config import ClusterShare, ScalingConfig
from drray.distributed.resources import DATA_TASK_CPUS, Demand

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class ClusterShape:
    """What a job may use of the Ray cluster: its share of the CPUs, GPUs and nodes."""

    cpus: float
    gpus: float
    nodes: int

    def share(self, jobs: int, reserved_cpus: float = 0.0) -> ClusterShape:
        """One of ``jobs`` equal shares, less ``reserved_cpus`` the job's own process holds."""
        jobs = max(1, jobs)
        return ClusterShape(max(0.0, self.cpus / jobs - reserved_cpus), self.gpus // jobs, max(1, self.nodes // jobs))

    @property
    def capacity(self) -> Demand:
        return Demand(self.cpus, self.gpus)


def cluster_shape(share: ClusterShare | None = None) -> ClusterShape:
    """This job's ``share`` (``Config.share``; default: all) of the running Ray cluster's alive
    nodes, CPUs and GPUs."""
    import ray

    share = share or ClusterShare()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    total = ray.cluster_resources()
    whole = ClusterShape(total.get("CPU", 0.0), total.get("GPU", 0.0), max(1, len(nodes)))
    return whole.share(share.jobs, share.reserved_cpus)


def training_workers(scaling: ScalingConfig, global_batch: int, what: str, shape: ClusterShape) -> ScalingConfig:
    """``scaling`` with a number of workers (unchanged unless it says "auto")."""
    if scaling.num_workers != AUTO:
        return scaling
    if scaling.use_gpu:
        if shape.gpus < 1:
            raise ValueError(f"{what}.scaling.num_workers is auto with use_gpu, but the Ray cluster has no GPU "
                             f"for this job: run it on GPU nodes, or set {what}.scaling.use_gpu=false")
        wanted, unit = int(shape.gpus), "GPU"
    else:
        wanted, unit = shape.nodes, "node"
    fits = int((shape.cpus - DATA_TASK_CPUS) // max(scaling.cpus_per_worker, 1e-9))
    if fits < 1:
        raise ValueError(f"{what}.scaling.num_workers is auto, but one worker's {scaling.cpus_per_worker} CPUs and "
                         f"its data tasks' {DATA_TASK_CPUS:g} do not fit the {shape.cpus:g} CPUs this job has: "
                         f"lower {what}.scaling.cpus_per_worker")
    n = largest_divisor(global_batch, min(wanted, fits))
    log.info("%s.scaling.num_workers auto: %d (one per %s: %d; CPUs for %d; batch %d)",
             what, n, unit, wanted, fits, global_batch)
    return dataclasses.replace(scaling, num_workers=n)


def inference_actors(concurrency: int | str, cpus_per_actor: float, use_gpu: bool, what: str,
                     shape: ClusterShape) -> int:
    """The number of model actors (``concurrency`` unless it says "auto")."""
    if concurrency != AUTO:
        return int(concurrency)
    fits = int((shape.cpus - DATA_TASK_CPUS) // max(cpus_per_actor, 1e-9))
    if use_gpu:
        if shape.gpus < 1:
            raise ValueError(f"{what}.concurrency is auto with use_gpu, but the Ray cluster has no GPU for this "
                             f"job: run it on GPU nodes, or set {what}.use_gpu=false")
        fits = min(fits, int(shape.gpus))
    if fits < 1:
        raise ValueError(f"{what}.concurrency is auto, but one actor's {cpus_per_actor:g} CPUs and the read "
                         f"tasks' {DATA_TASK_CPUS:g} do not fit the {shape.cpus:g} CPUs this job has: "
                         f"lower {what}.cpus_per_actor")
    log.info("%s.concurrency auto: %d actor(s)", what, fits)
    return fits


def largest_divisor(total: int, at_most: int) -> int:
    """The largest count <= ``at_most`` that divides ``total`` (1 at least)."""
    return next(n for n in range(max(1, at_most), 0, -1) if total % n == 0)
