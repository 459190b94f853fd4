"""Metrics that respect a patient's two correlated eyes (issue 16): the patient bootstrap, the
clustered DeLong test, worse-eye aggregation, Brier/ECE, PPV/NPV (also at a given prevalence),
imageability; and every number of metrics.json recomputed from the predictions table it comes
with (scikit-learn where it has the metric). No Ray: compute_metrics on synthetic columns."""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

from drray.config import Config
from drray.data.selection import select_rows
from drray.distributed.datasets import Selection
from drray.distributed.inference import prob_column
from drray.metrics import (
    _rank_auc,
    bootstrap_auc_ci,
    clustered_delong_test,
    clustered_wilson_interval,
    delong_test,
    design_effect,
    expected_calibration_error,
    imageability,
    predictive_value_intervals,
    predictive_values,
    reliability_bins,
    wilson_interval,
    worse_eye,
)


def scored(n: int, seed: int = 0, signal: float = 1.0, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = y * signal + rng.normal(size=n)
    return y, np.round(s, decimals) if decimals is not None else s  # rounded: ties across classes


def eyes(y, *scores):
    """Every patient twice: both eyes share the target and the score (perfectly correlated)."""
    return (np.repeat(y, 2), *(np.repeat(s, 2) for s in scores), np.repeat(np.arange(len(y)), 2).astype(str))


# --- the patient bootstrap -------------------------------------------------------------------------


def test_with_one_image_per_patient_the_patient_bootstrap_is_the_image_bootstrap():
    y, s = scored(300, decimals=1)
    names = [f"patient-{i}" for i in np.random.default_rng(5).permutation(300)]  # any names, any order
    assert bootstrap_auc_ci(y, s, 1000, seed=3, clusters=names) == bootstrap_auc_ci(y, s, 1000, seed=3)
    # and in distribution the textbook image bootstrap (indices with replacement, another seed)
    rng, naive = np.random.default_rng(11), []
    while len(naive) < 4000:
        idx = rng.integers(0, 300, size=(500, 300))
        aucs = _rank_auc(y[idx].astype(float), s[idx])
        naive.extend(aucs[~np.isnan(aucs)])
    lo, hi = bootstrap_auc_ci(y, s, 4000, seed=0, clusters=names)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(naive, [0.025, 0.975])), abs=0.01)


def test_the_patient_bootstrap_is_wider_when_a_patients_eyes_share_the_score():
    y, s = scored(400)
    y2, s2, patients = eyes(y, s)
    by_image = bootstrap_auc_ci(y2, s2, 1000, seed=0)
    by_patient = bootstrap_auc_ci(y2, s2, 1000, seed=0, clusters=patients)
    assert np.diff(by_patient)[0] > 1.25 * np.diff(by_image)[0]  # ~sqrt(2): the image bootstrap counts each eye as news
    # two copies of each patient say no more than one: the interval of the patients alone
    assert by_patient == pytest.approx(bootstrap_auc_ci(y, s, 1000, seed=0), abs=1e-12)


def test_the_bootstrap_weights_give_sklearns_auc_of_the_resample():
    from drray.metrics import _weighted_auc

    y, s = scored(200, decimals=1)
    counts = np.random.default_rng(2).integers(0, 3, size=(4, 200))
    for row in counts:
        i = np.repeat(np.arange(200), row)
        assert _weighted_auc(y.astype(float), s, row[None].astype(float))[0] == pytest.approx(roc_auc_score(y[i], s[i]))


# --- the clustered DeLong test -----------------------------------------------------------------------


def test_clustered_delong_equals_delong_with_one_image_per_patient():
    y, a = scored(500, decimals=1)
    b = np.round(0.4 * y + np.random.default_rng(1).normal(size=500), 1)
    plain = delong_test(y, a, b)
    for clusters in (None, [f"p{i}" for i in np.random.default_rng(0).permutation(500)]):
        clustered = clustered_delong_test(y, a, b, clusters)
        assert {k: clustered[k] for k in plain} == pytest.approx(plain, rel=1e-12, abs=1e-15)
        assert clustered["patients"] == 500
    assert clustered_delong_test(y, a, a.copy())["p"] == 1.0


