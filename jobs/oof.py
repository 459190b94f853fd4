"""``drray run oof``: operating thresholds for a run without validation images.

With ``labels.validation: 0`` every label of the budget trains the models, and no image is left
to choose a threshold on; one chosen on a test set would spend a test label. Out-of-fold
predictions answer it the way cross-validation does: the budget is cut into ``oof.folds`` folds of
whole patients (stratified by grade, seeded by ``labels.seed``), each model is trained again
once per fold on the other folds (``labels.fold``), and fold j's model predicts fold j. The
pooled predictions, one per labeled image from a model that never saw its label, choose the
threshold evaluation applies to the model trained on the whole budget.

A model is retrained with every labeled stage before it: the student's fold j is the teacher of
fold j, its pseudo-labels, distillation and fine-tuning (its full-budget teacher saw fold j's
labels, so a student distilled from it would predict fold j too well). Stages that read no
label (the SimCLR pretraining) are shared. Each fold stage is an ordinary keyed stage, skipped
when done. Written to ``<run.stages>/oof-<key>/``:

    oof_predictions.parquet  image_id, patient_id, target (int8), prob (float32), model, fold
    done.json                the folds, and per model the hash of the full-budget model the
                             predictions stand for (evaluation uses them for that model only)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from drray.config import Config
from drray.distributed.datasets import Selection
from drray.distributed.inference import (
    DECODE_ERROR,
    Inference,
    check_resources,
    predictions,
    prob_column,
)
from drray.progress import say
from jobs import common, stages


def run(cfg: Config) -> dict:
    if not cfg.oof.folds:
        return {"stage": "oof", "status": "not configured"}
    manifest = common.prepared_eyepacs(cfg)
    whole = stages.resolve(cfg, manifest)
    r = whole["oof"]
    if done := common.finished(cfg, r):
        return done
    names = stages.oof_models(cfg)
    missing = [n for n in names if not whole[n].dir.is_done()]
    if missing:
        raise FileNotFoundError(f"oof: {', '.join(missing)} not trained on the whole budget yet: run `drray run "
                                f"{missing[0]}` (or the pipeline) with the same config first")
    k = cfg.oof.folds
    heldout, models = {}, {}
    for j in range(k):
        fold_cfg = stages.fold_config(cfg, j)
        say("oof", f"fold {j + 1}/{k}: {', '.join(names)} on the budget less fold {j + 1}")
        heldout[j] = common.labeled_subset(fold_cfg).heldout
        resolved = stages.resolve(fold_cfg, manifest)
        for name in names:
            for step in stages.chain_of(fold_cfg, name):
                stages.STAGES[step].function()(fold_cfg)
            models[(name, j)] = str(resolved[name].dir.final_model())
    common.start_stage(cfg, r.dir)
    table = predict_folds(cfg, heldout, models)
    tmp = r.dir.file(f".{stages.OOF_PREDICTIONS}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(r.dir.file(stages.OOF_PREDICTIONS))
    common.finish_stage(cfg, r, {"folds": k, "models": list(names), "images": table.num_rows // max(1, len(names))})
    return {"stage": "oof", "dir": str(r.dir.path)}


def predict_folds(cfg: Config, heldout: dict[int, dict[str, float]], models: dict[tuple[str, int], str]) -> pa.Table:
    """Every fold's held-out images predicted by the models of that fold, in one pipeline: the
    rows of the table evaluation chooses thresholds on. An image that cannot be decoded has no
    prediction; it is named on the console (training skipped it too)."""
    patients = common.patients_of(cfg.data.eyepacs.prepared)
    sets = {f"fold-{j}": Selection.clean(cfg.data.eyepacs.prepared, cfg.data.size, split="train", targets=targets,
                                         patients={i: patients[i] for i in targets})
            for j, targets in heldout.items() if targets}
    column = {(name, j): f"{name}.fold{j}" for name, j in models}
    inference = Inference.of(cfg.evaluate, "evaluate", cfg.share)
    check_resources(inference, "evaluate")
    ds = predictions(sets, {column[m]: path for m, path in models.items()}, inference)
    rows: dict[str, list] = {k: [] for k in ("image_id", "patient_id", "target", "prob", "model", "fold")}
    undecodable = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        decoded = batch[DECODE_ERROR] == ""
        undecodable += list(batch["image_id"][~decoded])
        fold = np.asarray([int(t.removeprefix("fold-")) for t in batch["test_set"]])
        for (name, j), col in column.items():
            chosen = decoded & (fold == j)
            n = int(chosen.sum())
            rows["image_id"] += batch["image_id"][chosen].astype(str).tolist()
            rows["patient_id"] += batch["patient_id"][chosen].astype(str).tolist()
            rows["target"] += batch["target"][chosen].astype(np.int8).tolist()
            rows["prob"] += batch[prob_column(col)][chosen].astype(np.float32).tolist()
            rows["model"] += [name] * n
            rows["fold"] += [j] * n
    if undecodable:
        say("oof", f"warning: {len(set(undecodable))} held-out image(s) could not be decoded and have no "
                   f"out-of-fold prediction: {', '.join(sorted(set(map(str, undecodable)))[:5])}")
    return pa.table({"image_id": rows["image_id"], "patient_id": rows["patient_id"],
                     "target": pa.array(rows["target"], pa.int8()), "prob": pa.array(rows["prob"], pa.float32()),
                     "model": rows["model"], "fold": pa.array(rows["fold"], pa.int16())}).sort_by(
        [("model", "ascending"), ("image_id", "ascending")])

