"""``drray run evaluate``: how good is each model, and how sure are we.

Every model (``evaluate.models``, or every model in ``RUN/models``) predicts on the validation
hold-out, the EyePACS-style test split and the external (Messidor-2-style) set in one Ray Data
pipeline. Written to ``RUN/evaluate-<key>/`` (and ``RUN/metrics.json``):

    predictions.parquet  image_id, patient_id, target (int8), prob (float32), model, test_set
    metrics.json         per model, test set and unit (``image``; ``patient``: the worse eye):
                         n, positives, patients, AUC with a 95% patient-bootstrap CI, Brier
                         score, ECE and reliability bins, and at each operating point chosen on
                         validation data sensitivity, specificity, PPV and NPV with their counts
                         and 95% Wilson intervals (design-effect adjusted at image level), PPV
                         and NPV at ``evaluate.prevalence``; DeLong's test (Obuchowski's
                         clustered form) between every two models on the same images, per unit;
                         each test set's imageability (from its prepared set's manifest);
                         ``undecodable``: the test images whose prepared image could not be
                         decoded (image_id, test_set, reason), left out of every number
    roc_<set>.png        ROC curves, every model overlaid (images)
    reliability_<set>.png  reliability diagrams, images and patients, every model overlaid
    tsne.png             t-SNE of penultimate-layer features of a seeded sample of the external
                         set's images (the paper's Figure 4: Messidor-2), or of the EyePACS test
                         split without one; only those images' features leave the models' device

Eyes of one patient are correlated: every interval and test treats the patient as the
independent unit (drray.metrics). The operating threshold (``evaluate.operating_sensitivity`` on
validation images) is stored in each ``RUN/models/<name>/meta.json`` for ``drray predict``; a
patient is flagged when any of its images is, as ``drray predict`` decides.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drray.artifacts import Legacy, StageDir, atomic_directory, atomic_write_json, sha256_file
from drray.config import Config, ConfigError, run_dir, stages_dir
from drray.data.shards import read_index, read_manifest
from drray.data.splits import binary_target
from drray.distributed.datasets import Selection
from drray.distributed.inference import (
    DECODE_ERROR,
    Inference,
    check_resources,
    features_column,
    features_of,
    predictions,
    prob_column,
)
from drray.distributed.prepare import ensure_prepared
from drray.engine.checkpoint import classifier_meta, read_meta
from drray.metrics import (
    OUT_OF_FOLD,
    bootstrap_auc_ci,
    brier_score,
    clustered_delong_test,
    clustered_wilson_interval,
    confusion_counts,
    expected_calibration_error,
    imageability,
    predictive_value_intervals,
    predictive_values,
    reliability_bins,
    roc_auc,
    threshold_at_sensitivity,
    worse_eye,
)
from drray.progress import say
from jobs import common, stages

log = logging.getLogger(__name__)
# An evaluation folder written before drray marked its output folders (see drray.artifacts).
EVALUATION_LEGACY = Legacy("metrics.json", frozenset({"metrics.json", "predictions.parquet", "*.png", "done.json"}))
VALIDATION, EYEPACS_TEST, EXTERNAL = "validation", "eyepacs_test", "external"
IMAGE, PATIENT = UNITS = ("image", "patient")
CALIBRATION_BINS = 10  # equal-width probability bins of the ECE and the reliability diagram
# metrics.json's layout, in the stage key: an evaluation written in an older layout is redone.
# 2: a row per unit (image, patient), patient_id in predictions.parquet, PPV/NPV, Brier, ECE.
CONTRACT = 2
# How each number is made, written into metrics.json for its readers.
METHODS = {
    "auc_ci": "percentile bootstrap resampling patients (each with all its images)",
    "proportion_ci": "Wilson score interval; at image level at the effective sample size n / design effect over "
                     "patients (Rao & Scott); at patient level the counts are patients",
    "delong": "DeLong's test in Obuchowski's (1997) clustered form, patients the clusters (at patient level each "
              "patient is one unit: plain DeLong)",
    "patient": "worse eye: the patient's highest probability; its target 1 when any of its images is positive",
    "operating_point": "the highest threshold reaching the target sensitivity on the validation images (with "
                       "labels.validation 0: on the model's out-of-fold predictions on the budget, oof.folds), "
                       "applied unchanged",
    "ece": f"{CALIBRATION_BINS} equal-width bins [b/{CALIBRATION_BINS}, (b+1)/{CALIBRATION_BINS}): "
           "sum_b n_b/n |observed_b - mean_prob_b|",
    "at_prevalence": "PPV/NPV by Bayes' rule from sensitivity and specificity; interval from the corners of their "
                     "intervals at level sqrt(0.95) each",
}


def models_of(cfg: Config) -> dict[str, Path]:
    """name -> checkpoint directory: ``evaluate.models`` ("name=dir" or a dir), else RUN/models/*."""
    if cfg.evaluate.models:
        chosen = {}
        for item in cfg.evaluate.models:
            name, _, path = item.rpartition("=")
            path = Path(path).resolve()
            chosen[name or path.name] = path
    else:
        root = run_dir(cfg) / "models"
        found = [p for p in root.glob("*") if (p / "model.pt").is_file()]
        order = {name: i for i, name in enumerate(stages.MODEL_ORDER)}
        chosen = {p.name: p.resolve() for p in sorted(found, key=lambda p: (order.get(p.name, len(order)), p.name))}
        if not chosen:
            raise FileNotFoundError(f"evaluate: no models in {root}: run `drray run pipeline` first, or name "
                                    f"checkpoints with --set evaluate.models=[teacher=DIR,...]")
    for path in chosen.values():
        classifier_meta(path)  # a clear error naming what to pass (a stage dir, an encoder, ...)
    return chosen


def labeled_targets(prepared: str, positive: str, split: str | None) -> dict[str, float]:
    """image_id -> binary target of the graded images of a prepared set (one split, or all)."""
    rows = read_index(prepared).to_pylist()
    return {r["image_id"]: float(binary_target(r["grade"], positive, r.get("dme"))) for r in rows
            if r["grade"] is not None and (split is None or r["split"] == split)}


def evaluation_sets(cfg: Config) -> dict[str, Selection]:
    """The sets every model is evaluated on (the data is prepared: see ``run``), each image with
    its target and its patient."""
    size, positive = cfg.data.size, cfg.data.positive

    def graded(prepared: str, split: str | None, targets: dict[str, float], patients: dict[str, str]) -> Selection:
        return Selection.clean(prepared, size, split=split, targets=targets, patients={i: patients[i] for i in targets})

    eyepacs = cfg.data.eyepacs.prepared
    patients = common.patients_of(eyepacs)
    validation = common.labeled_subset(cfg).validation  # empty with labels.validation 0: no operating point
    sets = {VALIDATION: graded(eyepacs, "train", validation, patients)} if validation else {}
    sets[EYEPACS_TEST] = graded(eyepacs, "test", labeled_targets(eyepacs, positive, "test"), patients)
    if cfg.data.external is not None:
        external = cfg.data.external.prepared
        sets[EXTERNAL] = graded(external, None, labeled_targets(external, positive, None), common.patients_of(external))
    empty = [name for name, sel in sets.items() if not sel.targets]
    if empty:
        raise ValueError(f"evaluate: no graded images in {', '.join(empty)}")
    return sets


def stage_dir(cfg: Config, models: dict[str, str], manifest: dict, external: dict | None,
              oof: dict[str, tuple[np.ndarray, np.ndarray]]) -> StageDir:
    """``<run.stages>/evaluate-<key>``: evaluate is the one stage whose key holds its inputs'
    content (the models it is given by hash, which any checkpoint folder can be, and the
    out-of-fold predictions it chooses thresholds on), not upstream keys."""
    oof_part = {m: stages.key_of(y.tolist(), p.tolist()) for m, (y, p) in oof.items()} or None  # None: the key of runs made before out-of-fold thresholds
    key = stages.key_of("evaluate", cfg.evaluate, stages.labels_part(cfg), models, stages.data_key(cfg, manifest),
                        external["content_hash"] if external else None, CONTRACT, *([oof_part] if oof_part else []))
    return StageDir(stages_dir(cfg).resolve() / f"evaluate-{key}")


def out_of_fold(cfg: Config, manifest: dict, hashes: dict[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """model -> (targets, probabilities) of its out-of-fold predictions on the budget (jobs.oof),
    for each evaluated model that is the full-budget model those folds stand for (by the hash of
    its weights); {} when oof.folds is 0. Raises when it is on and has not run."""
    if not cfg.oof.folds:
        return {}
    r = stages.resolve(cfg, manifest)["oof"]
    done = r.dir.done()
    if done is None:
        raise FileNotFoundError(f"evaluate: oof.folds is {cfg.oof.folds}, but the out-of-fold predictions are not "
                                f"made yet ({r.dir.path}): run `drray run oof` (or the pipeline) first")
    table = pq.read_table(r.dir.file(stages.OOF_PREDICTIONS)).to_pydict()
    out = {}
    for m, digest in hashes.items():
        if done["inputs"].get(m) != digest:
            if m in done["inputs"] or m in stages.oof_models(cfg):
                say("evaluate", f"{m}: not the model the out-of-fold predictions were made for: no threshold from them")
            continue
        rows = [i for i, name in enumerate(table["model"]) if name == m]
        out[m] = (np.asarray([table["target"][i] for i in rows], np.float32),
                  np.asarray([table["prob"][i] for i in rows], np.float32))
    return out


def run(cfg: Config) -> dict:
    prevalence = cfg.evaluate.prevalence
    if prevalence is not None and not 0 < prevalence < 1:
        raise ConfigError(f"key 'evaluate.prevalence': {prevalence!r} is out of range (allowed: (0, 1), or null)")
    manifest = common.prepared_eyepacs(cfg)
    external = ensure_prepared("external", cfg.data.external, cfg) if cfg.data.external else None
    models = models_of(cfg)
    hashes = {n: sha256_file(p / "model.pt") for n, p in models.items()}
    oof = out_of_fold(cfg, manifest, hashes)
    stage = stage_dir(cfg, hashes, manifest, external, oof)
    out = stage.path
    skipped = stage.is_done()
    if skipped:
        log.info("evaluate: complete in %s, skipped", out)
    else:
        _evaluate(cfg, models, out, oof)
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.copyfile(out / "metrics.json", run_dir(cfg) / "metrics.json")
    _store_operating_points(cfg, models, metrics)
    return {"stage": "evaluate", "dir": str(out), "skipped": skipped, "results": [
        {k: r[k] for k in ("model", "test_set", "unit", "n", "auc", "auc_ci")} for r in metrics["results"]]}


def _evaluate(cfg: Config, models: dict[str, Path], out: Path, oof: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    inference = Inference.of(cfg.evaluate, "evaluate", cfg.share)
    check_resources(inference, "evaluate")
    sets = evaluation_sets(cfg)
    say("evaluate", f"{len(models)} model(s) on " + ", ".join(f"{k} ({len(s.targets)})" for k, s in sets.items()))
    sample = tsne_sample(sets, cfg.evaluate.tsne_images, cfg.evaluate.seed)
    ds = predictions(sets, {n: str(p) for n, p in models.items()}, inference, features=sample)
    columns, features, undecodable = _collect(ds.iter_batches(batch_size=None, batch_format="numpy"), models)
    if undecodable:
        say("evaluate", f"warning: {len(undecodable)} test image(s) could not be decoded and are left out of "
                        f"every number (listed in metrics.json, 'undecodable'): "
                        + ", ".join(f"{r['test_set']}/{r['image_id']}" for r in undecodable[:5]))
    with atomic_directory(out, what="evaluation folder", legacy=EVALUATION_LEGACY) as tmp:
        _write_predictions(columns, models, tmp / "predictions.parquet")
        metrics = {**compute_metrics(columns, models, cfg, oof), "imageability": test_set_imageability(cfg),
                   "undecodable": undecodable}
        _figures(columns, models, metrics, cfg, tmp, features)
        atomic_write_json(tmp / "metrics.json", metrics)
        StageDir(tmp).write_done({"stage": "evaluate", "models": {n: str(p) for n, p in models.items()}})


def tsne_sample(sets: dict[str, Selection], images: int, seed: int) -> dict[str, frozenset[str]] | None:
    """The images whose penultimate features the t-SNE draws: a seeded sample of ``images`` of
    the t-SNE set, by image id (the same images in whatever order the predictions arrive), as
    :func:`drray.distributed.inference.predictions` takes it; None without a t-SNE."""
    if images == 0:
        return None
    name = _tsne_set(sets)
    ids = sorted(sets[name].targets)
    return {name: frozenset(ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:images])}


def _collect(batches, models) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[dict]]:
    """The prediction columns of every decoded row; the features of the rows that have them (the
    t-SNE sample, in image-id order: ``target`` and an (n, D) array per model; none without a
    t-SNE); and the rows whose image could not be decoded (image_id, test_set, reason)."""
    keep = ["image_id", "patient_id", "target", "test_set"] + [prob_column(m) for m in models]
    parts: dict[str, list] = {k: [] for k in keep}
    tsne: dict[str, list] = {"image_id": [], "target": [], **{m: [] for m in models}}
    undecodable = []
    for batch in batches:
        decoded = batch[DECODE_ERROR] == ""
        undecodable += [{"image_id": str(i), "test_set": str(t), "reason": str(e)} for i, t, e in
                        zip(*(batch[k][~decoded] for k in ("image_id", "test_set", DECODE_ERROR)), strict=True)]
        for k in keep:
            parts[k].append(batch[k][decoded])
        _add_features(tsne, batch, models)
    columns = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    order = np.argsort(np.asarray(tsne["image_id"], dtype=str), kind="stable")  # by id, not by arrival
    features = {"target": np.asarray(tsne["target"], np.float32)[order],
                **{m: np.stack(tsne[m])[order] if tsne[m] else np.zeros((0, 0), np.float32) for m in models}}
    return columns, features, undecodable


def _add_features(tsne: dict[str, list], batch: dict, models) -> None:
    """The batch's rows with features (the t-SNE sample's decoded rows; none without a t-SNE)."""
    if features_column(next(iter(models))) not in batch:
        return
    cells = {m: [features_of(c) for c in batch[features_column(m)]] for m in models}
    rows = [i for i, c in enumerate(cells[next(iter(models))]) if c.size]
    tsne["image_id"] += [batch["image_id"][i] for i in rows]
    tsne["target"] += [batch["target"][i] for i in rows]
    for m in models:
        tsne[m] += [cells[m][i] for i in rows]


def _write_predictions(columns: dict, models: dict, path: Path) -> None:
    tables = [pa.table({
        "image_id": columns["image_id"].astype(str), "patient_id": columns["patient_id"].astype(str),
        "target": columns["target"].astype(np.int8), "prob": columns[prob_column(m)].astype(np.float32), "model": [m] * len(columns["image_id"]),
        "test_set": columns["test_set"].astype(str),
    }) for m in models]
    pq.write_table(pa.concat_tables(tables), path)


def threshold_data(columns: dict, models: dict, oof: dict) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """Per model, what its thresholds are chosen on: (where, targets, probabilities). Never a
    test set: the validation images, else (labels.validation 0) the model's out-of-fold
    predictions on the budget. A model with neither, or with a single class there (a small
    budget's few validation images), gets none: no operating point, drray predict asks for
    --threshold."""
    validation = columns["test_set"] == VALIDATION
    chosen, refused = {}, set()
    for m in models:
        if validation.any():
            where, y, p = VALIDATION, columns["target"][validation], columns[prob_column(m)][validation]
        elif m in oof:
            where, (y, p) = OUT_OF_FOLD, oof[m]
        else:
            continue
        if 0 < y.sum() < y.size:
            chosen[m] = (where, y, p)
        else:
            refused.add((where, y.size))
    for where, n in sorted(refused):
        say("evaluate", f"no operating point fixed: the {n} images of the {where} are all of one class "
                        f"(give the budget more labels, or labels.validation a larger share)")
    return chosen


def compute_metrics(columns: dict, models: dict, cfg: Config, oof: dict | None = None) -> dict:
    """Every number of the evaluation, from the prediction columns: a row per model, test set
    and unit, and DeLong's test between every two models per test set and unit. ``oof``: model
    -> (targets, probabilities) out of fold, to choose thresholds on without validation images."""
    ev = cfg.evaluate
    chosen = threshold_data(columns, models, oof or {})
    wanted = sorted({*ev.sensitivities, ev.operating_sensitivity})
    thresholds = {m: {s: threshold_at_sensitivity(y, p, s) for s in wanted} for m, (_, y, p) in chosen.items()}
    thresholds |= {m: {} for m in models if m not in chosen}
    results, comparisons = [], []
    for test_set in dict.fromkeys(columns["test_set"].tolist()):
        classes = np.unique(columns["target"][columns["test_set"] == test_set])
        if len(classes) < 2:  # no AUC, no interval, no sensitivity: said, not computed
            say("evaluate", f"{test_set}: every image is {'referable' if classes[0] else 'not referable'}: "
                            f"no AUC or operating point can be measured on it")
            continue
        for unit in UNITS:
            y, clusters, probs = unit_columns(columns, models, test_set, unit)
            for m in models:
                results.append({"model": m, "test_set": test_set, "unit": unit,
                                **unit_result(y, probs[m], clusters, thresholds[m], ev, chosen.get(m, ("",))[0])})
            comparisons += _comparisons(y, clusters, probs, test_set, unit)
    # "validation_images": the images it was chosen on (the name drray predict has always read)
    operating = {m: {"name": point_name(ev.operating_sensitivity, where), "target_sensitivity": ev.operating_sensitivity,
                     "threshold": thresholds[m][ev.operating_sensitivity], "chosen_on": where,
                     "validation_images": int(y.size)} for m, (where, y, _) in chosen.items()}
    return {"contract": CONTRACT, "results": results, "delong": comparisons, "operating_points": operating,
            "bootstrap": {"resamples": ev.bootstrap, "seed": ev.seed, "level": 0.95, "resampled": "patients"},
            "calibration_bins": CALIBRATION_BINS, "prevalence": ev.prevalence, "methods": METHODS}


def _comparisons(y: np.ndarray, clusters: np.ndarray, probs: dict, test_set: str, unit: str) -> list[dict]:
    """DeLong's test (clustered) between every two models; none where the set has too few
    patients of a class for a variance (said in the log, and the report then judges nothing)."""
    out = []
    for a, b in itertools.combinations(probs, 2):
        try:
            test = clustered_delong_test(y, probs[a], probs[b], clusters)
        except ValueError as exc:
            log.warning("evaluate: no DeLong test on %s per %s: %s", test_set, unit, exc)
            return []
        out.append({"test_set": test_set, "unit": unit, "model_a": a, "model_b": b, **test})
    return out


def unit_columns(columns: dict, models: dict, test_set: str, unit: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """A test set's targets, each unit's patient (the clusters) and every model's scores: per
    image, or per patient (worse eye; each patient then its own cluster)."""
    chosen = columns["test_set"] == test_set
    y, patients = columns["target"][chosen], columns["patient_id"][chosen]
    probs = {m: columns[prob_column(m)][chosen] for m in models}
    if unit == IMAGE:
        return y, patients, probs
    ids, y, probs = worse_eye(patients, y, probs)
    return y, ids, probs


def unit_result(y: np.ndarray, p: np.ndarray, clusters: np.ndarray, thresholds: dict[float, float], ev,
                chosen_on: str = VALIDATION) -> dict:
    """One model on one test set at one unit."""
    lo, hi = bootstrap_auc_ci(y, p, ev.bootstrap, ev.seed, clusters=clusters)
    return {"n": int(len(y)), "positives": int(y.sum()), "patients": int(len(set(clusters.tolist()))),
            "auc": roc_auc(y, p), "auc_ci": [lo, hi], "brier": brier_score(y, p),
            "ece": expected_calibration_error(y, p, CALIBRATION_BINS),
            "reliability": reliability_bins(y, p, CALIBRATION_BINS),
            "operating_points": [operating_point(y, p, thresholds[s], s, clusters, ev.prevalence, chosen_on)  # the stored one too
                                 for s in dict.fromkeys([*ev.sensitivities, ev.operating_sensitivity])
                                 if s in thresholds]}


def point_name(target: float, chosen_on: str = VALIDATION) -> str:
    """An operating point as ``drray predict`` names it."""
    return f"{target:.0%} sensitivity on {chosen_on}"


def operating_point(targets: np.ndarray, probs: np.ndarray, threshold: float, target: float,
                    clusters: np.ndarray | None = None, prevalence: float | None = None,
                    chosen_on: str = VALIDATION) -> dict:
    """One operating point on a test set: sensitivity, specificity, PPV and NPV with the counts
    they are made of and their 95% Wilson intervals (a test set's few positives make them wide;
    over images, widened by how much a patient's images agree: :func:`clustered_wilson_interval`),
    and PPV and NPV at ``prevalence`` when one is given."""
    c = confusion_counts(targets, probs, threshold)
    positive, flagged = np.asarray(targets) == 1, np.asarray(probs) >= threshold
    clusters = np.arange(len(positive)) if clusters is None else np.asarray(clusters)

    def share(hits: np.ndarray, among: np.ndarray, level: float = 0.95) -> tuple[float | None, list[float]]:
        ci = list(clustered_wilson_interval(hits[among], clusters[among], level))
        return (float(hits[among].mean()) if among.any() else None), ci

    (sensitivity, sensitivity_ci), (specificity, specificity_ci) = share(flagged, positive), share(~flagged, ~positive)
    (ppv, ppv_ci), (npv, npv_ci) = share(positive, flagged), share(~positive, ~flagged)
    point = {"name": point_name(target, chosen_on), "target_sensitivity": target, "threshold": threshold,
             "sensitivity": sensitivity or 0.0, "specificity": specificity or 0.0,  # 0 without a positive / negative
             "ppv": ppv, "npv": npv, **c,  # None when nothing is flagged / passed
             "sensitivity_ci": sensitivity_ci, "specificity_ci": specificity_ci, "ppv_ci": ppv_ci, "npv_ci": npv_ci,
             "prevalence": prevalence}
    if prevalence is not None:
        # each at sqrt(0.95): the two hold together 95% of the time (positives and negatives are other units)
        level = 0.95 ** 0.5
        ppv_p, npv_p = predictive_values(point["sensitivity"], point["specificity"], prevalence)
        ppv_p_ci, npv_p_ci = predictive_value_intervals(share(flagged, positive, level)[1],
                                                        share(~flagged, ~positive, level)[1], prevalence)
        point.update(ppv_at_prevalence=ppv_p, ppv_at_prevalence_ci=ppv_p_ci,
                     npv_at_prevalence=npv_p, npv_at_prevalence_ci=npv_p_ci)
    return point


def test_set_imageability(cfg: Config) -> dict[str, dict]:
    """Per test set, the share of its input photographs that could be graded (its prepared
    set's manifest counts; drray.metrics.imageability says which reject kinds count)."""
    out = {EYEPACS_TEST: prepared_imageability(cfg.data.eyepacs.prepared, "test")}
    if cfg.data.external is not None:
        out[EXTERNAL] = prepared_imageability(cfg.data.external.prepared, None)
    return out


def prepared_imageability(prepared: str, split: str | None) -> dict:
    """Imageability of one split of a prepared set (None: all of it), and the split's prepared
    images without a grade (not evaluated). A rejects.parquet that records no split gives the
    whole set's imageability, and ``scope`` says so."""
    counts = read_manifest(prepared)["counts"]
    index = read_index(prepared, ["image_id", "grade", "split"]).to_pylist()
    in_split = [r for r in index if split is None or r["split"] == split]
    rejects = pq.read_table(Path(prepared) / "rejects.parquet")
    if split is not None and "split" in rejects.column_names:
        kinds = [k for k, s in zip(rejects.column("kind").to_pylist(), rejects.column("split").to_pylist(), strict=True)
                 if s == split]
        by_kind, scope, prepared_n = {k: kinds.count(k) for k in sorted(set(kinds))}, f"the {split} split", len(in_split)
    else:
        by_kind, prepared_n = counts["rejected_by_reason"], counts["prepared"]
        scope = "the whole prepared set" + (f" (its rejects record no split, so not the {split} split alone)"
                                            if split is not None else "")
    return {"prepared_dir": str(prepared), "scope": scope, "inputs": counts["inputs"],
            **imageability(prepared_n, by_kind), "ungraded": sum(r["grade"] is None for r in in_split)}


def _figures(columns: dict, models: dict, metrics: dict, cfg: Config, out: Path, features: dict) -> None:
    from drray.plots import reliability_figure, roc_figure, tsne_figure

    for test_set in dict.fromkeys(columns["test_set"].tolist()):
        if test_set == VALIDATION:
            continue
        chosen = columns["test_set"] == test_set
        rows = [r for r in metrics["results"] if r["test_set"] == test_set]
        curves = {r["model"]: {"targets": columns["target"][chosen], "probs": columns[prob_column(r["model"])][chosen],
                               "auc": r["auc"], "auc_ci": r["auc_ci"]} for r in rows if r["unit"] == IMAGE}
        roc_figure(curves, f"ROC, {test_set}", out / f"roc_{test_set}.png")
        panels = {f"per {unit}": {r["model"]: r["reliability"] for r in rows if r["unit"] == unit} for unit in UNITS}
        reliability_figure(panels, f"Reliability, {test_set}", out / f"reliability_{test_set}.png")
    if cfg.evaluate.tsne_images == 0:
        return
    tsne_set = _tsne_set(columns["test_set"])
    n = len(features["target"])
    if n < TSNE_MIN_IMAGES:  # its sample undecodable, or a tiny test set: no map to draw
        say("evaluate", f"no t-SNE figure: {n} image(s) of {tsne_set} have features (it needs {TSNE_MIN_IMAGES})")
        return
    panels = {m: (tsne(features[m], cfg.evaluate.seed), features["target"]) for m in models}
    tsne_figure(panels, f"t-SNE of penultimate features, {tsne_set} ({n} images)", out / "tsne.png")


TSNE_MIN_IMAGES = 5  # t-SNE's perplexity (at least 2 here) must stay below the number of points


def _tsne_set(sets) -> str:
    return EXTERNAL if EXTERNAL in set(sets) else EYEPACS_TEST


def tsne(features: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    return TSNE(2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(features)


def _store_operating_points(cfg: Config, models: dict[str, Path], metrics: dict) -> None:
    """The referable threshold goes with each published model (RUN/models/<name>/meta.json)."""
    published = (run_dir(cfg) / "models").resolve()
    for name, path in models.items():
        if path.parent != published:
            continue
        meta = read_meta(path)
        if name not in metrics["operating_points"]:  # no validation images: none fixed
            meta.pop("operating_point", None)
            atomic_write_json(path / "meta.json", meta)
            continue
        meta["operating_point"] = metrics["operating_points"][name]
        atomic_write_json(path / "meta.json", meta)
