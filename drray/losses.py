"""Losses for the SimCLR and classifier stages: pure torch, tested on CPU.

Gradient argument for the cross-process NT-Xent: rank r's loss L_r uses its local z_r as anchors
and every rank's z as candidates, so d(sum_s L_s)/dz_r needs the candidate gradients that every
rank computed for z_r. `GatherWithGrad.backward` all_reduce(SUM)s the gathered-tensor gradient and
keeps rank r's slice; with the direct (anchor) path this gives z_r the gradient of sum_s L_s.
DDP then averages parameter gradients over W ranks, which yields d/dθ of mean_s L_s, i.e. exactly
the gradient of the single-process loss on the concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


class GatherWithGrad(torch.autograd.Function):
    """all_gather that lets gradients flow back to the rank that produced each slice."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        ctx.rows = z.shape[0]
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank holds a gradient for all W slices (its loss saw them all as candidates);
        # summing them gives this rank's z its gradient from every rank's loss.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def nt_xent(z1: Tensor, z2: Tensor, temperature: float, gather: bool = False) -> Tensor:
    """SimCLR's NT-Xent: mean over the 2N local anchors of the cross entropy of finding the
    other view of the same image among all other candidates.

    With `gather` and a process group of W > 1 ranks, the candidates are the 2N*W projections of
    all ranks (more negatives per step). Every rank must then pass the same N; the mean over ranks
    equals the loss on the concatenated global batch. Without a group it is the local loss.
    Computed in float32 with autocast off, since bf16 logits / small temperatures lose precision.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        rank, world = _world() if gather else (0, 1)
        candidates = GatherWithGrad.apply(z) if world > 1 else z
        logits = z @ candidates.T / temperature
        # Local anchor i sits at global column offset + i; its positive is the other view's row.
        offset = rank * 2 * n
        local = torch.arange(2 * n, device=z.device)
        logits[local, offset + local] = float("-inf")
        positives = offset + (local + n) % (2 * n)
        return F.cross_entropy(logits, positives)


def binary_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE-with-logits in float32; targets may be soft labels in [0, 1] (pseudo-labels)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


# --- semi-supervised baselines (binary, sigmoid forms) -----------------------------------------


def fixmatch_targets(weak_p: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """FixMatch's pseudo-labels from the weak view's probability p: target 1[p >= 0.5], kept
    where the model is confident, max(p, 1 - p) >= threshold. No gradient flows through them."""
    p = weak_p.detach().float()
    return (p >= 0.5).float(), (torch.maximum(p, 1 - p) >= threshold).float()


def fixmatch_unlabeled_loss(strong_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """BCE of the strong view against the weak view's confident hard labels (``fixmatch_targets``),
    averaged over ALL unlabeled images (masked ones count as zero), as in Sohn et al. (2020), eq. 4."""
    per_image = F.binary_cross_entropy_with_logits(strong_logits.float(), targets, reduction="none")
    return (per_image * mask).mean()


def align_distribution(p: Tensor, prior: float, model_mean: Tensor | float) -> Tensor:
    """ReMixMatch's distribution alignment (Berthelot et al. 2020, eq. 1) for a binary probability:
    each class's probability scaled by prior / the model's running mean prediction on unlabeled
    images, then renormalised. With a 20% referable prior a young model's guesses all fall below
    0.5; alignment lifts them where the model under-predicts the class, so pseudo-labels keep the
    labeled set's class balance on average instead of collapsing to the majority class."""
    eps = 1e-6
    mean = torch.as_tensor(model_mean, dtype=p.dtype, device=p.device).clamp(eps, 1 - eps)
    prior_t = torch.as_tensor(prior, dtype=p.dtype, device=p.device).clamp(eps, 1 - eps)
    positive, negative = p * (prior_t / mean), (1 - p) * ((1 - prior_t) / (1 - mean))
    return positive / (positive + negative)


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """MixMatch's sharpening for a binary probability: p^(1/T) / (p^(1/T) + (1 - p)^(1/T))."""
    a, b = p.pow(1 / temperature), (1 - p).pow(1 / temperature)
    return a / (a + b)


def mixup_weights(n: int, alpha: float) -> Tensor:
    """Per-example MixUp weights lambda' = max(lambda, 1 - lambda), lambda ~ Beta(alpha, alpha)
    (torch's global generator, seeded per worker): the mixed example stays closer to its first
    input (MixMatch, eq. 9)."""
    lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((n,))
    return torch.maximum(lam, 1 - lam)


def linear_rampup(step: int, rampup_steps: int) -> float:
    """MixMatch's unlabeled-loss weight schedule: 0 -> 1 linearly over ``rampup_steps``."""
    return 1.0 if rampup_steps <= 0 else min(1.0, max(0.0, step / rampup_steps))


def mixmatch_losses(labeled_logits: Tensor, labeled_targets: Tensor, unlabeled_logits: Tensor,
                    unlabeled_targets: Tensor) -> tuple[Tensor, Tensor]:
    """(L_x, L_u): BCE on the mixed labeled batch (soft targets) and the squared error between
    the mixed unlabeled batch's probabilities and its mixed guessed labels (MixMatch, eqs. 3-5)."""
    lx = F.binary_cross_entropy_with_logits(labeled_logits.float(), labeled_targets.float())
    lu = F.mse_loss(torch.sigmoid(unlabeled_logits.float()), unlabeled_targets.float())
    return lx, lu


def sigmoid_logit(p: Tensor) -> Tensor:
    """The logit whose sigmoid is ``p`` (for tests and for turning probabilities into logits)."""
    return torch.log(p) - torch.log1p(-p)