def obuchowski_by_hand(y, a, b, clusters):
    """Obuchowski (1997)'s estimator written out as in the paper: loops over patients."""
    psi = lambda x, v: 1.0 if x > v else 0.5 if x == v else 0.0  # noqa: E731
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    ids = list(dict.fromkeys(clusters))
    m_i = np.array([sum(clusters[j] == c for j in pos) for c in ids])
    n_i = np.array([sum(clusters[j] == c for j in neg) for c in ids])
    big_m, big_n, k = len(pos), len(neg), len(ids)
    i10, i01 = (m_i > 0).sum(), (n_i > 0).sum()
    aucs, xs, ys = [], [], []
    for s in (a, b):
        auc = np.mean([psi(s[i], s[j]) for i in pos for j in neg])
        v10 = {i: np.mean([psi(s[i], s[j]) for j in neg]) for i in pos}
        v01 = {j: np.mean([psi(s[i], s[j]) for i in pos]) for j in neg}
        xs.append(np.array([sum(v10[i] for i in pos if clusters[i] == c) for c in ids]) - m_i * auc)
        ys.append(np.array([sum(v01[j] for j in neg if clusters[j] == c) for c in ids]) - n_i * auc)
        aucs.append(auc)

    def cov(r, s):
        s10 = i10 / ((i10 - 1) * big_m) * np.sum(xs[r] * xs[s])
        s01 = i01 / ((i01 - 1) * big_n) * np.sum(ys[r] * ys[s])
        s11 = k / (k - 1) * (np.sum(xs[r] * ys[s]) + np.sum(xs[s] * ys[r]))
        return s10 / big_m + s01 / big_n + s11 / (big_m * big_n)

    z = (aucs[0] - aucs[1]) / np.sqrt(cov(0, 0) + cov(1, 1) - 2 * cov(0, 1))
    return aucs, z


def test_clustered_delong_is_obuchowskis_estimator():
    rng = np.random.default_rng(4)
    clusters = np.array([f"p{i}" for i in rng.integers(0, 25, size=60)])  # 1-6 images per patient
    y = (rng.random(60) < 0.4).astype(int)
    a, b = np.round(y + rng.normal(size=60), 1), np.round(0.3 * y + rng.normal(size=60), 1)
    (auc_a, auc_b), z = obuchowski_by_hand(y, a, b, clusters)
    test = clustered_delong_test(y, a, b, clusters)
    assert (test["auc_a"], test["auc_b"], test["z"]) == pytest.approx((auc_a, auc_b, z), rel=1e-10)
    assert test["p"] == pytest.approx(2 * norm.sf(abs(z)), rel=1e-10)


def test_clustered_delong_counts_a_patients_copied_eyes_once():
    y, a = scored(300)
    b = 0.5 * y + np.random.default_rng(8).normal(size=300)
    y2, a2, b2, patients = eyes(y, a, b)
    once = delong_test(y, a, b)
    assert clustered_delong_test(y2, a2, b2, patients)["z"] == pytest.approx(once["z"], rel=1e-10)
    assert delong_test(y2, a2, b2)["z"] == pytest.approx(np.sqrt(2) * once["z"], rel=0.02)  # what plain DeLong claims


def test_clustered_delong_needs_two_patients_of_each_class():
    with pytest.raises(ValueError, match="two patients"):
        clustered_delong_test(np.array([1, 1, 0, 0]), np.arange(4.0), np.arange(4.0)[::-1], ["a", "a", "b", "c"])


# --- the worse eye, calibration, predictive values, design effect, imageability -------------------------


def test_worse_eye_takes_each_patients_highest_probability_and_any_positive():
    ids, y, probs = worse_eye(np.array(["b", "a", "b", "c", "a"], dtype=object), np.array([0, 1, 0, 0, 0]),
                              {"m": np.array([0.2, 0.1, 0.7, 0.4, 0.3])})
    assert ids.tolist() == ["b", "a", "c"]  # in order of first appearance
    assert y.tolist() == [0, 1, 0] and probs["m"].tolist() == [0.7, 0.3, 0.4]


