"""What a job asks of the Ray cluster, checked before it starts: Ray waits forever for actors
or workers that cannot be placed, and a pipeline whose actors or training workers hold every
CPU starves its own read/decode tasks (ray issue #44687, a silent hang). One place computes
the demand of training and inference so that a stage and a sweep of stages agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Half a CPU per data task: two tasks share each CPU left free by the training workers, so one
# decodes while the other waits on the object store or the scheduler (measured in bench/train);
# inference's tasks only read shards (its actors decode), and keep the same share.
DATA_TASK_CPUS = 0.5


@dataclass(frozen=True)
class Demand:
    """CPUs and GPUs one job holds at its peak (data tasks' headroom included)."""

    cpus: float
    gpus: float = 0.0
    what: str = ""  # the setting to change, named in errors: e.g. "finetune.scaling"

    def __add__(self, other: Demand) -> Demand:
        return Demand(self.cpus + other.cpus, self.gpus + other.gpus, self.what or other.what)

    def times(self, n: int) -> Demand:
        return Demand(self.cpus * n, self.gpus * n, self.what)


def training_demand(num_workers: int, cpus_per_worker: float, use_gpu: bool, what: str) -> Demand:
    """Ray Train workers plus one data task's CPU for the pipeline that feeds them."""
    return Demand(num_workers * cpus_per_worker + DATA_TASK_CPUS, num_workers if use_gpu else 0, what)


def inference_demand(concurrency: int, cpus_per_actor: float, use_gpu: bool, what: str) -> Demand:
    """Model actors (which decode their images themselves) plus one data task's CPU for the
    tasks that read the shards and select the rows that feed them."""
    return Demand(concurrency * cpus_per_actor + DATA_TASK_CPUS, concurrency if use_gpu else 0, what)


def cluster_capacity() -> Demand:
    import ray

    total = ray.cluster_resources()
    return Demand(total.get("CPU", 0.0), total.get("GPU", 0.0))


def check_fits(demand: Demand, hint: str, capacity: Demand | None = None) -> None:
    """Raise ValueError naming the setting when ``demand`` does not fit the cluster."""
    capacity = capacity or cluster_capacity()
    if demand.gpus > capacity.gpus:
        raise ValueError(f"{demand.what}: needs {demand.gpus:g} GPU(s), the Ray cluster has {capacity.gpus:g}; {hint}")
    if demand.cpus > capacity.cpus:
        raise ValueError(f"{demand.what}: needs {demand.cpus:g} CPUs (data tasks' {DATA_TASK_CPUS:g} included), "
                         f"the Ray cluster has {capacity.cpus:g}; {hint}")
