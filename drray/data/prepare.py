"""Preparation of a batch of input items (pure: no Ray) and the manifest of a prepared set.

``prepare_rows`` turns input rows into one output row each: either a prepared image or a reject
with its reason. Any exception from one image becomes that image's reject; a batch never fails
because of one bad file.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

import drray
from drray.data.fundus import ImageRejected, encode_image, prepare_fundus
from drray.data.shards import SHARD_SCHEMA
from drray.data.sources import is_image_file, printable, unsupported_reason
from drray.data.splits import patient_of

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [pa.field("kind", pa.string()), pa.field("reason", pa.string())])


# Bump when the preprocessing changes what it outputs, so prepared data is redone.
# 5: every file is an input (.webp read, other files rejected), empty grades unlabeled, splits
# normalised, file names that are not UTF-8 prepared.
# 6: shards carry patient_id (a set prepared before has none: sampling by patient needs it).
# 7: fundus circle right on real photographs (small decodes, pixel-centre rescaling, text in the
# border, four-sides cuts, 10-14-bit data); full-frame photographs rejected as no_border.
PREPROCESSING_VERSION = 7


@dataclass(frozen=True)
class PrepareParams:
    size: int = 299
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    max_pixels: int = 178_956_970
    mask_outside: bool = True
    preprocessing_version: int = PREPROCESSING_VERSION


def prepare_rows(rows: list[dict], params: PrepareParams) -> pa.Table:
    """Prepare each input row (keys: image_id, path, grade, dme, patient_id, source, split; a row
    without a patient_id gets :func:`patient_of`'s, as collect_inputs gives it).

    ``path`` is a str or its ``os.fsencode`` bytes: a file name that is not UTF-8 cannot travel
    through Arrow as a string, its bytes can. The output's ``path`` is :func:`printable`.
    """
    out = []
    for row in rows:
        record = {name: row.get(name) for name in ("image_id", "grade", "dme", "patient_id", "source", "split")}
        record["patient_id"] = record["patient_id"] or patient_of(record["image_id"])
        path = os.fsdecode(row["path"]) if row.get("path") is not None else None
        record["path"] = printable(path) if path is not None else None
        if path is not None and not is_image_file(Path(path)):  # a README.txt in a clinic's folder
            record.update(kind="unsupported_format", reason=unsupported_reason(Path(path)))
            out.append(record)
            continue
        try:
            prepared = prepare_with_retries(path, params)
            circle = prepared.circle
            record.update(
                image=encode_image(prepared.image, params.image_format, params.jpeg_quality),
                orig_width=prepared.original_size[0], orig_height=prepared.original_size[1],
                fundus_cx=circle.cx, fundus_cy=circle.cy, fundus_r=circle.r, kind=None, reason=None,
            )
        except ImageRejected as exc:  # messages may quote the file name: printable
            record.update(kind=exc.kind, reason=printable(str(exc)))
        except Exception as exc:  # noqa: BLE001 - one bad image must not fail the batch
            record.update(kind="error",
                          reason=printable(f"unexpected error while preparing: {type(exc).__name__}: {exc}"))
        out.append(record)
    return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)


# Rejects that say nothing about the file's contents: the system failed to read it, or drray
# failed on it. A rerun tries them again (drray.distributed.prepare) rather than keep a set that
# lacks them for good.
RETRIED_KINDS = frozenset({"unreadable", "error"})
# System errors that pass: a node short of memory or file handles, an NFS hiccup. One of them once
# would otherwise cost a data set an image on every later run.
PASSING_ERRNOS = frozenset({errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EINTR,
                            errno.ESTALE, errno.ETIMEDOUT})
RETRY_WAITS_S = (0.5, 2.0)


def prepare_with_retries(path: str, params: PrepareParams):
    """:func:`prepare_fundus`, tried again after each of :data:`RETRY_WAITS_S` when it fails for
    a reason that passes (:data:`PASSING_ERRNOS`, or the worker out of memory); other rejects at once."""
    for attempt, wait in enumerate((*RETRY_WAITS_S, None)):
        try:
            return prepare_fundus(path, params.size, params.max_pixels, params.mask_outside)
        except (ImageRejected, MemoryError) as exc:
            passing = isinstance(exc, MemoryError) or getattr(exc, "errno", None) in PASSING_ERRNOS
            if wait is None or not passing:
                raise
            log.warning("%s: %s (attempt %d); trying again in %.1f s", printable(path),
                        exc or type(exc).__name__, attempt + 1, wait)
            time.sleep(wait)


def reject_row(image_id: str, path: str | None, kind: str, reason: str) -> dict:
    return {"image_id": image_id, "path": path, "kind": kind, "reason": reason}


def build_manifest(*, source: str, images: str, id_from: str, label_files: list[dict], params: PrepareParams,
                   inputs: int, prepared_rows: list[dict], rejects: list[dict], shards: list[dict],
                   duplicate_label_rows: int, started: float, content_hash: str,
                   inputs_fingerprint: str, timing: dict) -> dict:
    """The manifest: counts that add up, parameters, version and hashes. ``prepared_rows``:
    grade, split and patient_id of each prepared image."""
    by_kind = Counter(r["kind"] for r in rejects)
    prepared = len(prepared_rows)
    if prepared + len(rejects) != inputs:  # the accounting invariant: nothing lost
        raise AssertionError(f"prepared {prepared} + rejected {len(rejects)} != inputs {inputs}")
    grades = Counter(r["grade"] for r in prepared_rows)
    splits = Counter(r["split"] for r in prepared_rows)
    return {
        "drray_version": drray.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "images": images,
        "id_from": id_from,
        "label_files": label_files,
        "params": dataclasses.asdict(params),
        "counts": {
            "inputs": inputs,
            "prepared": prepared,
            "patients": len({r["patient_id"] for r in prepared_rows}),  # of the prepared images
            "rejected": len(rejects),
            "unlabeled": grades.get(None, 0),
            "labeled": prepared - grades.get(None, 0),
            "rejected_by_reason": dict(sorted(by_kind.items())),
            "by_split": dict(sorted(splits.items())),
            "by_grade": {str(g): grades[g] for g in sorted(g for g in grades if g is not None)},
            "duplicate_label_rows_merged": duplicate_label_rows,
        },
        "shards": shards,
        "content_hash": content_hash,
        "inputs_fingerprint": inputs_fingerprint,
        "timing": {**timing, "total_s": round(time.time() - started, 2)},
    }