def test_brier_and_ece_by_hand_and_against_sklearn():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.12, 0.85, 0.95, 0.55])
    from drray.metrics import brier_score

    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-15)
    # bins of width 0.1: [0, .1) 0.05 -> |0 - .05|; [.1, .2) .15, .12 -> |.5 - .135|; .55 -> .55; .85 -> .15; .95 -> .05
    assert expected_calibration_error(y, p) == pytest.approx((0.05 + 2 * 0.365 + 0.55 + 0.15 + 0.05) / 6)
    bins = reliability_bins(np.array([0, 1, 1]), np.array([0.1, 0.0, 1.0]))  # edges: 0.1 in [.1, .2); 1.0 in the last
    assert [b["n"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 1] and bins[2]["mean_prob"] is None
    assert (bins[9]["lo"], bins[9]["hi"], bins[9]["observed"]) == (0.9, 1.0, 1.0)


def test_ppv_and_npv_at_a_given_prevalence_by_hand():
    ppv, npv = predictive_values(0.9, 0.8, 0.1)
    assert ppv == pytest.approx(0.09 / (0.09 + 0.18)) and npv == pytest.approx(0.72 / (0.72 + 0.01))
    ppv_ci, npv_ci = predictive_value_intervals((0.85, 0.95), (0.75, 0.85), 0.1)
    assert ppv_ci == pytest.approx([0.085 / (0.085 + 0.225), 0.095 / (0.095 + 0.135)])
    assert npv_ci == pytest.approx([0.675 / (0.675 + 0.015), 0.765 / (0.765 + 0.005)])


def test_the_design_effect_is_one_per_patient_and_two_for_copied_eyes():
    hits = (np.random.default_rng(0).random(101) < 0.3).astype(float)
    assert design_effect(hits) == 1.0 and clustered_wilson_interval(hits) == wilson_interval(hits.sum(), 101)
    twice, patients = np.repeat(hits, 2), np.repeat(np.arange(101), 2)
    assert design_effect(twice, patients) == pytest.approx(2.0)
    assert clustered_wilson_interval(twice, patients) == pytest.approx(wilson_interval(hits.sum(), 101))


def test_imageability_counts_what_could_not_be_graded_and_leaves_out_what_was_no_input():
    i = imageability(90, {"no_fundus": 5, "ungradable": 3, "unsupported_format": 2, "image_missing": 1,
                          "bad_grade": 1, "a_new_kind": 1})
    assert i["not_gradable"] == 9 and i["imageability"] == pytest.approx(90 / 99)
    assert i["imageability_ci"] == list(wilson_interval(90, 99))
    assert i["not_an_input"] == {"image_missing": 1, "unsupported_format": 2} and i["no_reference"] == {"bad_grade": 1}
    assert "a_new_kind" in i["not_gradable_by_kind"]  # unknown kinds never flatter it


# --- the contract: every number of metrics.json from predictions.parquet -------------------------------


MODELS = {"teacher": "unused", "student": "unused"}


def synthetic_columns(seed: int = 0) -> dict:
    """Prediction columns as the evaluation collects them: three sets, most patients with two
    eyes whose targets and scores are correlated, some with one image."""
    rng = np.random.default_rng(seed)
    parts = []
    for test_set, patients in (("validation", 120), ("eyepacs_test", 150), ("external", 90)):
        for p in range(patients):
            sick, level = rng.random() < 0.3, rng.normal()
            for eye in range(1 if p % 5 == 0 else 2):
                target = int(sick and (eye == 0 or rng.random() < 0.7))
                parts.append((f"{p}_{('left', 'right')[eye]}", f"{test_set}-{p}", target, test_set,
                              [1 / (1 + np.exp(-(k * target + level + 0.5 * rng.normal() - 1))) for k in (2.0, 1.0)]))
    columns = {"image_id": np.array([r[0] for r in parts], dtype=object),
               "patient_id": np.array([r[1] for r in parts], dtype=object),
               "target": np.array([r[2] for r in parts], np.float32),
               "test_set": np.array([r[3] for r in parts], dtype=object)}
    for i, m in enumerate(MODELS):
        columns[prob_column(m)] = np.array([r[4][i] for r in parts], np.float32)
    return columns


def config(**evaluate) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, **{"bootstrap": 300, **evaluate}))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from jobs.evaluate import _write_predictions, compute_metrics

    columns = synthetic_columns()
    path = tmp_path_factory.mktemp("evaluate") / "predictions.parquet"
    _write_predictions(columns, MODELS, path)
    return compute_metrics(columns, MODELS, config(prevalence=0.1)), pq.read_table(path).to_pandas()


