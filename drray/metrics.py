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
# DeLong's test. A patient's two eyes are correlated: every interval and test here takes the
# image's patient (``clusters``; None: every image its own patient) and treats the patient, not
# the image, as the independent unit.
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


def cluster_codes(clusters, n: int) -> np.ndarray:
    """Each image's patient as 0..K-1, numbered in order of first appearance (so one image per
    patient numbers them 0..n-1, as the images: the patient bootstrap then draws exactly the
    image bootstrap's resamples). None: every image its own patient."""
    if clusters is None:
        return np.arange(n)
    _, first, inverse = np.unique(np.asarray(clusters), return_index=True, return_inverse=True)
    renumber = np.empty(len(first), np.int64)
    renumber[np.argsort(first, kind="stable")] = np.arange(len(first))
    return renumber[inverse.ravel()]


def _weighted_auc(targets: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The AUC of every row of ``weights`` (each image counted that many times; mid-ranks for
    ties), NaN where a row weighs one class only: a resample is a weighting of the images."""
    order = np.argsort(scores, kind="stable")
    s, t, w = scores[order], targets[order], weights[:, order]
    new = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(new) - 1  # each image's tie group
    neg = np.add.reduceat(w * (1 - t), np.flatnonzero(new), axis=1)  # negative weight per distinct score
    wins = (np.cumsum(neg, axis=1) - neg + 0.5 * neg)[:, group]  # negatives below (ties: half) each image
    wp, wn = (w * t).sum(axis=1), (w * (1 - t)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * t * wins).sum(axis=1) / (wp * wn)


def bootstrap_auc_ci(targets: np.ndarray, scores: np.ndarray, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95, clusters=None) -> tuple[float, float]:
    """Percentile bootstrap interval of the ROC AUC that resamples patients (the cluster
    bootstrap): each resample draws patients with replacement, every drawn patient with all
    their images, so two correlated eyes never count as two independent images. With one image
    per patient it is the image bootstrap. Seeded; resamples with a single class are drawn again,
    not counted."""
    targets, scores = np.asarray(targets, np.float64), np.asarray(scores, np.float64)
    if len(np.unique(targets)) < 2:  # every resample would have one class: it would draw forever
        raise ValueError("an AUC interval needs positive and negative images")
    codes = cluster_codes(clusters, len(targets))
    k = int(codes.max()) + 1
    batch = max(1, min(resamples, 500, 4_000_000 // len(targets)))  # weights: batch x images floats
    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    while len(aucs) < resamples:
        draws = rng.integers(0, k, size=(batch, k))
        counts = np.bincount((draws + k * np.arange(batch)[:, None]).ravel(), minlength=batch * k).reshape(batch, k)
        found = _weighted_auc(targets, scores, counts[:, codes].astype(np.float64))
        aucs.extend(found[~np.isnan(found)][: resamples - len(aucs)])
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# Where a threshold is chosen when the budget keeps no validation images (jobs.oof): in
# metrics.json's operating points ("chosen_on") and the report's sentence about them.
OUT_OF_FOLD = "out-of-fold predictions"


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


def wilson_interval(successes: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion (Newcombe 1998, method 3): unlike the Wald
    interval it stays inside [0, 1] and keeps its coverage at 0/n, n/n and the small counts of
    a test set's positives. (0, 1) when ``n`` is 0: nothing is known. Counts may be effective
    (fractional) counts: see :func:`clustered_wilson_interval`."""
    from scipy.stats import norm

    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf((1 + level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def design_effect(hits: np.ndarray, clusters=None) -> float:
    """How much a proportion's variance over patients exceeds the binomial's (Rao & Scott 1992):
    sum_k (y_k - p m_k)^2 / (n p (1 - p)), patient k with m_k of the n units and y_k hits, without
    the K/(K-1) small-sample factor so that one unit per patient gives exactly 1. Floored at 1: an
    interval is never made narrower than the binomial one."""
    hits = np.asarray(hits, np.float64)
    n, p = len(hits), float(hits.mean()) if len(hits) else 0.0
    codes = cluster_codes(clusters, n)
    if n == 0 or p in (0.0, 1.0) or int(codes.max()) + 1 == n:
        return 1.0
    y, m = np.bincount(codes, weights=hits), np.bincount(codes)
    return max(1.0, float(((y - p * m) ** 2).sum() / (n * p * (1 - p))))


def clustered_wilson_interval(hits: np.ndarray, clusters=None, level: float = 0.95) -> tuple[float, float]:
    """Wilson's interval of the share of ``hits`` (one 0/1 per unit), at the effective sample
    size n / design effect: the plain Wilson interval of the counts when each unit is its own
    patient (patient-level rows), wider where a patient's eyes agree (image-level rows)."""
    hits = np.asarray(hits, np.float64)
    deff = design_effect(hits, clusters)
    return wilson_interval(hits.sum() / deff, len(hits) / deff, level)


def delong_test(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """DeLong's test of two correlated AUCs (the same images), in Sun & Xu's (2014) fast form:
    the AUCs, their difference's z and two-sided p (1.0 when the two are indistinguishable)."""
    from scipy.stats import rankdata

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
    return _z_test(aucs, variance)


def _z_test(aucs: list[float], variance: float) -> dict:
    from scipy.stats import norm

    diff = aucs[0] - aucs[1]
    if variance <= 1e-15:
        z, p = 0.0, 1.0
    else:
        z = diff / np.sqrt(variance)
        p = float(2 * norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "z": float(z), "p": p}


def clustered_delong_test(targets: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, clusters=None) -> dict:
    """DeLong's test of two correlated AUCs when a patient gives several images (Obuchowski
    1997, Biometrics 53:567-578): DeLong's structural components summed per patient, their
    (co)variances taken over patients. Equal to :func:`delong_test` when every patient has one
    image. Obuchowski's estimator, per model r and s (K patients, I10 of them with a positive
    image, I01 with a negative; patient i with m_i positive and n_i negative images; M, N the
    totals; X_i, Y_i patient i's sums of V10 over its positives and of V01 over its negatives):

        S10 = I10 / ((I10 - 1) M) sum_i (X_i^r - m_i A^r) (X_i^s - m_i A^s)
        S01 = I01 / ((I01 - 1) N) sum_i (Y_i^r - n_i A^r) (Y_i^s - n_i A^s)
        S11 = K / (K - 1)         sum_i (X_i^r - m_i A^r) (Y_i^s - n_i A^s)
        cov(A^r, A^s) = S10 / M + S01 / N + (S11^rs + S11^sr) / (M N)
    """
    from scipy.stats import rankdata

    positive = np.asarray(targets) == 1
    codes = cluster_codes(clusters, len(positive))
    k, pos_codes, neg_codes = int(codes.max()) + 1, codes[positive], codes[~positive]
    m, n = int(positive.sum()), int((~positive).sum())
    i10, i01 = len(np.unique(pos_codes)), len(np.unique(neg_codes))
    if i10 < 2 or i01 < 2:
        raise ValueError("the clustered DeLong test needs positives and negatives in two patients each")
    aucs, x, y = [], [], []
    for scores in (np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)):
        xs, ys = scores[positive], scores[~positive]
        tx, ty, tz = rankdata(xs), rankdata(ys), rankdata(np.concatenate([xs, ys]))
        auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        m_i, n_i = np.bincount(pos_codes, minlength=k), np.bincount(neg_codes, minlength=k)
        x.append(np.bincount(pos_codes, weights=(tz[:m] - tx) / n, minlength=k) - m_i * auc)
        y.append(np.bincount(neg_codes, weights=1 - (tz[m:] - ty) / m, minlength=k) - n_i * auc)
        aucs.append(auc)
    x, y = np.array(x), np.array(y)
    s10 = i10 / ((i10 - 1) * m) * (x @ x.T)
    s01 = i01 / ((i01 - 1) * n) * (y @ y.T)
    s11 = k / (k - 1) * (x @ y.T)
    cov = s10 / m + s01 / n + (s11 + s11.T) / (m * n)
    return {**_z_test(aucs, cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), "patients": k}


# ---------------------------------------------------------------------------------------------
# Per patient, calibration, predictive values, imageability
# ---------------------------------------------------------------------------------------------


def worse_eye(patients, targets: np.ndarray, scores: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per patient (in order of first appearance): its patient id, its target (1 when any of its
    images is positive: the max grade's target wherever the positive class grows with the
    grade), and each model's score of its worse eye (the max over its images: a patient is
    flagged when any image is, as ``drray predict`` decides)."""
    codes = cluster_codes(patients, len(targets))
    order = np.argsort(codes, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])  # each patient's first image

    def worst(values) -> np.ndarray:
        return np.maximum.reduceat(np.asarray(values)[order], starts)

    return np.asarray(patients, dtype=object)[order[starts]], worst(targets), {m: worst(s) for m, s in scores.items()}


def brier_score(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean squared difference between the probability and the 0/1 target."""
    return float(np.mean((np.asarray(probs, np.float64) - np.asarray(targets, np.float64)) ** 2))


def reliability_bins(targets: np.ndarray, probs: np.ndarray, bins: int = 10) -> list[dict]:
    """Equal-width probability bins [b/bins, (b+1)/bins) (the last one closed at 1): each bin's
    images, mean probability and observed share of positives (None for an empty bin)."""
    probs, targets = np.asarray(probs, np.float64), np.asarray(targets, np.float64)
    which = np.clip(np.floor(probs * bins).astype(np.int64), 0, bins - 1)
    out = []
    for b in range(bins):
        chosen = which == b
        count = int(chosen.sum())
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": count,
                    "mean_prob": float(probs[chosen].mean()) if count else None,
                    "observed": float(targets[chosen].mean()) if count else None})
    return out


def expected_calibration_error(targets: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE over :func:`reliability_bins`: sum_b (n_b / n) |observed_b - mean_prob_b|."""
    found = [b for b in reliability_bins(targets, probs, bins) if b["n"]]
    return float(sum(b["n"] * abs(b["observed"] - b["mean_prob"]) for b in found) / len(probs))


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """PPV and NPV at a prevalence the test set does not have (Bayes' rule)."""
    hit, false_alarm = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    clear, miss = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    ppv = hit / (hit + false_alarm) if hit + false_alarm else 0.0
    npv = clear / (clear + miss) if clear + miss else 0.0
    return ppv, npv


def predictive_value_intervals(sensitivity_ci, specificity_ci, prevalence: float) -> tuple[list, list]:
    """Intervals of PPV and NPV at ``prevalence`` from the ends of sensitivity's and
    specificity's intervals: both values grow with both, so the corners bound them. Given
    intervals at level sqrt(0.95) each (positives and negatives are different units), the box
    holds the true pair with 95% probability, and so these intervals cover at least 95%."""
    (slo, shi), (plo, phi) = sensitivity_ci, specificity_ci
    low, high = predictive_values(slo, plo, prevalence), predictive_values(shi, phi, prevalence)
    return [low[0], high[0]], [low[1], high[1]]


# What a reject kind (drray.data: sources and fundus) says of the screening test. Not gradable:
# an input photograph the system gave no result for (the graders' "ungradable", no fundus found,
# a file that cannot be read as an image): it counts against imageability. Not an input: a file
# that is no photograph (a README), a label row without a file, a second file of the same id.
# No reference standard: its label rows are unusable (a bad or conflicting grade, DME or patient,
# a split that is none), so the image never reached the system.
# A kind not listed (a newer drray's) counts as not gradable: imageability is never flattered.
NOT_AN_INPUT = frozenset({"unsupported_format", "image_missing", "duplicate_image"})
NO_REFERENCE = frozenset({"bad_grade", "conflicting_grades", "bad_split"})
NOT_GRADABLE = frozenset({"ungradable", "no_fundus", "no_border", "empty", "unreadable", "corrupt", "not_image",
                          "decompression_bomb", "unsupported_mode", "low_bit_depth", "error"})


def imageability(prepared: int, rejected_by_kind: dict[str, int]) -> dict:
    """The share of a test set's input photographs the system could grade: prepared /
    (prepared + not gradable), with its Wilson interval; the other rejects counted apart."""
    apart = NOT_AN_INPUT | NO_REFERENCE
    not_gradable = {k: v for k, v in sorted(rejected_by_kind.items()) if k not in apart}
    failed = sum(not_gradable.values())
    return {"prepared": prepared, "not_gradable": failed, "not_gradable_by_kind": not_gradable,
            "not_an_input": {k: v for k, v in sorted(rejected_by_kind.items()) if k in NOT_AN_INPUT},
            "no_reference": {k: v for k, v in sorted(rejected_by_kind.items()) if k in NO_REFERENCE},
            "imageability": prepared / (prepared + failed) if prepared + failed else None,
            "imageability_ci": list(wilson_interval(prepared, prepared + failed))}
