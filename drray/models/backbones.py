"""torchvision backbones that map images (B, 3, H, W) to pooled features (B, D).

No weights are ever downloaded: ImageNet init reads a local torchvision state-dict file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from drray.models.checkpoints import load_strict, strip_ddp_prefix

INITS = ("random", "imagenet")


@dataclass(frozen=True)
class BackboneSpec:
    dim: int  # width of the pooled features
    classifier: str  # attribute replaced by Identity
    drop: tuple[str, ...]  # ImageNet checkpoint key prefixes that are not part of the backbone
    weights: str  # torchvision weights enum, only to name the expected file
    kwargs: dict[str, Any] = field(default_factory=dict)


_RESNET = {"classifier": "fc", "drop": ("fc.",)}
_DENSENET = {"classifier": "classifier", "drop": ("classifier.",)}

SPECS: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(512, weights="ResNet18_Weights.IMAGENET1K_V1", **_RESNET),
    "resnet50": BackboneSpec(2048, weights="ResNet50_Weights.IMAGENET1K_V2", **_RESNET),
    "densenet121": BackboneSpec(1024, weights="DenseNet121_Weights.IMAGENET1K_V1", **_DENSENET),
    "densenet161": BackboneSpec(2208, weights="DenseNet161_Weights.IMAGENET1K_V1", **_DENSENET),
    "inception_v3": BackboneSpec(
        2048,
        classifier="fc",
        drop=("fc.", "AuxLogits."),
        weights="Inception_V3_Weights.IMAGENET1K_V1",
        # Inputs are normalised by our own transforms; aux logits only matter for ImageNet.
        kwargs={"aux_logits": False, "init_weights": True, "transform_input": False},
    ),
}
BACKBONE_NAMES: tuple[str, ...] = tuple(SPECS)

# Old densenet checkpoints name layers 'norm.1', 'conv.2', ...; torchvision renames them 'norm1'.
_OLD_DENSE = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def spec(name: str) -> BackboneSpec:
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONE_NAMES)}")
    return SPECS[name]


def feature_dim(name: str) -> int:
    return spec(name).dim


def expected_weights_file(name: str) -> str:
    """File name of torchvision's ImageNet weights for ``name`` (read from the URL, no download)."""
    return torchvision.models.get_weight(spec(name).weights).url.rsplit("/", 1)[-1]


def imagenet_backbone_state(name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Key map: torchvision ImageNet state dict -> backbone state dict (classifier dropped)."""
    drop = spec(name).drop
    out = {}
    for key, value in strip_ddp_prefix(state_dict).items():
        if key.startswith(drop):
            continue
        match = _OLD_DENSE.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _missing_weights(name: str, weights: str | os.PathLike | None) -> FileNotFoundError:
    fname = expected_weights_file(name)
    where = "no weights path was given" if weights is None else f"{weights} does not exist"
    return FileNotFoundError(
        f"ImageNet init for {name}: {where}. Nothing can be downloaded here (no internet): "
        f"copy torchvision's {spec(name).weights} file '{fname}' onto this machine "
        f"(a machine that has used it keeps it in ~/.cache/torch/hub/checkpoints/{fname}) "
        "and set the backbone weights path to that file."
    )


def _load_imagenet(model: nn.Module, name: str, weights: str | os.PathLike | None) -> None:
    if weights is None or not Path(weights).is_file():
        raise _missing_weights(name, weights)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    load_strict(model, imagenet_backbone_state(name, state), str(weights))


def create_backbone(
    name: str, init: str = "random", weights: str | os.PathLike | None = None
) -> nn.Module:
    """A torchvision model with its classifier replaced by Identity: (B,3,H,W) -> (B, dim)."""
    s = spec(name)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    model = getattr(torchvision.models, name)(weights=None, **s.kwargs)
    setattr(model, s.classifier, nn.Identity())
    if init == "imagenet":
        _load_imagenet(model, name, weights)
    return model
