"""'auto' worker and actor counts from the allocation, and how a worker's model meets its device
(SyncBatchNorm, channels_last): GPUs cannot exist here, so their counts are given as a
ClusterShape and the device as a stand-in runtime; the one real cluster is the test session's Ray."""

import dataclasses

import pytest
import torch

from drray.config import ClusterShare, ScalingConfig, load_config
from drray.data.transforms import AugmentSpec
from drray.distributed.scaling import (
    ClusterShape,
    cluster_shape,
    inference_actors,
    largest_divisor,
    training_workers,
)
from drray.engine.fit import FitPlan, for_device
from drray.engine.model import ModelSpec
from drray.methods import SimCLR
from tests.conftest import REPO

AUTO_GPU = ScalingConfig(num_workers="auto", use_gpu=True, cpus_per_worker=4)


def test_auto_is_one_worker_per_gpu_that_divides_the_batch():
    assert training_workers(AUTO_GPU, 512, "pretrain", ClusterShape(64, 8, 1)).num_workers == 8
    assert training_workers(AUTO_GPU, 36, "distill", ClusterShape(64, 8, 1)).num_workers == 6  # 36 % 8 != 0
    assert training_workers(AUTO_GPU, 48, "pretrain", ClusterShape(13, 8, 1)).num_workers == 3  # 3 x 4 CPUs + 0.5
    fixed = dataclasses.replace(AUTO_GPU, num_workers=2)
    assert training_workers(fixed, 512, "pretrain", ClusterShape(64, 8, 1)) is fixed  # a number is kept


def test_auto_without_gpus_is_one_worker_per_node():
    cpu = ScalingConfig(num_workers="auto", cpus_per_worker=8)
    assert training_workers(cpu, 64, "pretrain", ClusterShape(64, 0, 4)).num_workers == 4
    assert training_workers(cpu, 64, "pretrain", ClusterShape(16, 0, 1)).num_workers == 1


def test_auto_that_cannot_be_met_names_the_setting():
    with pytest.raises(ValueError, match=r"distill.scaling.num_workers is auto with use_gpu.*no GPU.*use_gpu=false"):
        training_workers(AUTO_GPU, 64, "distill", ClusterShape(16, 0, 1))
    with pytest.raises(ValueError, match=r"pretrain.scaling.cpus_per_worker"):
        training_workers(AUTO_GPU, 64, "pretrain", ClusterShape(2, 1, 1))
    with pytest.raises(ValueError, match=r"pseudolabel.concurrency is auto with use_gpu.*no GPU"):
        inference_actors("auto", 1, True, "pseudolabel", ClusterShape(16, 0, 1))


def test_auto_actors_per_gpu_or_per_free_cpu():
    assert inference_actors("auto", 2, True, "pseudolabel", ClusterShape(64, 8, 1)) == 8
    assert inference_actors("auto", 2, True, "pseudolabel", ClusterShape(9, 8, 1)) == 4  # 4 x 2 CPUs + 0.5 decode
    assert inference_actors("auto", 1, False, "evaluate", ClusterShape(4, 0, 1)) == 3
    assert inference_actors(2, 1, False, "evaluate", ClusterShape(4, 0, 1)) == 2


def test_a_shared_cluster_gives_each_job_its_part():
    shape = ClusterShape(64, 8, 2).share(ClusterShare(3))
    assert (shape.gpus, shape.nodes) == (2, 1) and shape.cpus == pytest.approx(64 / 3)
    assert [largest_divisor(32, n) for n in (1, 3, 5, 8, 40)] == [1, 2, 4, 8, 32]


@pytest.mark.ray
def test_the_running_clusters_shape(ray_session):
    shape = cluster_shape()
    assert (shape.cpus, shape.gpus, shape.nodes) == (4, 0, 1)  # the session's local Ray
    assert training_workers(ScalingConfig(num_workers="auto"), 8, "pretrain", shape).num_workers == 1


def test_paper_config_leaves_its_worker_and_actor_counts_to_the_allocation():
    cfg = load_config(REPO / "configs" / "paper.yaml")
    assert cfg.pretrain.scaling.num_workers == cfg.distill.scaling.num_workers == "auto"
    assert cfg.pseudolabel.concurrency == cfg.evaluate.concurrency == "auto"


class _Runtime:
    def __init__(self, device: str, world_size: int):
        self.device, self.world_size, self.rank = torch.device(device), world_size, 0


def _plan(**settings) -> FitPlan:
    spec = ModelSpec("simclr", "resnet18", 32, proj_hidden=16, proj_out=8)
    return FitPlan("pretrain", "/tmp/x", spec, SimCLR(AugmentSpec(32)), 1, 8, 1, load_config(REPO / "configs" / "ci.yaml").pretrain.optim,
                   **settings)


def _batchnorms(model: torch.nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def test_several_cuda_workers_share_batchnorm_statistics_with_the_plain_models_keys():
    plan = _plan()
    plain = plan.spec.build()
    synced = for_device(plan.spec.build(), plan, _Runtime("cuda", 2))  # the conversion itself needs no GPU
    assert _batchnorms(synced) == {torch.nn.SyncBatchNorm}
    assert synced.state_dict().keys() == plain.state_dict().keys()  # checkpoints load into the plain model
    unsynced = {torch.nn.BatchNorm2d, torch.nn.BatchNorm1d}  # the backbone's and the projection's
    assert _batchnorms(plain) == unsynced
    assert _batchnorms(for_device(plan.spec.build(), plan, _Runtime("cuda", 1))) == unsynced
    assert _batchnorms(for_device(plan.spec.build(), plan, _Runtime("cpu", 2))) == unsynced  # torch: GPUs only
    off = _plan(sync_batchnorm=False)
    assert _batchnorms(for_device(off.spec.build(), off, _Runtime("cuda", 2))) == unsynced


def test_channels_last_is_the_models_layout():
    plan = _plan(channels_last=True)
    conv = next(m for m in for_device(plan.spec.build(), plan, _Runtime("cpu", 1)).modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.ray
def test_inference_auto_concurrency_takes_the_running_clusters_cpus(ray_session):
    from drray.config import ClusterShare, InferenceConfig
    from drray.distributed.inference import Inference

    assert Inference.of(InferenceConfig(concurrency="auto"), "pseudolabel").concurrency == 3  # 4 CPUs - 0.5 reads
    assert Inference.of(InferenceConfig(concurrency="auto"), "pseudolabel", share=ClusterShare(2)).concurrency == 1
    # a trial whose own process holds 1 of its 2 CPUs: no room left for an actor and the reads
    with pytest.raises(ValueError, match="do not fit the 1 CPUs"):
        Inference.of(InferenceConfig(concurrency="auto"), "pseudolabel", share=ClusterShare(2, 1.0))
    assert Inference.of(InferenceConfig(concurrency=2), "evaluate").concurrency == 2
