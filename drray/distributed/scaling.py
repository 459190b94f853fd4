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

    def share(self, share: ClusterShare) -> ClusterShape:
        """One of ``share.jobs`` equal shares, less the ``share.reserved_cpus`` the job's own process holds."""
        jobs = max(1, share.jobs)
        return ClusterShape(max(0.0, self.cpus / jobs - share.reserved_cpus), self.gpus // jobs,
                            max(1, self.nodes // jobs))

    @property
    def capacity(self) -> Demand:
        return Demand(self.cpus, self.gpus)


def cluster_shape(share: ClusterShare | None = None) -> ClusterShape:
    """This job's ``share`` (``Config.share``; default: all) of the running Ray cluster's alive
    nodes, CPUs and GPUs."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    total = ray.cluster_resources()
    whole = ClusterShape(total.get("CPU", 0.0), total.get("GPU", 0.0), max(1, len(nodes)))
    return whole.share(share or ClusterShare())


def training_workers(scaling: ScalingConfig, global_batch: int, what: str, shape: ClusterShape) -> ScalingConfig:
    """``scaling`` with a number of workers (unchanged unless it says "auto")."""
    if scaling.num_workers != AUTO:
        return scaling
    fits = _auto_fits(shape, scaling.cpus_per_worker, scaling.use_gpu, "worker", setting=f"{what}.scaling.num_workers",
                      cpus_setting=f"{what}.scaling.cpus_per_worker", gpu_setting=f"{what}.scaling.use_gpu")
    wanted, unit = (int(shape.gpus), "GPU") if scaling.use_gpu else (shape.nodes, "node")
    n = largest_divisor(global_batch, min(wanted, fits))
    log.info("%s.scaling.num_workers auto: %d (one per %s: %d; CPUs for %d; batch %d)",
             what, n, unit, wanted, fits, global_batch)
    return dataclasses.replace(scaling, num_workers=n)


def inference_actors(concurrency: int | str, cpus_per_actor: float, use_gpu: bool, what: str,
                     shape: ClusterShape) -> int:
    """The number of model actors (``concurrency`` unless it says "auto")."""
    if concurrency != AUTO:
        return int(concurrency)
    fits = _auto_fits(shape, cpus_per_actor, use_gpu, "actor", setting=f"{what}.concurrency",
                      cpus_setting=f"{what}.cpus_per_actor", gpu_setting=f"{what}.use_gpu")
    n = min(fits, int(shape.gpus)) if use_gpu else fits
    log.info("%s.concurrency auto: %d actor(s)", what, n)
    return n


def _auto_fits(shape: ClusterShape, cpus_each: float, use_gpu: bool, unit: str, *, setting: str,
               cpus_setting: str, gpu_setting: str) -> int:
    """How many workers or actors of ``cpus_each`` CPUs this job's ``shape`` holds beside the
    data tasks' share (the inverse of drray.distributed.resources' demands); an "auto" that
    cannot be met raises, naming the setting to change."""
    if use_gpu and shape.gpus < 1:
        raise ValueError(f"{setting} is auto with use_gpu, but the Ray cluster has no GPU for this job: "
                         f"run it on GPU nodes, or set {gpu_setting}=false")
    fits = int((shape.cpus - DATA_TASK_CPUS) // max(cpus_each, 1e-9))
    if fits < 1:
        raise ValueError(f"{setting} is auto, but one {unit}'s {cpus_each:g} CPUs and the data tasks' "
                         f"{DATA_TASK_CPUS:g} do not fit the {shape.cpus:g} CPUs this job has: lower {cpus_setting}")
    return fits


def largest_divisor(total: int, at_most: int) -> int:
    """The largest count <= ``at_most`` that divides ``total`` (1 at least)."""
    return next(n for n in range(max(1, at_most), 0, -1) if total % n == 0)