def at_unit(rows, unit: str):
    """A model's rows of one test set at a unit, as a reader of predictions.parquet makes them."""
    if unit == "image":
        return rows
    return rows.groupby("patient_id", sort=False).agg(target=("target", "max"), prob=("prob", "max")).reset_index()


def test_predictions_parquet_has_the_contracts_columns(evaluated):
    _, predictions = evaluated
    assert list(predictions.columns) == ["image_id", "patient_id", "target", "prob", "model", "test_set"]
    assert predictions["patient_id"].notna().all()


def test_every_number_in_metrics_json_is_recomputed_from_the_predictions(evaluated):
    metrics, predictions = evaluated
    assert {(r["test_set"], r["unit"]) for r in metrics["results"]} == {
        (s, u) for s in ("validation", "eyepacs_test", "external") for u in ("image", "patient")}
    validation = predictions[predictions["test_set"] == "validation"]
    for r in metrics["results"]:
        mine = predictions[(predictions["model"] == r["model"]) & (predictions["test_set"] == r["test_set"])]
        rows = at_unit(mine, r["unit"])
        y, p = rows["target"].to_numpy(), rows["prob"].to_numpy().astype(np.float64)
        assert (r["n"], r["positives"], r["patients"]) == (len(rows), int(y.sum()), mine["patient_id"].nunique())
        assert r["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
        assert r["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
        edges = np.minimum((p * 10).astype(int), 9)
        gaps = [abs(y[edges == b].mean() - p[edges == b].mean()) * (edges == b).sum() for b in set(edges)]
        assert r["ece"] == pytest.approx(sum(gaps) / len(y), abs=1e-12)
        assert [op["target_sensitivity"] for op in r["operating_points"]] == [0.9, 0.95]
        for op in r["operating_points"]:
            # the threshold is the validation images' (never this set's): the highest reaching the sensitivity
            positives = np.sort(validation[(validation["model"] == r["model"]) & (validation["target"] == 1)]["prob"])[::-1]
            assert op["threshold"] == positives[int(np.ceil(op["target_sensitivity"] * len(positives))) - 1]
            tn, fp, fn, tp = confusion_matrix(y, p >= op["threshold"], labels=[0, 1]).ravel()
            assert (op["tp"], op["fn"], op["tn"], op["fp"]) == (tp, fn, tn, fp)
            assert (op["sensitivity"], op["specificity"]) == pytest.approx((tp / (tp + fn), tn / (tn + fp)))
            assert (op["ppv"], op["npv"]) == pytest.approx((tp / (tp + fp), tn / (tn + fn)))
            assert op["name"] == f"{op['target_sensitivity']:.0%} sensitivity on validation"
            plain = [wilson_interval(tp, tp + fn), wilson_interval(tn, tn + fp), wilson_interval(tp, tp + fp),
                     wilson_interval(tn, tn + fn)]
            cis = [op[f"{k}_ci"] for k in ("sensitivity", "specificity", "ppv", "npv")]
            if r["unit"] == "patient":  # the counts are patients: plain Wilson intervals
                assert cis == [list(ci) for ci in plain]
            else:  # never narrower than the images' plain Wilson intervals
                assert all(ci[0] <= w[0] + 1e-12 and ci[1] >= w[1] - 1e-12 for ci, w in zip(cis, plain, strict=True))
            ppv, npv = predictive_values(op["sensitivity"], op["specificity"], 0.1)
            assert (op["prevalence"], op["ppv_at_prevalence"], op["npv_at_prevalence"]) == pytest.approx((0.1, ppv, npv))
            assert op["ppv_at_prevalence_ci"][0] <= ppv <= op["ppv_at_prevalence_ci"][1]


def test_image_level_intervals_are_wider_than_the_image_counts_make_them(evaluated):
    metrics, _ = evaluated
    r = next(r for r in metrics["results"] if (r["model"], r["test_set"], r["unit"]) == ("teacher", "eyepacs_test", "image"))
    op = r["operating_points"][0]
    plain = wilson_interval(op["tn"], op["tn"] + op["fp"])
    assert np.diff(op["specificity_ci"])[0] > 1.05 * np.diff(plain)[0]  # a patient's eyes agree


def test_delong_rows_are_per_unit_and_clustered_by_patient(evaluated):
    metrics, predictions = evaluated
    assert {(d["test_set"], d["unit"]) for d in metrics["delong"]} == {
        (s, u) for s in ("validation", "eyepacs_test", "external") for u in ("image", "patient")}
    for d in metrics["delong"]:
        chosen = predictions[predictions["test_set"] == d["test_set"]]
        a, b = (at_unit(chosen[chosen["model"] == m], d["unit"]) for m in (d["model_a"], d["model_b"]))
        assert (a["target"].to_numpy() == b["target"].to_numpy()).all()
        y = a["target"].to_numpy()
        if d["unit"] == "patient":  # each patient one unit: plain DeLong on the patients
            expected = delong_test(y, a["prob"].to_numpy(), b["prob"].to_numpy())
        else:
            expected = clustered_delong_test(y, a["prob"].to_numpy(), b["prob"].to_numpy(), a["patient_id"].to_numpy())
        assert d["z"] == pytest.approx(expected["z"], rel=1e-9) and d["p"] == pytest.approx(expected["p"], rel=1e-9)


def test_the_stored_operating_point_is_chosen_on_validation_and_named(evaluated):
    metrics, _ = evaluated
    for m in MODELS:
        stored = metrics["operating_points"][m]
        assert stored["chosen_on"] == "validation" and stored["name"] == "90% sensitivity on validation"
        row = next(r for r in metrics["results"] if r["model"] == m and r["test_set"] == "eyepacs_test")
        assert stored["threshold"] == row["operating_points"][0]["threshold"]
    assert metrics["bootstrap"]["resampled"] == "patients" and metrics["calibration_bins"] == 10


def test_without_a_prevalence_the_points_say_so():
    from jobs.evaluate import compute_metrics

    metrics = compute_metrics(synthetic_columns(1), MODELS, config(bootstrap=50))
    op = metrics["results"][0]["operating_points"][0]
    assert op["prevalence"] is None and "ppv_at_prevalence" not in op and metrics["prevalence"] is None


def test_a_selection_with_patients_carries_a_patient_id_column():
    batch = pa.table({"image_id": ["1_left", "1_right", "2_left"], "image": [b"a", b"b", b"c"],
                      "split": ["test", "test", "train"]})
    sel = Selection.clean("/tmp", 32, split="test", targets={"1_left": 1.0, "1_right": 0.0},
                          patients={"1_left": "1", "1_right": "1"})
    rows = select_rows(batch, sel.rows)
    assert rows.column("patient_id").to_pylist() == ["1", "1"] and rows.column("target").to_pylist() == [1.0, 0.0]
    assert "patient_id" not in select_rows(batch, Selection.clean("/tmp", 32, split="test").rows).column_names


def prepared_set(root, rejects: list[dict]):
    """A prepared set's index and accounting, without pixels: what imageability reads."""
    (root / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["1_left", "1_right", "2_left", "9"], "grade": pa.array([0, 2, None, 1], pa.int8()),
                             "split": ["test", "test", "test", "train"]}), root / "shards" / "shard-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rejects), root / "rejects.parquet")
    kinds = [r["kind"] for r in rejects]
    import json

    (root / "manifest.json").write_text(json.dumps({"shards": [{"file": "shard-00000.parquet"}], "counts": {
        "inputs": 4 + len(rejects), "prepared": 4, "rejected_by_reason": {k: kinds.count(k) for k in set(kinds)}}}))
    return str(root)


def test_imageability_of_a_test_set_reads_its_prepared_sets_accounting(tmp_path):
    from jobs.evaluate import prepared_imageability

    rejects = [{"image_id": "3_left", "path": "a", "kind": "no_fundus", "reason": "r"},
               {"image_id": "notes", "path": "b", "kind": "unsupported_format", "reason": "r"}]
    whole = prepared_imageability(prepared_set(tmp_path / "a", rejects), "test")
    assert (whole["prepared"], whole["not_gradable"], whole["imageability"]) == (4, 1, 0.8)
    assert "whole prepared set" in whole["scope"] and whole["ungraded"] == 1  # 2_left: prepared, no grade
    # rejects that record their split: the test split's own accounting
    split = prepared_imageability(prepared_set(tmp_path / "b", [{**rejects[0], "split": "train"},
                                                                {**rejects[1], "split": "test"}]), "test")
    assert (split["prepared"], split["not_gradable"], split["scope"]) == (3, 0, "the test split")
    assert split["not_an_input"] == {"unsupported_format": 1}


def test_a_set_with_one_positive_patient_gets_no_delong_row_instead_of_a_crash():
    from jobs.evaluate import compute_metrics

    columns = synthetic_columns(2)
    external = columns["test_set"] == "external"
    keep = ~external | (columns["target"] == 0) | (columns["patient_id"] == columns["patient_id"][external & (columns["target"] == 1)][0])
    columns = {k: v[keep] for k, v in columns.items()}
    metrics = compute_metrics(columns, MODELS, config(bootstrap=50))
    assert {d["test_set"] for d in metrics["delong"]} == {"validation", "eyepacs_test"}
    assert {r["test_set"] for r in metrics["results"]} == {"validation", "eyepacs_test", "external"}


def test_without_validation_images_no_operating_point_is_fixed_on_a_test_set():
    """labels.validation 0: AUCs, calibration and DeLong as usual; no threshold at all (one
    chosen on a test set would be a test label spent), so no operating point is stored."""
    from jobs.evaluate import compute_metrics

    columns = synthetic_columns(2)
    keep = columns["test_set"] != "validation"
    metrics = compute_metrics({k: v[keep] for k, v in columns.items()}, MODELS, config(bootstrap=50))
    assert metrics["operating_points"] == {} and metrics["delong"]
    assert all(r["operating_points"] == [] and 0 <= r["auc"] <= 1 for r in metrics["results"])


def test_without_validation_images_thresholds_come_from_out_of_fold_predictions_only():
    """labels.validation 0 with oof.folds: a model's thresholds are chosen on its out-of-fold
    predictions (the budget's images, each from a model that did not see its label), named so
    in every operating point; a model without them gets none, and no test image chooses one."""
    from drray.metrics import OUT_OF_FOLD, threshold_at_sensitivity
    from jobs.evaluate import compute_metrics

    columns = synthetic_columns(2)
    rng = np.random.default_rng(5)
    y = (rng.random(40) < 0.3).astype(np.float32)
    p = np.clip(0.3 * y + rng.random(40) * 0.7, 0, 1).astype(np.float32)
    tests = {k: v[columns["test_set"] != "validation"] for k, v in columns.items()}
    metrics = compute_metrics(tests, MODELS, config(bootstrap=50), {"student": (y, p)})
    point = metrics["operating_points"]["student"]
    assert point["chosen_on"] == OUT_OF_FOLD and point["validation_images"] == 40
    assert point["threshold"] == threshold_at_sensitivity(y, p, 0.9)
    assert point["name"] == "90% sensitivity on out-of-fold predictions"
    assert "teacher" not in metrics["operating_points"]
    rows = [r for r in metrics["results"] if r["model"] == "student"]
    assert all({op["target_sensitivity"] for op in r["operating_points"]} == {0.9, 0.95} for r in rows)
    assert all(op["name"].endswith(OUT_OF_FOLD) for r in rows for op in r["operating_points"])
    assert all(r["operating_points"] == [] for r in metrics["results"] if r["model"] == "teacher")
    # validation images, where there are any, choose: out-of-fold predictions are for a budget without them
    with_validation = compute_metrics(columns, MODELS, config(bootstrap=50), {"student": (y, p)})
    assert with_validation["operating_points"]["student"]["chosen_on"] == "validation"


def test_validation_images_of_one_class_fix_no_operating_point():
    """A small budget's validation part may hold no referable image (ci's sweep at 10%: 12
    validation images): no threshold can be chosen for a sensitivity; none is taken from a test set."""
    from jobs.evaluate import compute_metrics

    columns = synthetic_columns(3)
    columns["target"] = np.where(columns["test_set"] == "validation", 0.0, columns["target"]).astype(np.float32)
    metrics = compute_metrics(columns, MODELS, config(bootstrap=50))
    assert metrics["operating_points"] == {} and all(r["operating_points"] == [] for r in metrics["results"])


def test_an_interval_of_a_single_class_set_is_refused_not_drawn_forever():
    from drray.metrics import bootstrap_auc_ci

    with pytest.raises(ValueError, match="positive and negative"):
        bootstrap_auc_ci(np.zeros(10), np.linspace(0, 1, 10), 50, 0)
