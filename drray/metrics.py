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


# ---------------------------------------------------------------------------------------------
# Screening metrics: AUC with a bootstrap interval, operating points with Wilson intervals,
# DeLong's test
# ---------------------------------------------------------------------------------------------


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(targets, scores))


def _rank_auc(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of each row of ``scores`` (Mann-Whitney with mid-ranks for ties; targets per row),
    NaN where a row has one class only."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=-1)
    pos = targets.sum(axis=-1)
    neg = targets.shape[-1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * targets).sum(axis=-1) - pos * (pos + 1) / 2) / (pos * neg)


def bootstrap_auc_ci(targets: np.ndarray, scores: np.ndarray, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC: images resampled with replacement (seeded);
    resamples with a single class are drawn again, not counted."""
    targets, scores = np.asarray(targets, np.float64), np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    n, aucs = len(targets), []
    while len(aucs) < resamples:
        idx = rng.integers(0, n, size=(min(resamples, 500), n))
        batch = _rank_auc(targets[idx], scores[idx])
        aucs.extend(batch[~np.isnan(batch)][: resamples - len(aucs)])
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def threshold_at_sensitivity(targets: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity (score >= threshold counts as positive) reaches
    ``sensitivity`` on these images: chosen on validation data, then applied to test data."""
    positives = np.sort(np.asarray(scores)[np.asarray(targets) == 1])[::-1]
    if not len(positives):
        raise ValueError("no positive image to choose an operating point on")
    k = int(np.ceil(sensitivity * len(positives) - 1e-9))
    return float(positives[max(k, 1) - 1])


def confusion_counts(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """tp, fn, tn, fp when a score >= ``threshold`` counts as referable."""
    targets, flagged = np.asarray(targets) == 1, np.asarray(scores) >= threshold
    return {"tp": int((flagged & targets).sum()), "fn": int((~flagged & targets).sum()),
            "tn": int((~flagged & ~targets).sum()), "fp": int((flagged & ~targets).sum())}


def sensitivity_specificity(targets: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    c = confusion_counts(targets, scores, threshold)
    return c["tp"] / max(c["tp"] + c["fn"], 1), c["tn"] / max(c["tn"] + c["fp"], 1)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion (Newcombe 1998, method 3): unlike the Wald
    interval it stays inside [0, 1] and keeps its coverage at 0/n, n/n and the small counts of
    a test set's positives. (0, 1) when ``n`` is 0: nothing is known."""
    from scipy.stats import norm

    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf((1 + level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def delong_test(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """DeLong's test of two correlated AUCs (the same images), in Sun & Xu's (2014) fast form:
    the AUCs, their difference's z and two-sided p (1.0 when the two are indistinguishable)."""
    from scipy.stats import norm, rankdata

    targets = np.asarray(targets) == 1
    m, n = int(targets.sum()), int((~targets).sum())
    if not m or not n:
        raise ValueError("DeLong's test needs positive and negative images")
    aucs, v10, v01 = [], [], []
    for scores in (np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)):
        x, y = scores[targets], scores[~targets]
        tx, ty, tz = rankdata(x), rankdata(y), rankdata(np.concatenate([x, y]))
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)  # each positive's share of negatives ranked below it
        v01.append(1 - (tz[m:] - ty) / m)  # each negative's share of positives ranked above it
    cov = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    if variance <= 1e-15:
        z, p = 0.0, 1.0
    else:
        z = diff / np.sqrt(variance)
        p = float(2 * norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "z": float(z), "p": p}
