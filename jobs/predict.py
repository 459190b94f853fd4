"""``drray predict``: screening raw fundus photographs with a trained model.

Each image goes through the preprocessing the model was trained with (stored with the
published model: fundus detection, centring, crop, resize), then the model. Every file gets a
row with a ``decision``: "refer" / "no referral" (``prob`` >= the operating point's threshold),
"ungradable: retake or refer" for a photograph that cannot be read or shows no usable fundus
(``status`` = the reject kind, ``reason`` says why: never a silent negative), or "not a
photograph" for a file that is not an image. Every row names the operating point and the model
(its folder and the SHA-256 of its weights), so a decision can be traced later; ``warning``
flags grayscale and red-free photographs, which the models were not trained on. Runs in this
process (a folder from a clinic); for pools of hundreds of thousands, use the Ray jobs.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from drray.artifacts import NotOurOutput, sha256_file
from drray.data.prepare import PrepareParams, prepare_rows
from drray.data.sources import list_input_files, printable
from drray.data.splits import patient_of, read_patients
from drray.data.transforms import decode_to_tensor
from drray.engine.checkpoint import classifier_meta
from drray.progress import Progress

log = logging.getLogger(__name__)
SCHEMA = pa.schema([("image_id", pa.string()), ("patient_id", pa.string()), ("path", pa.string()),
                    ("decision", pa.string()),
                    ("prob", pa.float32()), ("referable", pa.bool_()), ("threshold", pa.float32()),
                    ("operating_point", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                    ("warning", pa.string()), ("model", pa.string()), ("model_sha256", pa.string())])
# Tables written by earlier drray versions: --out may replace them (they are drray's).
EARLIER_COLUMNS = (["image_id", "path", "prob", "referable", "threshold", "status", "reason"],)
# One row per patient (worse eye), beside the per-image table: OUT.patients.csv / .parquet.
PATIENT_SCHEMA = pa.schema([("patient_id", pa.string()), ("decision", pa.string()), ("images", pa.int32()),
                            ("graded", pa.int32()), ("ungradable", pa.int32()), ("max_prob", pa.float32()),
                            ("worse_image", pa.string()), ("threshold", pa.float32()),
                            ("operating_point", pa.string()), ("model", pa.string()), ("model_sha256", pa.string())])
FORMATS = (".csv", ".parquet")
REFER, NO_REFERRAL, UNGRADABLE = "refer", "no referral", "ungradable: retake or refer"
NOT_A_PHOTOGRAPH = "not a photograph: no decision"
REFER_UNGRADABLE = "refer: ungradable"  # a patient with an eye that could not be graded
# Below this mean spread between colour channels (of 255) a photograph carries no colour.
GRAYSCALE_CHROMA = 8.0


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    name: str  # written in every row: which cut-off made the decision
    source: str  # for the console: where it came from


def operating_point(meta: dict, override: float | None) -> OperatingPoint:
    """The referable cut-off on the model's probability: the flag's, else the model's own."""
    if override is not None:
        return OperatingPoint(override, f"--threshold {override:g}", "--threshold")
    point = meta.get("operating_point")
    if point:
        name = f"{point['target_sensitivity']:.0%} sensitivity on {point.get('chosen_on', 'validation')}"
        return OperatingPoint(float(point["threshold"]), name,
                              f"the model's operating point ({name}, {point['validation_images']} images)")
    return OperatingPoint(0.5, "untuned 0.5", "0.5: the model has no stored operating point (evaluate it with "
                                               "`drray run evaluate`, or pass --threshold)")


def preprocessing_of(meta: dict) -> PrepareParams:
    stored = meta.get("preprocessing")
    if stored:
        return PrepareParams(**stored)
    log.warning("the model stores no preprocessing; using the defaults at its input size %d px "
                "(publish models with `drray run pipeline` to keep them together)", meta["spec"]["image_size"])
    return PrepareParams(size=meta["spec"]["image_size"])


@dataclass(frozen=True)
class ModelIdentity:
    path: str
    sha256: str  # of model.pt: the weights that made the decision, checkable later


def run(model_dir: Path, images: Path, out: Path, batch_size: int = 32, threshold: float | None = None,
        patients: Path | None = None) -> dict:
    import torch

    from drray.engine.checkpoint import MODEL_FILE, load_model

    if out.suffix not in FORMATS:
        raise ValueError(f"--out {out}: write .csv or .parquet")
    check_out_file(out, SCHEMA)
    check_out_file(patients_path(out), PATIENT_SCHEMA)
    patient_map = read_patients(patients) if patients else None
    meta = classifier_meta(model_dir)
    point = operating_point(meta, threshold)
    params = preprocessing_of(meta)
    files = list_input_files(images, exclude=[out, patients_path(out)] + ([patients] if patients else []))  # --out may sit in the folder it screens
    if not files:
        raise FileNotFoundError(f"--images {images}: no files found (hidden files aside)")
    identity = ModelIdentity(str(model_dir.resolve()), sha256_file(model_dir / MODEL_FILE))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(model_dir, device)
    model.eval()
    rows, progress = [], Progress("predict")
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        # paths as bytes: a file name that is not UTF-8 cannot travel as an Arrow string
        prepared = prepare_rows([{"image_id": printable(p.stem), "path": bytes(p)} for p in chunk],
                                params).to_pylist()
        rows += _screen(model, prepared, device, point, identity, images)
        progress(len(rows), len(files))
    for row in rows:
        row["patient_id"] = patient_of(row["image_id"], patient_map)
    by_patient = patient_decisions(rows, point)
    _write(pa.Table.from_pylist(rows, schema=SCHEMA), out)
    _write(pa.Table.from_pylist(by_patient, schema=PATIENT_SCHEMA), patients_path(out))
    return {**_summary(rows, out, point), "patients": dict(Counter(p["decision"] for p in by_patient)),
            "patients_out": str(patients_path(out))}


