"""The semi-supervised baselines' pieces on hand-computed cases: FixMatch's mask and targets,
MixMatch's sharpening, mixing weights, loss ramp and losses, and the EMA update."""

from __future__ import annotations

import math

import pytest
import torch

from drray.engine.ema import EMA
from drray.losses import (
    align_distribution,
    fixmatch_targets,
    fixmatch_unlabeled_loss,
    linear_rampup,
    mixmatch_losses,
    mixup_weights,
    sharpen,
    sigmoid_logit,
)


def test_fixmatch_keeps_confident_positives_and_negatives_only():
    # p = 0.99 (confident positive), 0.01 (confident negative), 0.6 and 0.3 (uncertain), 0.95 (at tau)
    p = torch.tensor([0.99, 0.01, 0.6, 0.3, 0.95])
    targets, mask = fixmatch_targets(p, threshold=0.95)
    assert targets.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert mask.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_fixmatch_loss_averages_over_every_unlabeled_image():
    targets, mask = fixmatch_targets(torch.tensor([0.99, 0.01, 0.6, 0.3]), 0.95)
    strong = sigmoid_logit(torch.tensor([0.8, 0.4, 0.9, 0.9]))
    # confident: image 0 (target 1, q 0.8) and image 1 (target 0, q 0.4); the others are masked
    expected = (-math.log(0.8) - math.log(1 - 0.4)) / 4
    assert fixmatch_unlabeled_loss(strong, targets, mask).item() == pytest.approx(expected, rel=1e-5)


def test_fixmatch_targets_carry_no_gradient():
    weak = torch.tensor([4.0, -4.0], requires_grad=True)
    strong = torch.tensor([1.0, -1.0], requires_grad=True)
    fixmatch_unlabeled_loss(strong, *fixmatch_targets(torch.sigmoid(weak), 0.9)).backward()
    assert weak.grad is None and strong.grad is not None


def test_distribution_alignment_by_hand():
    # prior 0.2, the model's mean 0.05: positives scaled by 4, negatives by 0.8 / 0.95
    p = torch.tensor([0.05, 0.5, 0.0, 1.0])
    out = align_distribution(p, 0.2, 0.05)
    a, b = 0.05 * 4, 0.95 * (0.8 / 0.95)
    assert out[0].item() == pytest.approx(a / (a + b), rel=1e-6)  # 0.2: the mean guess lands on the prior
    assert out[1].item() == pytest.approx(4 / (4 + 0.8 / 0.95), rel=1e-6)
    assert out[2].item() == 0.0 and out[3].item() == 1.0  # certainty stays certain
    assert torch.equal(align_distribution(p, 0.3, 0.3), p)  # a model already at the prior: unchanged


def test_sharpening_by_hand():
    p = torch.tensor([0.5, 0.8, 0.2, 1.0, 0.0])
    out = sharpen(p, 0.5)
    assert out[0].item() == pytest.approx(0.5)
    assert out[1].item() == pytest.approx(0.64 / (0.64 + 0.04))  # 0.8^2 / (0.8^2 + 0.2^2) = 0.941
    assert out[2].item() == pytest.approx(0.04 / (0.04 + 0.64))
    assert out[3:].tolist() == [1.0, 0.0]


def test_mixup_weights_lean_to_the_first_input():
    torch.manual_seed(0)
    lam = mixup_weights(10_000, alpha=0.75)
    assert lam.min().item() >= 0.5 and lam.max().item() <= 1.0
    # E[max(L, 1-L)] for L ~ Beta(0.75, 0.75) is 0.5 + E|L - 0.5| ~ 0.78 (numerically)
    assert lam.mean().item() == pytest.approx(0.78, abs=0.01)
    torch.manual_seed(0)
    assert not torch.equal(mixup_weights(5, 0.75), mixup_weights(5, 0.75))  # a fresh draw per call
    torch.manual_seed(1)
    again = mixup_weights(5, 0.75)
    torch.manual_seed(1)
    assert torch.equal(again, mixup_weights(5, 0.75))  # seeded by torch's generator


def test_unlabeled_weight_ramps_linearly():
    assert [linear_rampup(s, 100) for s in (0, 25, 100, 250)] == [0.0, 0.25, 1.0, 1.0]
    assert linear_rampup(0, 0) == 1.0


def test_mixmatch_losses_by_hand():
    lx, lu = mixmatch_losses(sigmoid_logit(torch.tensor([0.7])), torch.tensor([0.6]),
                             sigmoid_logit(torch.tensor([0.9, 0.2])), torch.tensor([1.0, 0.5]))
    assert lx.item() == pytest.approx(-(0.6 * math.log(0.7) + 0.4 * math.log(0.3)), rel=1e-5)
    assert lu.item() == pytest.approx((0.1 ** 2 + 0.3 ** 2) / 2, rel=1e-5)


def test_ema_update_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(5.0)
        model[1].running_var.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    assert ema.model[0].weight.item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    # BatchNorm's statistics are averaged like the weights (from 0 and 1 at the start), its
    # batch count is copied
    assert ema.model[1].running_mean.item() == pytest.approx(0.9 * 0.0 + 0.1 * 5.0)
    assert ema.model[1].running_var.item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    assert ema.model[1].num_batches_tracked.item() == 7
    ema.update(model)
    assert ema.model[0].weight.item() == pytest.approx(0.9 * 1.2 + 0.1 * 3.0)
    assert ema.model[1].running_mean.item() == pytest.approx(0.9 * 0.5 + 0.1 * 5.0)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_weak_and_strong_views():
    from drray.data.augment import GREY, StrongAugment, WeakAugment, cutout

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8, generator=g)
    image[image == 127] = 128  # so that 127 marks Cutout's square
    images = image.expand(20, 3, 32, 32)
    weak = WeakAugment()(images, g)
    assert weak.shape == images.shape and weak.dtype == torch.float32
    assert any(not torch.equal(w, image / 255) for w in weak)
    # a weak view only moves pixels (flip + translation, zero fill): no new values appear
    assert set((weak * 255).round().unique().tolist()) <= set(image.unique().tolist()) | {0}
    strong = StrongAugment()(images, g)
    assert strong.shape == images.shape and strong.dtype == torch.float32
    grey = ((strong - GREY).abs() < 1e-6).all(dim=1)
    assert all(grey[i].any() for i in range(20))  # every strong view has its grey square
    assert len({s.numpy().tobytes() for s in strong}) == 20  # fresh random draws per image
    square = cutout(torch.zeros(2, 3, 32, 32), side=torch.tensor([0.5, 0.5]), centre=torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    side_pixels = (square == GREY).all(dim=1).sum((1, 2)).tolist()
    assert side_pixels == [16 * 16, 8 * 8]  # whole in the middle, clipped at a corner
