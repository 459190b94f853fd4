"""Shared fixtures: a real local Ray instance, small synthetic data sets, marker handling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="needs CUDA (a GPU machine); runs there with the same code")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _repo_cwd():
    """Configs name data paths relative to the repository root, as the README's commands do."""
    previous = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(previous)


@pytest.fixture(scope="session")
def ray_session():
    """One real Ray instance for the whole test session. 4 logical CPUs on this 2-core machine:
    two training workers plus the Ray Data tasks that feed them (a pipeline without a free CPU
    deadlocks, DESIGN.md section 7)."""
    import ray

    from drray.distributed.runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_eyepacs(tmp_path_factory) -> Path:
    """A small synthetic EyePACS-style data set (train/ + test/ with label CSVs)."""
    from drray.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("eyepacs")
    synthesize(out, 40, style="eyepacs", seed=3, test_n=10, workers=2)
    return out


@pytest.fixture(scope="session")
def synthetic_messidor(tmp_path_factory) -> Path:
    from drray.data.synthetic import synthesize

    out = tmp_path_factory.mktemp("messidor2")
    synthesize(out, 20, style="messidor2", seed=4, workers=2)
    return out
