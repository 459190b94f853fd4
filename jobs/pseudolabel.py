"""Between stages 2 and 3, ``drray run pseudolabel``: the teacher labels every image of the
unlabeled pool, as a Ray Data batch-inference job.

Output: ``<run.stages>/pseudolabel-<key>/pseudolabels.parquet`` (the key: the teacher's key, the
threshold, the data), one row per pool image, ``image_id`` (string), ``prob`` (float32), ``label``
(int8, prob >= threshold), with file metadata (key ``drray``) naming the teacher checkpoint and its
hash, the pool and its preprocessing, and the threshold. The table is written aside and renamed
into place when every pool image has its row, then ``done.json``: a killed job leaves nothing that
distillation would trust, and a finished stage is skipped like every other.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import drray
from drray.artifacts import StageDir, clean_stale_temporaries, sha256_file
from drray.config import Config
from drray.distributed.datasets import Selection
from drray.distributed.inference import Inference, check_resources, predictions, prob_column
from drray.progress import Progress, say
from jobs import common, stages

log = logging.getLogger(__name__)
SCHEMA = pa.schema([("image_id", pa.string()), ("prob", pa.float32()), ("label", pa.int8())])
METADATA_KEY = b"drray"


def teacher_checkpoint(r: stages.Resolved) -> Path:
    teacher = StageDir(r.upstream["teacher"])
    if not teacher.is_done():
        raise FileNotFoundError(f"pseudolabel: no finished teacher in {teacher.path}; run `drray run teacher` "
                                f"with the same config first")
    return teacher.final_model()


def provenance(cfg: Config, manifest: dict, teacher: Path) -> dict:
    """What the table was made from (its Parquet metadata)."""
    return {
        "teacher": str(teacher), "teacher_sha256": sha256_file(teacher / "model.pt"),
        "pool": str(Path(cfg.data.eyepacs.prepared).resolve()), "pool_split": "train",
        "pool_content_hash": manifest["content_hash"], "preprocessing": manifest["params"],
        "threshold": cfg.pseudolabel.threshold,
    }


def read_provenance(path: Path) -> dict | None:
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None


def run(cfg: Config) -> dict:
    manifest, r = common.resolved(cfg, "pseudolabel")
    out = r.dir.file(stages.PSEUDOLABELS)
    if common.finished(cfg, r):
        return {"stage": "pseudolabel", "path": str(out), "skipped": True, **_summary(out)}
    teacher = teacher_checkpoint(r)
    inference = Inference.of(cfg.pseudolabel)
    check_resources(inference, "pseudolabel")
    common.start_stage(cfg, r.dir)
    clean_stale_temporaries(out)
    started = time.monotonic()
    written = _write(out, cfg, provenance(cfg, manifest, teacher), common.pool_ids(cfg), inference)
    seconds = time.monotonic() - started
    log.info("pseudolabel: %d images in %.1f s -> %s", written, seconds, out)
    summary = _summary(out)
    common.finish_stage(cfg, r, {"summary": summary, "seconds": round(seconds, 2)})
    _warn_if_uninformative(cfg, summary)
    return {"stage": "pseudolabel", "path": str(out), "skipped": False, **summary,
            "seconds": round(seconds, 2), "images_per_s": round(written / max(seconds, 1e-9), 1)}


def _warn_if_uninformative(cfg: Config, summary: dict) -> None:
    """Hard pseudo-labels that are (nearly) all one class teach the student nothing: say so."""
    labeled = list(common.labeled_subset(cfg).labeled.values())
    prior = sum(labeled) / max(len(labeled), 1)
    rate = summary["positives"] / max(summary["images"], 1)
    if cfg.distill.targets == "hard" and prior > 0 and not prior / 4 <= rate <= min(1.0, prior * 4):
        say("pseudolabel", f"warning: {rate:.1%} of the pool is labeled referable at threshold "
              f"{cfg.pseudolabel.threshold} against {prior:.1%} of the labeled subset: hard pseudo-labels this "
              f"lopsided carry little for the student (consider --set distill.targets=soft, or a threshold "
              f"nearer the teacher's operating point)")


def _write(out: Path, cfg: Config, provenance_: dict, pool: list[str], inference: Inference) -> int:
    """Stream predictions into a temporary table; rename it into place when it is complete."""
    selection = Selection.clean(cfg.data.eyepacs.prepared, cfg.data.size, split="train")
    ds = predictions({None: selection}, {"teacher": provenance_["teacher"]}, inference)
    metadata = {METADATA_KEY: json.dumps({**provenance_, "drray_version": drray.__version__,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    seen: set[str] = set()
    progress = Progress("pseudolabel")
    try:
        with pq.ParquetWriter(tmp, SCHEMA.with_metadata(metadata)) as writer:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                probs = batch[prob_column("teacher")].astype(np.float32)
                ids = [str(i) for i in batch["image_id"]]
                seen.update(ids)
                labels = (probs >= cfg.pseudolabel.threshold).astype(np.int8)
                writer.write_table(pa.table({"image_id": ids, "prob": probs, "label": labels}, schema=SCHEMA))
                progress(len(seen), len(pool))
        _check_complete(tmp, seen, pool)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(seen)


def _check_complete(tmp: Path, seen: set[str], pool: list[str]) -> None:
    rows = pq.read_metadata(tmp).num_rows
    missing = set(pool) - seen
    if rows != len(seen) or missing or len(seen) != len(pool):
        raise RuntimeError(f"pseudolabel: {rows} rows for {len(pool)} pool images ({len(missing)} missing, "
                           f"{rows - len(seen)} duplicated); the table was not written")


def _summary(path: Path) -> dict:
    table = pq.read_table(path, columns=["label"])
    labels = table.column("label").to_numpy()
    return {"images": len(labels), "positives": int(labels.sum()),
            "teacher": (read_provenance(path) or {}).get("teacher")}
