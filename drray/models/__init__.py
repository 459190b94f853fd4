"""Models: torchvision backbones, SimCLR/classifier heads, strict checkpoint key maps.

Depends only on torch and torchvision.
"""

from drray.models.backbones import (
    BACKBONE_NAMES,
    SPECS,
    create_backbone,
    expected_weights_file,
    feature_dim,
    imagenet_backbone_state,
)
from drray.models.checkpoints import (
    CheckpointMismatch,
    backbone_state_from,
    load_strict,
    strip_ddp_prefix,
)
from drray.models.heads import Classifier, ClassifierHead, ProjectionHead, SimCLRNet

__all__ = [
    "BACKBONE_NAMES",
    "SPECS",
    "CheckpointMismatch",
    "Classifier",
    "ClassifierHead",
    "ProjectionHead",
    "SimCLRNet",
    "backbone_state_from",
    "create_backbone",
    "expected_weights_file",
    "feature_dim",
    "imagenet_backbone_state",
    "load_strict",
    "strip_ddp_prefix",
]
