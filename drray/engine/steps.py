"""Step functions: what distinguishes one stage's training from another's."""

from __future__ import annotations

import torch

from drray.losses import (
    binary_cross_entropy,
    fixmatch_unlabeled_loss,
    linear_rampup,
    mixmatch_losses,
    mixup_weights,
    nt_xent,
    sharpen,
)


def simclr_step(temperature: float, gather: bool):
    """SimCLR: both views in one forward pass (BatchNorm sees both), NT-Xent between them."""

    def step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        n = batch["view1"].shape[0]
        z = model(torch.cat([batch["view1"], batch["view2"]]))
        return nt_xent(z[:n], z[n:], temperature, gather=gather), n

    return step


def classify_step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Binary classification on ``target`` (hard 0/1 labels or soft pseudo-label probabilities)."""
    logits = model(batch["image"])
    return binary_cross_entropy(logits, batch["target"]), logits.shape[0]


def fixmatch_step(threshold: float, lambda_u: float):
    """FixMatch: BCE on the labeled batch + lambda_u x the strong views' BCE against the weak
    views' confident hard labels. One forward over labeled, weak and strong images together,
    so BatchNorm sees the whole step's batch (what the reference's interleaving achieves)."""

    def step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        x, weak, strong = batch["image"], batch["u_weak"], batch["u_strong"]
        n, m = x.shape[0], weak.shape[0]
        logits = model(torch.cat([x, weak, strong]))
        supervised = binary_cross_entropy(logits[:n], batch["target"])
        return supervised + lambda_u * fixmatch_unlabeled_loss(logits[n + m:], logits[n:n + m], threshold), n

    return step


def mixmatch_step(temperature: float, alpha: float, lambda_u: float, rampup_steps: int, steps_done: int = 0):
    """MixMatch: guess each unlabeled image's label as the sharpened mean prediction over its K
    weak views (no gradient), MixUp every labeled and unlabeled image with a random partner from
    the whole step's batch (lambda' = max(lambda, 1 - lambda) per image), then BCE on the mixed
    labeled part + lambda_u x ramp x MSE on the mixed unlabeled part, in one forward (BatchNorm
    sees the whole mixed batch). ``steps_done`` continues the ramp after a resume."""
    state = {"step": steps_done}

    def step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        x, y = batch["image"], batch["target"].float()
        views = [batch[k] for k in sorted(batch) if k.startswith("u_view")]
        n, m = x.shape[0], views[0].shape[0]
        with torch.no_grad():
            mean = torch.sigmoid(model(torch.cat(views)).float()).view(len(views), m).mean(0)
            guessed = sharpen(mean, temperature)
        inputs = torch.cat([x, *views])
        targets = torch.cat([y, *([guessed] * len(views))])
        lam = mixup_weights(inputs.shape[0], alpha).to(inputs.device)
        partner = torch.randperm(inputs.shape[0], device=inputs.device)
        weight = lam.view(-1, 1, 1, 1).to(inputs.dtype)
        logits = model(weight * inputs + (1 - weight) * inputs[partner])
        mixed = lam * targets + (1 - lam) * targets[partner]
        lx, lu = mixmatch_losses(logits[:n], mixed[:n], logits[n:], mixed[n:])
        ramp = linear_rampup(state["step"], rampup_steps)
        state["step"] += 1
        return lx + lambda_u * ramp * lu, n

    return step
