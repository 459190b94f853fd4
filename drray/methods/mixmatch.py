"""MixMatch (Berthelot et al. 2019) in binary form: each unlabeled image's label is guessed as
the sharpened mean prediction over its K weak views (no gradient; optionally aligned to the
labeled prior first, ReMixMatch's distribution alignment); every labeled and unlabeled
image is mixed with a random partner from the whole step's batch (MixUp, lambda' = max(lambda,
1 - lambda) per image); the loss is BCE on the mixed labeled part + lambda_u x ramp x MSE on the
mixed unlabeled part, in one forward (BatchNorm sees the whole mixed batch)."""

from __future__ import annotations

from dataclasses import dataclass

from drray.config import MixMatchConfig
from drray.data.augment import WeakAugment
from drray.losses import mixmatch_losses, mixup_weights, sharpen
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


def view_key(k: int) -> str:
    return f"u_view{k}"


@dataclass(frozen=True)
class MixMatchViews(Views):
    """K weak views of each unlabeled image."""

    k: int = 2
    source = U_IMAGE

    def views(self, images, generator):
        return {view_key(i): WeakAugment()(images, generator) for i in range(self.k)}


@dataclass(frozen=True)
class MixMatch:
    temperature: float = 0.5
    alpha: float = 0.75
    lambda_u: float = 75.0
    rampup_steps: int = 0  # the unlabeled weight ramps up linearly over these steps
    views: int = 2  # K
    prior: float | None = None  # align the mean guess to this positive share before sharpening (None: as published)
    train_views = WeakImage()

    @classmethod
    def from_config(cls, section: MixMatchConfig, steps_per_epoch: int, labeled_prior: float) -> MixMatch:
        prior = labeled_prior if section.distribution_alignment else None
        return cls(section.temperature, section.alpha, section.lambda_u,
                   section.rampup_epochs * steps_per_epoch, section.augmentations, prior)

    @property
    def unlabeled_views(self) -> MixMatchViews:
        return MixMatchViews(self.views)

    def step(self, steps_done: int = 0) -> Step:
        """``steps_done`` continues the ramp after a resume."""
        import torch

        keys = [view_key(k) for k in range(self.views)]
        align = distribution_aligner(self.prior)
        u_weight = unlabeled_weight(self.lambda_u, self.rampup_steps, steps_done)

        def mixmatch_step(model, batch):
            x, y = batch[IMAGE], batch[TARGET].float()
            views = [batch[k] for k in keys]
            n, m = x.shape[0], views[0].shape[0]
            with torch.no_grad():
                mean = torch.sigmoid(model(torch.cat(views)).float()).view(len(views), m).mean(0)
                guessed = sharpen(align(mean), self.temperature)  # ReMixMatch: align, then sharpen
            inputs = torch.cat([x, *views])
            targets = torch.cat([y, *([guessed] * len(views))])
            lam = mixup_weights(inputs.shape[0], self.alpha).to(inputs.device)
            partner = torch.randperm(inputs.shape[0], device=inputs.device)
            weight = lam.view(-1, 1, 1, 1).to(inputs.dtype)
            logits = model(weight * inputs + (1 - weight) * inputs[partner])
            mixed = lam * targets + (1 - lam) * targets[partner]
            lx, lu = mixmatch_losses(logits[:n], mixed[:n], logits[n:], mixed[n:])
            stats = {"guess_positive_rate": (guessed >= 0.5).float().mean(),  # the guesses' class balance
                     "guess_confidence": torch.maximum(guessed, 1 - guessed).mean()}
            return lx + u_weight() * lu, n, stats

        return mixmatch_step
