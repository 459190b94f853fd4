"""Between stages 2 and 3, ``drray run pseudolabel``: the teacher labels every image of the
unlabeled pool, as a Ray Data batch-inference job.

Output: ``<run.stages>/pseudolabel-<key>/pseudolabels.parquet`` (the key: the teacher's key, the
threshold, the data), one row per pool image, ``image_id`` (string), ``prob`` (float32), ``label``
(int8, prob >= threshold), with file metadata (key ``drray``) naming the teacher checkpoint and its
hash, the pool and its preprocessing, and the threshold. A pool image that cannot be decoded has
no row there: it is listed with its reason in ``undecodable.parquet`` beside it (``image_id``,
``reason``; only when there is one), counted in the summary, and distillation counts it among
the pool images without a pseudo-label. The table is streamed to disk as the predictions come
(the driver holds one batch and a tally of the ids, never the pool), written aside and renamed
into place when every pool image has its row or its reason, then ``done.json``: a killed job
leaves nothing that distillation would trust, and a finished stage is skipped like every other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import drray
from drray.artifacts import StageDir, clean_stale_temporaries, sha256_file
from drray.config import Config
from drray.data.shards import shard_paths
from drray.distributed.datasets import Selection
from drray.distributed.inference import (
    DECODE_ERROR,
    Inference,
    check_resources,
    predictions,
    prob_column,
)
from drray.progress import Progress, say
from jobs import common, stages

log = logging.getLogger(__name__)
SCHEMA = pa.schema([("image_id", pa.string()), ("prob", pa.float32()), ("label", pa.int8())])
METADATA_KEY = b"drray"
UNDECODABLE = "undecodable.parquet"  # beside the table: pool images that could not be decoded
UNDECODABLE_SCHEMA = pa.schema([("image_id", pa.string()), ("reason", pa.string())])
POOL_SPLIT = "train"  # the unlabeled pool: every prepared train-split image (labels unused)


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
        "pool": str(Path(cfg.data.eyepacs.prepared).resolve()), "pool_split": POOL_SPLIT,
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
    inference = Inference.of(cfg.pseudolabel, "pseudolabel", cfg.share)
    check_resources(inference, "pseudolabel")
    common.start_stage(cfg, r.dir)
    clean_stale_temporaries(out)
    clean_stale_temporaries(out.with_name(UNDECODABLE))
    started = time.monotonic()
    counts = _write(out, cfg, provenance(cfg, manifest, teacher), inference)
    seconds = time.monotonic() - started
    log.info("pseudolabel: %d images (%d undecodable) in %.1f s -> %s", counts["images"], counts["undecodable"],
             seconds, out)
    summary = _summary(out)
    common.finish_stage(cfg, r, {"summary": summary, "seconds": round(seconds, 2)})
    _warn_if_uninformative(cfg, summary)
    return {"stage": "pseudolabel", "path": str(out), "skipped": False, **summary,
            "seconds": round(seconds, 2), "images_per_s": round(sum(counts.values()) / max(seconds, 1e-9), 1)}


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


def _write(out: Path, cfg: Config, provenance_: dict, inference: Inference) -> dict:
    """Stream predictions into a temporary table (and the pool images that cannot be decoded
    into another); rename them into place when every pool image has its row in one of them.
    Constant memory in the driver: a batch at a time, and a tally of the ids written."""
    prepared = cfg.data.eyepacs.prepared
    selection = Selection.clean(prepared, cfg.data.size, split=POOL_SPLIT)
    ds = predictions({None: selection}, {"teacher": provenance_["teacher"]}, inference)
    metadata = {METADATA_KEY: json.dumps({**provenance_, "drray_version": drray.__version__,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()}
    out.parent.mkdir(parents=True, exist_ok=True)
    rejects = out.with_name(UNDECODABLE)
    rejects.unlink(missing_ok=True)  # a redone stage's old list would describe another run
    tmp, tmp_rejects = (path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}") for path in (out, rejects))
    pool, written, undecodable = pool_tally(prepared), IdTally(), 0
    progress = Progress("pseudolabel")
    try:
        with pq.ParquetWriter(tmp, SCHEMA.with_metadata(metadata)) as writer, \
                pq.ParquetWriter(tmp_rejects, UNDECODABLE_SCHEMA) as rejected:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                table, bad = _rows(batch, cfg.pseudolabel.threshold)
                writer.write_table(table)
                rejected.write_table(bad)
                written.add(batch["image_id"])
                undecodable += bad.num_rows
                progress(written.count, pool.count)
        _check_complete((tmp, tmp_rejects), written, pool, prepared)
        if undecodable:
            say("pseudolabel", f"warning: {undecodable} pool image(s) could not be decoded and have no "
                               f"pseudo-label: their ids and reasons are in {rejects}")
            tmp_rejects.replace(rejects)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_rejects.unlink(missing_ok=True)
    return {"images": written.count - undecodable, "undecodable": undecodable}


def _rows(batch: dict, threshold: float) -> tuple[pa.Table, pa.Table]:
    """A batch of predictions as pseudo-label rows, and its undecodable images with their reasons."""
    errors = batch[DECODE_ERROR]
    bad = errors != ""
    ids = batch["image_id"].astype(str)
    probs = batch[prob_column("teacher")].astype(np.float32)[~bad]
    labels = (probs >= threshold).astype(np.int8)
    table = pa.table({"image_id": ids[~bad], "prob": probs, "label": labels}, schema=SCHEMA)
    return table, pa.table({"image_id": ids[bad], "reason": errors[bad].astype(str)}, schema=UNDECODABLE_SCHEMA)


class IdTally:
    """A multiset of image ids in constant memory: how many, and the sum of their 64-bit hashes
    (mod 2**64). Two tallies agree when their ids do, in whatever order they came: a missing or
    a duplicated id changes the sum (two different sets agree by chance with odds ~2**-64)."""

    def __init__(self):
        self.count, self.digest = 0, 0

    def add(self, ids) -> None:
        for image_id in ids:
            self.digest = (self.digest + int.from_bytes(hashlib.blake2b(str(image_id).encode(), digest_size=8)
                                                        .digest(), "little")) % 2**64
        self.count += len(ids)

    def __eq__(self, other) -> bool:
        return (self.count, self.digest) == (other.count, other.digest)


def pool_ids(prepared: str):
    """The pool's ids (the prepared train split, as common.pool_ids), a shard at a time."""
    for path in shard_paths(prepared):
        table = pq.read_table(path, columns=["image_id", "split"])
        yield table.filter(pc.equal(table.column("split"), POOL_SPLIT)).column("image_id").to_pylist()


