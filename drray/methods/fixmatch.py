"""FixMatch (Sohn et al. 2020) in binary sigmoid form: BCE on the labeled batch + lambda_u x the
strong views' BCE against the weak views' confident hard labels (max(p, 1-p) >= threshold),
optionally with the weak guesses distribution-aligned to the labeled prior (ReMixMatch's). One
forward over labeled, weak and strong images together, so BatchNorm sees the whole step's batch
(what the reference's interleaving achieves)."""

from __future__ import annotations

from dataclasses import dataclass

from drray.config import FixMatchConfig
from drray.data.augment import StrongAugment, WeakAugment
from drray.losses import (
    binary_cross_entropy,
    fixmatch_targets,
    fixmatch_unlabeled_loss,
)
from drray.methods.base import (
    IMAGE,
    TARGET,
    U_IMAGE,
    Step,
    Views,
    WeakImage,
    distribution_aligner,
    unlabeled_weight,
)

U_WEAK, U_STRONG = "u_weak", "u_strong"


@dataclass(frozen=True)
class FixMatchViews(Views):
    """Each unlabeled image: a weak view, and a strong one (weak + RandAugment + Cutout)."""

    randaugment_ops: int = 2
    cutout: float = 0.5
    source = U_IMAGE

    def views(self, images, generator):
        return {U_WEAK: WeakAugment()(images, generator),
                U_STRONG: StrongAugment(self.randaugment_ops, self.cutout)(images, generator)}


def pseudo_label_stats(targets, mask) -> dict:
    """Per epoch in metrics.jsonl: ``mask_rate``, the share of unlabeled images confident enough
    to train on (near 0, FixMatch learns from the labels alone); ``masked_positive_rate``, the
    share of those labelled referable (near 0 or 1: the pseudo-labels collapsed to one class);
    ``guess_positive_rate``, the share of all weak guesses >= 0.5 (against the labeled prior: how
    far the guesses' class balance has drifted)."""
    kept = mask.sum()
    return {"mask_rate": mask.mean(), "masked_positive_rate": (targets * mask).sum() / kept.clamp(min=1),
            "guess_positive_rate": targets.mean()}


@dataclass(frozen=True)
class FixMatch:
    threshold: float = 0.95
    lambda_u: float = 1.0
    randaugment_ops: int = 2
    cutout: float = 0.5
    prior: float | None = None  # align the weak guesses to this positive share (None: as published)
    rampup_steps: int = 0  # lambda_u ramps up linearly over these steps (0: as published)
    train_views = WeakImage()

    @classmethod
    def from_config(cls, section: FixMatchConfig, steps_per_epoch: int, labeled_prior: float) -> FixMatch:
        prior = labeled_prior if section.distribution_alignment else None
        return cls(section.threshold, section.lambda_u, section.randaugment_ops, section.cutout, prior,
                   section.rampup_epochs * steps_per_epoch)

    @property
    def unlabeled_views(self) -> FixMatchViews:
        return FixMatchViews(self.randaugment_ops, self.cutout)

    def step(self, steps_done: int = 0) -> Step:
        """``steps_done`` continues the ramp after a resume."""
        import torch

        align = distribution_aligner(self.prior)
        u_weight = unlabeled_weight(self.lambda_u, self.rampup_steps, steps_done)

        def fixmatch_step(model, batch):
            x, weak, strong = batch[IMAGE], batch[U_WEAK], batch[U_STRONG]
            n, m = x.shape[0], weak.shape[0]
            logits = model(torch.cat([x, weak, strong]))
            supervised = binary_cross_entropy(logits[:n], batch[TARGET])
            targets, mask = fixmatch_targets(align(torch.sigmoid(logits[n:n + m].detach().float())), self.threshold)
            unlabeled = fixmatch_unlabeled_loss(logits[n + m:], targets, mask)
            return supervised + u_weight() * unlabeled, n, pseudo_label_stats(targets, mask)

        return fixmatch_step
