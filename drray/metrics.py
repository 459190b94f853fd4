"""Metrics on arrays: pure functions that CPU tests check against references."""

from __future__ import annotations

import numpy as np


def colour_histograms(images: list[np.ndarray], bins: int = 32) -> np.ndarray:
    """Per-channel colour histograms (normalised), one row per HxWx3 uint8 image."""
    rows = []
    for img in images:
        hist = [np.histogram(img[..., c], bins=bins, range=(0, 256))[0] for c in range(3)]
        rows.append(np.concatenate(hist) / img[..., 0].size)
    return np.asarray(rows)


def cross_validated_auc(features: np.ndarray, targets: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """ROC AUC of a standardised logistic regression, out of fold: how separable are targets?"""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, features, targets, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(targets, scores))
