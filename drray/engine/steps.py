"""Step functions: what distinguishes one stage's training from another's."""

from __future__ import annotations

import torch

from drray.losses import binary_cross_entropy, nt_xent


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
