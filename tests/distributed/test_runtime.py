"""Which Ray a job starts or joins (ray.init's arguments; a second real cluster here would be the
thing under test going wrong)."""

import ray

from drray.distributed import runtime


def _init_args(monkeypatch, env: dict) -> dict:
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runtime.ensure_ray(num_cpus=3)
    return seen


def test_without_ray_address_a_job_starts_its_own_ray_never_one_it_finds(monkeypatch):
    # None would let ray.init join the cluster `ray start` last left on the machine (someone else's)
    assert _init_args(monkeypatch, {})["address"] == "local"
    assert _init_args(monkeypatch, {})["num_cpus"] == 3


def test_ray_address_joins_that_cluster_with_its_own_cpus(monkeypatch):
    args = _init_args(monkeypatch, {"RAY_ADDRESS": "10.0.0.7:6379"})
    assert args["address"] == "10.0.0.7:6379" and "num_cpus" not in args
