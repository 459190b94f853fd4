"""``drray predict``: screening raw fundus photographs with a trained model.

Each image goes through the preprocessing the model was trained with (stored with the
published model: fundus detection, centring, crop, resize), then the model. Every image gets a
row: ``prob`` and ``referable`` (prob >= the model's operating threshold), or, for an image that
cannot be read or shows no fundus, ``status`` (the reject kind) and ``reason``. Runs in this
process (a folder from a clinic); for pools of hundreds of thousands, use the Ray jobs.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from drray.artifacts import NotOurOutput
from drray.data.prepare import PrepareParams, prepare_rows
from drray.data.sources import list_image_files
from drray.data.transforms import decode_to_tensor
from drray.engine.checkpoint import read_meta
from drray.progress import Progress

log = logging.getLogger(__name__)
SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("prob", pa.float32()),
                    ("referable", pa.bool_()), ("threshold", pa.float32()), ("status", pa.string()),
                    ("reason", pa.string())])
FORMATS = (".csv", ".parquet")


def operating_threshold(meta: dict, override: float | None) -> tuple[float, str]:
    """(threshold, where it came from): the flag's cut-off on the model's probability."""
    if override is not None:
        return override, "--threshold"
    point = meta.get("operating_point")
    if point:
        return float(point["threshold"]), (f"the model's operating point ({point['target_sensitivity']:.0%} "
                                           f"sensitivity on {point['validation_images']} validation images)")
    return 0.5, "0.5 (the model has no stored operating point: evaluate it with `drray run evaluate`)"


def preprocessing_of(meta: dict) -> PrepareParams:
    stored = meta.get("preprocessing")
    if stored:
        return PrepareParams(**stored)
    log.warning("the model stores no preprocessing; using the defaults at its input size %d px "
                "(publish models with `drray run pipeline` to keep them together)", meta["spec"]["image_size"])
    return PrepareParams(size=meta["spec"]["image_size"])


def run(model_dir: Path, images: Path, out: Path, batch_size: int = 32, threshold: float | None = None) -> dict:
    import torch

    from drray.engine.checkpoint import load_model
    from drray.engine.loop import predict_batch

    if out.suffix not in FORMATS:
        raise ValueError(f"--out {out}: write .csv or .parquet")
    check_out_file(out)
    meta = read_meta(model_dir)
    cut, source = operating_threshold(meta, threshold)
    params = preprocessing_of(meta)
    files = list_image_files(images)
    if not files:
        raise FileNotFoundError(f"--images {images}: no image files (.jpeg/.jpg/.png/.tif/.tiff/.bmp) found")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(model_dir, device)
    model.eval()
    rows, progress = [], Progress("predict")
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        prepared = prepare_rows([{"image_id": p.stem, "path": str(p)} for p in chunk], params).to_pylist()
        good = [r for r in prepared if r["kind"] is None]
        probs = np.zeros(0, np.float32)
        if good:
            batch = np.stack([decode_to_tensor(r["image"]).numpy() for r in good])
            probs, _ = predict_batch(model, batch, device=device, dtype=None)
        prob_of = dict(zip((r["path"] for r in good), probs.tolist(), strict=True))
        for r in prepared:
            p = prob_of.get(r["path"])
            rows.append({"image_id": r["image_id"], "path": str(Path(r["path"]).relative_to(images)), "prob": p,
                         "referable": None if p is None else p >= cut, "threshold": cut,
                         "status": r["kind"] or "ok", "reason": r["reason"]})
        progress(len(rows), len(files))
    _write(pa.Table.from_pylist(rows, schema=SCHEMA), out)
    return _summary(rows, out, source)


def check_out_file(out: Path) -> None:
    """``--out`` may be new or a table an earlier ``drray predict`` wrote (its exact columns);
    anything else there is the user's, and is never overwritten."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_file() and not out.is_symlink() and _columns(out) == SCHEMA.names:
        return
    raise NotOurOutput(f"--out {out} exists and is not a table drray predict wrote: choose a new file name "
                       f"(drray never overwrites a file it did not write)")


def _columns(path: Path) -> list[str] | None:
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path).names
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, pa.ArrowException, csv.Error):
        return None


def _write(table: pa.Table, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".csv":
        pacsv.write_csv(table, tmp)
    else:
        pq.write_table(table, tmp)
    tmp.replace(out)


def _summary(rows: list[dict], out: Path, threshold_source: str) -> dict:
    from collections import Counter

    graded = [r for r in rows if r["status"] == "ok"]
    return {"out": str(out), "images": len(rows), "referable": sum(r["referable"] for r in graded),
            "not_referable": sum(not r["referable"] for r in graded),
            "not_graded": dict(Counter(r["status"] for r in rows if r["status"] != "ok")),
            "threshold": rows[0]["threshold"] if rows else None, "threshold_source": threshold_source}