def patients_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.patients{out.suffix}")


def patient_decisions(rows: list[dict], point: OperatingPoint) -> list[dict]:
    """One decision per patient, from the worse eye: refer when any graded image refers; a
    patient with an image that could not be graded is never cleared ("refer: ungradable"), as
    screening programmes do; only then "no referral". Files that are not photographs do not count."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["decision"] != NOT_A_PHOTOGRAPH:
            groups.setdefault(row["patient_id"], []).append(row)
    out = []
    for patient, images in sorted(groups.items()):
        graded = [r for r in images if r["prob"] is not None]
        worse = max(graded, key=lambda r: r["prob"], default=None)
        ungradable = len(images) - len(graded)
        if worse is not None and worse["decision"] == REFER:
            decision = REFER
        else:
            decision = REFER_UNGRADABLE if ungradable else NO_REFERRAL
        out.append({"patient_id": patient, "decision": decision, "images": len(images), "graded": len(graded),
                    "ungradable": ungradable, "max_prob": worse["prob"] if worse else None,
                    "worse_image": worse["image_id"] if worse else None, "threshold": point.threshold,
                    "operating_point": point.name, "model": images[0]["model"],
                    "model_sha256": images[0]["model_sha256"]})
    return out


def _screen(model, prepared: list[dict], device, point: OperatingPoint, identity: ModelIdentity,
            images: Path) -> list[dict]:
    """One output row per prepared row: a decision for every image, graded or not."""
    from drray.engine.predict import predict_batch

    good = [r for r in prepared if r["kind"] is None]
    pixels = [decode_to_tensor(r["image"]).numpy() for r in good]
    probs = predict_batch(model, np.stack(pixels), device=device, dtype=None)[0].tolist() if good else []
    graded = {id(r): (p, colour_warning(x)) for r, p, x in zip(good, probs, pixels, strict=True)}
    rows = []
    for r in prepared:
        prob, warning = graded.get(id(r), (None, None))
        rows.append({"image_id": r["image_id"], "path": str(Path(r["path"]).relative_to(printable(str(images)))),
                     "decision": _decision(prob, r["kind"], point.threshold), "prob": prob,
                     "referable": None if prob is None else prob >= point.threshold,
                     "threshold": point.threshold, "operating_point": point.name, "status": r["kind"] or "ok",
                     "reason": r["reason"], "warning": warning, "model": identity.path,
                     "model_sha256": identity.sha256})
    return rows


def _decision(prob: float | None, kind: str | None, threshold: float) -> str:
    """What the clinic does with the image: a photograph that cannot be graded is never negative."""
    if prob is not None:
        return REFER if prob >= threshold else NO_REFERRAL
    return NOT_A_PHOTOGRAPH if kind == "unsupported_format" else UNGRADABLE


def colour_warning(image: np.ndarray) -> str | None:
    """A warning for a grayscale or red-free photograph (uint8 CHW): the models are trained on
    colour fundus photographs, in which red dominates; without colour their probability is not
    to be trusted. Only fundus pixels count (the masked border is black)."""
    rgb = image.reshape(3, -1).astype(np.float32)
    lit = rgb.max(axis=0) > 20
    if lit.sum() < 0.05 * rgb.shape[1]:
        return None  # too little fundus to judge: the preparation passed it, so it is not dark
    red, green, _ = rgb[:, lit].mean(axis=1)
    chroma = float((rgb[:, lit].max(axis=0) - rgb[:, lit].min(axis=0)).mean())
    if chroma < GRAYSCALE_CHROMA:
        return "grayscale photograph: the model was trained on colour photographs; grade this image by hand"
    if red < 0.5 * green:
        return "red-free (green) photograph: the model was trained on colour photographs; grade this image by hand"
    return None


def check_out_file(out: Path, schema: pa.Schema) -> None:
    """An output may be new or a table an earlier ``drray predict`` wrote (its exact columns);
    anything else there is the user's, and is never overwritten."""
    if not out.exists() and not out.is_symlink():
        return
    earlier = EARLIER_COLUMNS if schema is SCHEMA else ()
    if out.is_file() and not out.is_symlink() and _columns(out) in (schema.names, *earlier):
        return
    raise NotOurOutput(f"{out} exists and is not a table drray predict wrote: choose another --out "
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


def _summary(rows: list[dict], out: Path, point: OperatingPoint) -> dict:
    decisions = Counter(r["decision"] for r in rows)
    return {"out": str(out), "images": len(rows), "referable": decisions[REFER], "not_referable": decisions[NO_REFERRAL],
            "ungradable": decisions[UNGRADABLE], "not_photographs": decisions[NOT_A_PHOTOGRAPH],
            "not_graded": dict(Counter(r["status"] for r in rows if r["status"] != "ok")),
            "warnings": sum(r["warning"] is not None for r in rows),
            "threshold": point.threshold, "threshold_source": point.source,
            "model": rows[0]["model"] if rows else None, "model_sha256": rows[0]["model_sha256"] if rows else None}