def pool_tally(prepared: str) -> IdTally:
    tally = IdTally()
    for ids in pool_ids(prepared):
        tally.add(ids)
    return tally


def _check_complete(tables: tuple[Path, Path], written: IdTally, pool: IdTally, prepared: str) -> None:
    """Every pool image has one row, in the table or among the undecodable, and nothing else does."""
    rows, undecodable = (pq.read_metadata(path).num_rows for path in tables)
    if written == pool and rows + undecodable == written.count:
        return
    # never seen: say what is wrong, now that holding every id no longer matters
    seen = [i for path in tables for i in pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()]
    missing = len({i for ids in pool_ids(prepared) for i in ids} - set(seen))
    raise RuntimeError(f"pseudolabel: {rows} rows and {undecodable} undecodable images for {pool.count} pool "
                       f"images ({missing} missing, {len(seen) - len(set(seen))} duplicated); the table was "
                       f"not written")


def _summary(path: Path) -> dict:
    table = pq.read_table(path, columns=["label"])
    labels = table.column("label").to_numpy()
    undecodable = path.with_name(UNDECODABLE)
    return {"images": len(labels), "positives": int(labels.sum()),
            "undecodable": pq.read_metadata(undecodable).num_rows if undecodable.is_file() else 0,
            "teacher": (read_provenance(path) or {}).get("teacher")}
