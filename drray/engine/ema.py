"""An exponential moving average of a model's weights: the evaluation model of the FixMatch and
MixMatch baselines (decay 0.999 in both papers)."""

from __future__ import annotations

import copy

import torch

from drray.engine.model import unwrap


class EMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step; buffers
    (BatchNorm running statistics) are copied, as in the reference implementations."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        source = unwrap(model)
        for averaged, current in zip(self.model.parameters(), source.parameters(), strict=True):
            averaged.mul_(self.decay).add_(current.detach(), alpha=1.0 - self.decay)
        for averaged, current in zip(self.model.buffers(), source.buffers(), strict=True):
            averaged.copy_(current)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
