"""Optimisers (Adam, AdamW, SGD, LARS) and the learning-rate schedule as a pure function."""

from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used by
    SimCLR for large batches. Biases and normalisation parameters (1-D) are not adapted and get
    no weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(params, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        """One step for a group, in a few multi-tensor (foreach) kernels instead of ~10 small
        ones per parameter: a ResNet-50 has 161 parameters, so a Python loop over them issued
        ~1,600 kernel launches a step."""
        grads = [p.grad for p in params]
        matrices = [i for i, p in enumerate(params) if p.ndim > 1]
        if matrices:
            weights = [params[i] for i in matrices]
            decayed = torch._foreach_add([grads[i] for i in matrices], weights, alpha=group["weight_decay"])
            p_norm = torch.stack(torch._foreach_norm(weights))
            g_norm = torch.stack(torch._foreach_norm(decayed))
            trust = torch.where((p_norm > 0) & (g_norm > 0), group["trust_coefficient"] * p_norm / g_norm,
                                torch.ones_like(p_norm))
            torch._foreach_mul_(decayed, list(trust.unbind()))
            for i, g in zip(matrices, decayed, strict=True):
                grads[i] = g
        buffers = [self._momentum_buffer(p) for p in params]
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, grads)
        torch._foreach_add_(params, buffers, alpha=-group["lr"])

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: BatchNorm scales/shifts and biases (the 1-D parameters)
    get none, as the reference implementations of SimCLR, FixMatch and MixMatch do (decaying
    BatchNorm's scale towards 0 fights the normalisation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def build_optimizer(params, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                    nesterov: bool = False) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose adam, adamw, sgd or lars")


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "constant") -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up, then constant, cosine
    (to 0), or FixMatch's cos(7 pi k / 16 K) (to cos(7 pi / 16) = 0.2 of the base)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "fixmatch_cosine":
        return math.cos(7 * math.pi * min(step, total_steps) / (16 * max(1, total_steps)))
    raise ValueError(f"unknown schedule {schedule!r}: choose constant, cosine or fixmatch_cosine")


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, schedule: str):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule))
