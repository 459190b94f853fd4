"""What a model is, as data: a ModelSpec builds it, and is stored with every checkpoint so
that a checkpoint directory can be loaded without the config that made it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from drray.models.backbones import create_backbone, feature_dim
from drray.models.checkpoints import backbone_state_from, load_strict
from drray.models.heads import Classifier, ClassifierHead, ProjectionHead, SimCLRNet


@dataclass(frozen=True)
class ModelSpec:
    kind: Literal["simclr", "classifier"]
    backbone: str
    image_size: int
    init: str = "random"
    weights: str | None = None  # local ImageNet weights file when init=imagenet
    proj_hidden: int = 2048
    proj_out: int = 128
    head_hidden: int | None = None
    dropout: float = 0.0

    def build(self, pretrained: bool = True) -> torch.nn.Module:
        """The model; ``pretrained=False`` skips ImageNet weights (a checkpoint follows)."""
        init = self.init if pretrained else "random"
        backbone = create_backbone(self.backbone, init, self.weights if pretrained else None)
        width = feature_dim(self.backbone)
        if self.kind == "simclr":
            return SimCLRNet(backbone, ProjectionHead(width, self.proj_hidden, self.proj_out))
        return Classifier(backbone, ClassifierHead(width, self.head_hidden, self.dropout))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return cls(**data)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (checkpoints never carry 'module.')."""
    return model.module if hasattr(model, "module") else model


def init_backbone_from(model: torch.nn.Module, checkpoint_dir: str | Path) -> None:
    """Start a classifier from another stage's checkpoint: its backbone only, loaded strictly
    through the explicit key map (``backbone.*`` kept, projection or head dropped)."""
    path = Path(checkpoint_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}: run the stage that produces it first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_strict(unwrap(model).backbone, backbone_state_from(state), str(path))
