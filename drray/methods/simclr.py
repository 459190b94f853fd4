"""SimCLR (stage 1): two independently augmented views of each pool image, both through the
model in one forward pass (BatchNorm sees both), NT-Xent between them."""

from __future__ import annotations

from dataclasses import dataclass

from drray.config import PretrainConfig
from drray.config import to_dict as _to_dict
from drray.data.augment import SimCLRAugment
from drray.data.transforms import AugmentSpec
from drray.losses import nt_xent
from drray.methods.base import Step, Views

VIEW1, VIEW2 = "view1", "view2"


@dataclass(frozen=True)
class SimCLRViews(Views):
    """Two views of each pool image, each its own crop, flips, rotation, jitter, grey and blur."""

    spec: AugmentSpec

    def views(self, images, generator):
        view1, view2 = SimCLRAugment(self.spec)(images, generator)
        return {VIEW1: view1, VIEW2: view2}


@dataclass(frozen=True)
class SimCLR:
    augment: AugmentSpec
    temperature: float = 0.5
    gather: bool = True  # negatives from every worker (a gather whose backward is exact)
    unlabeled_views = None

    @classmethod
    def from_config(cls, section: PretrainConfig, size: int) -> SimCLR:
        return cls(AugmentSpec(size=size, **_to_dict(section.augment)), section.temperature,
                   section.gather_negatives)

    @property
    def train_views(self) -> SimCLRViews:
        return SimCLRViews(self.augment)

    def step(self, steps_done: int = 0) -> Step:
        import torch

        def simclr_step(model, batch):
            n = batch[VIEW1].shape[0]
            z = model(torch.cat([batch[VIEW1], batch[VIEW2]]))
            return nt_xent(z[:n], z[n:], self.temperature, gather=self.gather), n

        return simclr_step
