"""Heads and the two networks built from a backbone: SimCLRNet (pretraining) and Classifier.

Attribute names (``backbone``, ``projection``, ``head``) define checkpoint keys: keep them.
"""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Sequential):
    """SimCLR's MLP g(.): Linear -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class ClassifierHead(nn.Sequential):
    """One referable-DR logit, (B, D) -> (B,); train with BCEWithLogitsLoss."""

    def __init__(self, in_dim: int, hidden_dim: int | None = None, dropout: float = 0.0):
        if hidden_dim is None:
            # dropout on the features (the student's optional noise); Dropout(0) is the identity
            # and holds no weights, so the checkpoint keys are the same with or without it
            layers: list[nn.Module] = [nn.Dropout(dropout), nn.Linear(in_dim, 1)]
        else:
            layers = [
                nn.Linear(in_dim, hidden_dim),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden_dim, 1),
            ]
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(-1)


class SimCLRNet(nn.Module):
    """z = projection(backbone(x)); the contrastive loss is computed on z."""

    def __init__(self, backbone: nn.Module, projection: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(x))


class Classifier(nn.Module):
    """Backbone + ClassifierHead: logits (B,); probabilities via sigmoid."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled backbone) features (B, D), e.g. for t-SNE."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """P(referable) per image; call under torch.no_grad() and eval() at inference."""
        return torch.sigmoid(self(x))
