"""Is SimCLR learning useful features? A weighted kNN probe (Wu et al. 2018, the monitor SimCLR
and solo-learn print): the frozen backbone's features of the budget's labeled images vote, by
cosine similarity, on each validation image; the AUC of those votes is what a linear classifier
on these features could roughly reach. It trains nothing and changes no weight."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from drray.engine.loop import autocast, to_device

# Train images per validation image's vote, and the temperature of the similarity weights: the
# values of Wu et al. (k 200 for ImageNet; a labeled budget holds tens to thousands of images).
NEIGHBOURS, TEMPERATURE = 20, 0.07


@torch.no_grad()
def features(backbone: torch.nn.Module, batches: Iterable[dict], device, dtype,
             channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised penultimate features and targets of every batch, in eval mode."""
    was_training = backbone.training
    backbone.eval()
    feats, targets = [], []
    try:
        for batch in batches:
            x = to_device({"image": batch["image"]}, device, channels_last)["image"]
            with autocast(device, dtype):
                f = backbone(x).float()
            feats.append(torch.nn.functional.normalize(f, dim=1).cpu().numpy())
            targets.append(np.asarray(batch["target"], np.float32))
    finally:
        backbone.train(was_training)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
    return np.concatenate(feats), np.concatenate(targets)


def knn_scores(train: np.ndarray, train_targets: np.ndarray, query: np.ndarray,
               k: int = NEIGHBOURS, temperature: float = TEMPERATURE) -> np.ndarray:
    """Each query's share of positive votes among its k most similar train features, weighted
    by exp(similarity / temperature) (features L2-normalised: similarity = dot product)."""
    k = min(k, len(train))
    similarity = query @ train.T
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    votes = train_targets[nearest]
    return (weights * votes).sum(axis=1) / weights.sum(axis=1)


def knn_auc(backbone: torch.nn.Module, train_batches: Iterable[dict], val_batches: Iterable[dict], device,
            dtype, channels_last: bool = False) -> float | None:
    """The probe's validation AUC (None when either side has a single class)."""
    from sklearn.metrics import roc_auc_score

    train, train_y = features(backbone, train_batches, device, dtype, channels_last)
    val, val_y = features(backbone, val_batches, device, dtype, channels_last)
    if len(np.unique(train_y)) < 2 or len(np.unique(val_y)) < 2:
        return None
    return float(roc_auc_score(val_y, knn_scores(train, train_y, val)))
