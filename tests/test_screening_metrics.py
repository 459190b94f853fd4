"""Screening metrics against hand-computed cases and scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from drray.metrics import (
    _rank_auc,
    bootstrap_auc_ci,
    confusion_counts,
    delong_test,
    roc_auc,
    sensitivity_specificity,
    threshold_at_sensitivity,
    wilson_interval,
)


def scored(n: int, seed: int = 0, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, y * signal + rng.normal(size=n)


def test_rank_auc_equals_sklearn_with_ties():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.5, 0.5, 0.2, 0.9])  # ties across classes
    assert _rank_auc(y.astype(float), s) == pytest.approx(roc_auc_score(y, s))
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_bootstrap_interval_contains_the_auc_and_narrows_with_more_images():
    y, s = scored(200)
    lo, hi = bootstrap_auc_ci(y, s, resamples=1000, seed=0)
    assert lo < roc_auc(y, s) < hi
    y4, s4 = scored(3200)
    lo4, hi4 = bootstrap_auc_ci(y4, s4, resamples=1000, seed=0)
    assert lo4 < roc_auc(y4, s4) < hi4
    assert (hi4 - lo4) < 0.5 * (hi - lo)  # ~1/sqrt(16) of the width
    assert bootstrap_auc_ci(y, s, resamples=1000, seed=0) == (lo, hi)  # seeded


def test_delong_identical_models_give_p_one_and_its_variance_matches_the_bootstrap():
    y, s = scored(600)
    same = delong_test(y, s, s.copy())
    assert same["p"] == 1.0 and same["z"] == 0.0
    assert same["auc_a"] == pytest.approx(roc_auc_score(y, s))
    # a much weaker model on the same images: a clear difference, symmetric in the two models
    weak = 0.05 * y + np.random.default_rng(9).normal(size=600)
    ab, ba = delong_test(y, s, weak), delong_test(y, weak, s)
    assert ab["p"] < 1e-6 and ab["p"] == pytest.approx(ba["p"]) and ab["z"] == pytest.approx(-ba["z"])
    # DeLong's standard error of the difference against a paired bootstrap of the same difference
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(1500):
        i = rng.integers(0, len(y), len(y))
        diffs.append(roc_auc_score(y[i], s[i]) - roc_auc_score(y[i], weak[i]))
    se_delong = (ab["auc_a"] - ab["auc_b"]) / ab["z"]
    assert se_delong == pytest.approx(np.std(diffs), rel=0.15)


def test_threshold_at_sensitivity_and_the_operating_point():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05])
    assert threshold_at_sensitivity(y, s, 0.75) == 0.6  # 3 of 4 positives at >= 0.6
    assert threshold_at_sensitivity(y, s, 0.9) == 0.3  # needs all 4
    assert threshold_at_sensitivity(y, s, 0.5) == 0.8
    sens, spec = sensitivity_specificity(y, s, 0.6)
    assert sens == 0.75 and spec == pytest.approx(5 / 6)  # 0.7 is the one false positive
    with pytest.raises(ValueError, match="no positive"):
        threshold_at_sensitivity(np.zeros(3), np.ones(3), 0.9)


@pytest.mark.parametrize("successes, n, low, high", [
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_newcombes_published_values(successes, n, low, high):
    # Newcombe (1998), Two-sided confidence intervals for the single proportion, Table I, method 3
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_stays_inside_zero_and_one_and_narrows_with_n():
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and 0.83 < lo < 0.84  # a Wald interval would be [1, 1]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert np.diff(wilson_interval(450, 500)) < 0.4 * np.diff(wilson_interval(45, 50))


def test_the_evaluations_operating_point_carries_its_counts_and_intervals():
    from jobs.evaluate import operating_point

    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05])
    assert confusion_counts(y, s, 0.6) == {"tp": 3, "fn": 1, "tn": 5, "fp": 1}
    op = operating_point(y, s, 0.6, 0.75)
    assert op["sensitivity"] == 0.75 and op["specificity"] == pytest.approx(5 / 6)
    assert (op["tp"], op["fn"], op["tn"], op["fp"]) == (3, 1, 5, 1) and op["threshold"] == 0.6
    assert op["sensitivity_ci"] == list(wilson_interval(3, 4)) and op["specificity_ci"] == list(wilson_interval(5, 6))
    assert op["ppv"] == 0.75 and op["npv"] == pytest.approx(5 / 6) and op["name"] == "75% sensitivity on validation"
    assert op["ppv_ci"] == list(wilson_interval(3, 4)) and op["npv_ci"] == list(wilson_interval(5, 6))
    assert op["prevalence"] is None and "ppv_at_prevalence" not in op
    nothing = operating_point(y, s, 2.0, 0.75)  # nothing flagged: no PPV, not a made-up 0
    assert nothing["ppv"] is None and nothing["ppv_ci"] == [0.0, 1.0] and nothing["sensitivity"] == 0.0
