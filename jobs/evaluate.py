"""``drray run evaluate``: how good is each model, and how sure are we.

Every model (``evaluate.models``, or every model in ``RUN/models``) predicts on the validation
hold-out, the EyePACS-style test split and the external (Messidor-2-style) set in one Ray Data
pipeline. Written to ``RUN/evaluate-<key>/`` (and ``RUN/metrics.json``):

    predictions.parquet  image_id, target (int8), prob (float32), model, test_set
    metrics.json         per model and test set: n, positives, AUC with a 95% bootstrap CI,
                         sensitivity/specificity at operating points chosen on validation data
                         (with tp, fn, tn, fp and 95% Wilson intervals);
                         DeLong's test between every two models on the same images
    roc_<set>.png        ROC curves, every model overlaid
    tsne.png             t-SNE of penultimate-layer features on the external set (the paper's
                         Figure 4: Messidor-2), or the EyePACS test split without one

The operating threshold (``evaluate.operating_sensitivity`` on validation) is stored in each
``RUN/models/<name>/meta.json`` for ``drray predict``.
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
from drray.config import Config, run_dir, stages_dir
from drray.data.shards import read_index
from drray.data.splits import binary_target
from drray.distributed.datasets import Selection
from drray.distributed.inference import (
    Inference,
    check_resources,
    features_column,
    predictions,
    prob_column,
)
from drray.distributed.prepare import ensure_prepared
from drray.engine.checkpoint import classifier_meta, read_meta
from drray.metrics import (
    bootstrap_auc_ci,
    confusion_counts,
    delong_test,
    roc_auc,
    sensitivity_specificity,
    threshold_at_sensitivity,
    wilson_interval,
)
from drray.progress import say
from jobs import common, stages

log = logging.getLogger(__name__)
# An evaluation folder written before drray marked its output folders (see drray.artifacts).
EVALUATION_LEGACY = Legacy("metrics.json", frozenset({"metrics.json", "predictions.parquet", "*.png", "done.json"}))
VALIDATION, EYEPACS_TEST, EXTERNAL = "validation", "eyepacs_test", "external"


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
    return {r["image_id"]: float(binary_target(r["grade"], positive)) for r in rows
            if r["grade"] is not None and (split is None or r["split"] == split)}


def evaluation_sets(cfg: Config) -> dict[str, Selection]:
    """The sets every model is evaluated on (the data is prepared: see ``run``)."""
    size, positive = cfg.data.size, cfg.data.positive
    eyepacs = cfg.data.eyepacs.prepared
    sets = {VALIDATION: Selection.clean(eyepacs, size, split="train", targets=common.labeled_subset(cfg).validation),
            EYEPACS_TEST: Selection.clean(eyepacs, size, split="test", targets=labeled_targets(eyepacs, positive, "test"))}
    if cfg.data.external is not None:
        external = cfg.data.external.prepared
        sets[EXTERNAL] = Selection.clean(external, size, split=None, targets=labeled_targets(external, positive, None))
    empty = [name for name, sel in sets.items() if not sel.targets]
    if empty:
        raise ValueError(f"evaluate: no graded images in {', '.join(empty)}")
    return sets


def stage_dir(cfg: Config, models: dict[str, Path], manifest: dict, external: dict | None) -> StageDir:
    """``<run.stages>/evaluate-<key>``: evaluate is the one stage whose key holds its inputs'
    content (the models it is given, which any checkpoint folder can be), not upstream keys."""
    key = stages.key_of("evaluate", cfg.evaluate, cfg.labels, {n: sha256_file(p / "model.pt") for n, p in models.items()},
                        stages.data_key(cfg, manifest), external["content_hash"] if external else None)
    return StageDir(stages_dir(cfg).resolve() / f"evaluate-{key}")


def run(cfg: Config) -> dict:
    manifest = common.prepared_eyepacs(cfg)
    external = ensure_prepared("external", cfg.data.external, cfg) if cfg.data.external else None
    models = models_of(cfg)
    stage = stage_dir(cfg, models, manifest, external)
    out = stage.path
    skipped = stage.is_done()
    if skipped:
        log.info("evaluate: complete in %s, skipped", out)
    else:
        _evaluate(cfg, models, out)
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.copyfile(out / "metrics.json", run_dir(cfg) / "metrics.json")
    _store_operating_points(cfg, models, metrics)
    return {"stage": "evaluate", "dir": str(out), "skipped": skipped, "results": [
        {k: r[k] for k in ("model", "test_set", "n", "auc", "auc_ci")} for r in metrics["results"]]}


def _evaluate(cfg: Config, models: dict[str, Path], out: Path) -> None:
    inference = Inference.of(cfg.evaluate)
    check_resources(inference, "evaluate")
    sets = evaluation_sets(cfg)
    say("evaluate", f"{len(models)} model(s) on " + ", ".join(f"{k} ({len(s.targets)})" for k, s in sets.items()))
    ds = predictions(sets, {n: str(p) for n, p in models.items()}, inference, features=cfg.evaluate.tsne_images > 0)
    columns = _collect(ds.iter_batches(batch_size=None, batch_format="numpy"), models, _tsne_set(sets))
    with atomic_directory(out, what="evaluation folder", legacy=EVALUATION_LEGACY) as tmp:
        _write_predictions(columns, models, tmp / "predictions.parquet")
        metrics = compute_metrics(columns, models, cfg)
        _figures(columns, models, metrics, cfg, tmp)
        atomic_write_json(tmp / "metrics.json", metrics)
        StageDir(tmp).write_done({"stage": "evaluate", "models": {n: str(p) for n, p in models.items()}})


def _collect(batches, models, tsne_set: str) -> dict[str, np.ndarray]:
    keep = ["image_id", "target", "test_set"] + [prob_column(m) for m in models]
    parts: dict[str, list] = {k: [] for k in keep}
    for batch in batches:
        tests = batch["test_set"] == tsne_set  # features only where the t-SNE needs them
        for k in keep:
            parts[k].append(batch[k])
        for m in models:
            if features_column(m) in batch:  # absent without a t-SNE
                parts.setdefault(features_column(m), []).append(batch[features_column(m)][tests])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def _write_predictions(columns: dict, models: dict, path: Path) -> None:
    tables = [pa.table({
        "image_id": columns["image_id"].astype(str), "target": columns["target"].astype(np.int8),
        "prob": columns[prob_column(m)].astype(np.float32), "model": [m] * len(columns["image_id"]),
        "test_set": columns["test_set"].astype(str),
    }) for m in models]
    pq.write_table(pa.concat_tables(tables), path)


def compute_metrics(columns: dict, models: dict, cfg: Config) -> dict:
    """Every number of the evaluation, from the prediction columns."""
    ev = cfg.evaluate
    sets = [s for s in dict.fromkeys(columns["test_set"].tolist())]
    of = {s: columns["test_set"] == s for s in sets}
    y_val = columns["target"][of[VALIDATION]]
    targets = sorted({*ev.sensitivities, ev.operating_sensitivity})
    thresholds = {m: {s: threshold_at_sensitivity(y_val, columns[prob_column(m)][of[VALIDATION]], s) for s in targets}
                  for m in models}
    results, comparisons = [], []
    for test_set in sets:
        y = columns["target"][of[test_set]]
        for m in models:
            p = columns[prob_column(m)][of[test_set]]
            auc = roc_auc(y, p)
            lo, hi = bootstrap_auc_ci(y, p, ev.bootstrap, ev.seed)
            points = [operating_point(y, p, thresholds[m][s], s) for s in ev.sensitivities]
            results.append({"model": m, "test_set": test_set, "n": int(len(y)), "positives": int(y.sum()),
                            "auc": auc, "auc_ci": [lo, hi], "operating_points": points})
        for a, b in itertools.combinations(models, 2):
            test = delong_test(y, columns[prob_column(a)][of[test_set]], columns[prob_column(b)][of[test_set]])
            comparisons.append({"test_set": test_set, "model_a": a, "model_b": b, **test})
    operating = {m: {"threshold": thresholds[m][ev.operating_sensitivity], "target_sensitivity":
                     ev.operating_sensitivity, "chosen_on": VALIDATION, "validation_images": int(of[VALIDATION].sum())}
                 for m in models}
    return {"results": results, "delong": comparisons, "operating_points": operating,
            "bootstrap": {"resamples": ev.bootstrap, "seed": ev.seed, "level": 0.95}}


def operating_point(targets: np.ndarray, probs: np.ndarray, threshold: float, target: float) -> dict:
    """One operating point on a test set: sensitivity and specificity with the counts they are
    made of and their 95% Wilson intervals (a test set's few positives make them wide)."""
    c = confusion_counts(targets, probs, threshold)
    sensitivity, specificity = sensitivity_specificity(targets, probs, threshold)
    return {"target_sensitivity": target, "threshold": threshold, "sensitivity": sensitivity,
            "specificity": specificity, **c, "sensitivity_ci": list(wilson_interval(c["tp"], c["tp"] + c["fn"])),
            "specificity_ci": list(wilson_interval(c["tn"], c["tn"] + c["fp"]))}


def _figures(columns: dict, models: dict, metrics: dict, cfg: Config, out: Path) -> None:
    from drray.plots import roc_figure, tsne_figure

    for test_set in dict.fromkeys(columns["test_set"].tolist()):
        if test_set == VALIDATION:
            continue
        chosen = columns["test_set"] == test_set
        curves = {r["model"]: {"targets": columns["target"][chosen], "probs": columns[prob_column(r["model"])][chosen],
                               "auc": r["auc"], "auc_ci": r["auc_ci"]}
                  for r in metrics["results"] if r["test_set"] == test_set}
        roc_figure(curves, f"ROC, {test_set}", out / f"roc_{test_set}.png")
    if cfg.evaluate.tsne_images == 0:
        return
    tsne_set = _tsne_set(columns["test_set"])
    targets = columns["target"][columns["test_set"] == tsne_set]
    sample = np.random.default_rng(cfg.evaluate.seed).permutation(len(targets))[: cfg.evaluate.tsne_images]
    panels = {m: (tsne(columns[features_column(m)][sample], cfg.evaluate.seed), targets[sample]) for m in models}
    tsne_figure(panels, f"t-SNE of penultimate features, {tsne_set} ({len(sample)} images)", out / "tsne.png")


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
        meta["operating_point"] = metrics["operating_points"][name]
        atomic_write_json(path / "meta.json", meta)
