"""Backbones, heads and strict checkpoint key maps, on tiny CPU inputs."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

from drray.models import (
    BACKBONE_NAMES,
    CheckpointMismatch,
    Classifier,
    ClassifierHead,
    ProjectionHead,
    SimCLRNet,
    backbone_state_from,
    create_backbone,
    expected_weights_file,
    feature_dim,
    load_strict,
)

torch.set_num_threads(2)

EXPECTED_DIMS = {
    "resnet18": 512,
    "resnet50": 2048,
    "densenet121": 1024,
    "densenet161": 2208,
    "inception_v3": 2048,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_backbone_forward_shape(name):
    torch.manual_seed(0)
    model = create_backbone(name).eval()
    size = 80 if name == "inception_v3" else 64  # inception needs >= 75 px
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert feature_dim(name) == EXPECTED_DIMS[name]
    assert out.shape == (2, EXPECTED_DIMS[name])


def test_registry_covers_required_backbones():
    assert set(EXPECTED_DIMS) <= set(BACKBONE_NAMES)


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match="resnet50.*densenet121"):
        create_backbone("vgg16")
    with pytest.raises(ValueError, match="inception_v3"):
        feature_dim("vgg16")


def test_bad_init_value():
    with pytest.raises(ValueError, match="random.*imagenet"):
        create_backbone("resnet18", init="simclr")


def _perturbed(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_imagenet_init_resnet18_from_local_file(tmp_path):
    full = _perturbed(torchvision.models.resnet18(weights=None))
    path = tmp_path / expected_weights_file("resnet18")
    torch.save(full.state_dict(), path)  # with fc.* keys, like torchvision's file
    model = create_backbone("resnet18", "imagenet", path)
    assert torch.equal(model.conv1.weight, full.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, full.layer4[1].conv2.weight)
    assert isinstance(model.fc, nn.Identity)


def _old_densenet_keys(state: dict) -> dict:
    """Rewrite to the pre-0.4 layout: 'norm1' -> 'norm.1', no num_batches_tracked buffers."""
    old = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        old[re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)] = value
    return old


def test_imagenet_init_densenet121_old_style_keys(tmp_path):
    full = _perturbed(torchvision.models.densenet121(weights=None))
    old = _old_densenet_keys(full.state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet121-old.pth"
    torch.save(old, path)
    model = create_backbone("densenet121", "imagenet", str(path))
    layer = model.features.denseblock1.denselayer1
    ref = full.features.denseblock1.denselayer1
    assert torch.equal(layer.norm1.weight, ref.norm1.weight)
    assert torch.equal(layer.conv2.weight, ref.conv2.weight)
    assert isinstance(model.classifier, nn.Identity)


@pytest.mark.parametrize("weights", [None, "does/not/exist.pth"])
def test_imagenet_init_missing_file(weights):
    with pytest.raises(FileNotFoundError) as err:
        create_backbone("resnet50", "imagenet", weights)
    msg = str(err.value)
    assert "resnet50-11ad3fa6.pth" in msg
    assert "Nothing can be downloaded" in msg


def test_load_strict_wrong_architecture():
    small = create_backbone("resnet18").state_dict()
    big = create_backbone("resnet50")
    before = big.conv1.weight.clone()
    with pytest.raises(CheckpointMismatch) as err:
        load_strict(big, small, "ckpt/resnet18.pt")
    msg = str(err.value)
    assert "ckpt/resnet18.pt" in msg
    assert "missing (" in msg and "layer1.0.conv3.weight" in msg
    assert "shape (" in msg and "layer1.0.conv1.weight" in msg
    assert "another backbone" in msg
    assert torch.equal(big.conv1.weight, before)  # a failed load leaves the module untouched
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(\d+\): layer1\.0\.conv3"):
        load_strict(create_backbone("resnet18"), big.state_dict(), "ckpt/resnet50.pt")


def _simclr(seed: int) -> SimCLRNet:
    torch.manual_seed(seed)
    return SimCLRNet(create_backbone("resnet18"), ProjectionHead(512, 64, 16))


def _classifier(seed: int) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(create_backbone("resnet18"), ClassifierHead(512, 32))


def test_backbone_state_from_simclr_into_classifier():
    simclr, clf = _simclr(1), _classifier(2)
    state = backbone_state_from(simclr.state_dict())
    assert not any(k.startswith(("projection.", "backbone.")) for k in state)
    load_strict(clf.backbone, state, "simclr.pt")
    assert torch.equal(clf.backbone.conv1.weight, simclr.backbone.conv1.weight)


def test_backbone_state_from_ddp_prefix():
    simclr, clf = _simclr(1), _classifier(2)
    ddp = {f"module.{k}": v for k, v in simclr.state_dict().items()}
    load_strict(clf.backbone, backbone_state_from(ddp), "ddp.pt")
    assert torch.equal(clf.backbone.layer4[1].conv2.weight, simclr.backbone.layer4[1].conv2.weight)


def test_backbone_state_from_without_prefix_fails():
    bare = create_backbone("resnet18").state_dict()
    with pytest.raises(CheckpointMismatch, match=r"'backbone\.'.*conv1\.weight"):
        backbone_state_from(bare)


def test_heads_shapes():
    x = torch.randn(4, 512)
    assert ProjectionHead(512, 64, 16)(x).shape == (4, 16)
    assert ClassifierHead(512)(x).shape == (4,)
    head = ClassifierHead(512, hidden_dim=32, dropout=0.5)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head(x).shape == (4,)


def test_networks_forward():
    images = torch.randn(2, 3, 64, 64)
    simclr, clf = _simclr(0).eval(), _classifier(0).eval()
    with torch.no_grad():
        assert simclr(images).shape == (2, 16)
        assert clf(images).shape == (2,)
        assert clf.features(images).shape == (2, 512)
        proba = clf.predict_proba(images)
    assert proba.shape == (2,)
    assert ((proba >= 0) & (proba <= 1)).all()
    assert set(clf.state_dict()) >= {"backbone.conv1.weight", "head.0.weight"}


def test_imagenet_init_inception_drops_aux_logits(tmp_path):
    full = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    assert any(k.startswith("AuxLogits.") for k in full.state_dict())
    path = tmp_path / expected_weights_file("inception_v3")
    torch.save(full.state_dict(), path)
    model = create_backbone("inception_v3", "imagenet", path)
    assert torch.equal(model.Mixed_7c.branch1x1.conv.weight, full.Mixed_7c.branch1x1.conv.weight)
