"""``drray prepare`` as a Ray Data job: decode/crop/resize in parallel, stream into Parquet shards.

Ray Data runs :func:`drray.data.prepare.prepare_rows` over the inputs in parallel tasks (one CPU
each) and streams the results back in input order; the driver splits them into shards and
rejects as they arrive. One pass yields both halves of the contract with exact counts, shard
names that do not depend on scheduling, and flat memory (Ray Data's backpressure bounds what is
in flight). Everything is written into a temporary directory that replaces ``OUT`` at the end,
and only when something was prepared or ``OUT`` held no prepared images: a run that prepared
nothing never replaces a good prepared set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from drray.artifacts import (
    atomic_directory,
    atomic_write_json,
    check_replaceable,
    clean_stale_temporaries,
    refuse_overlap,
    sha256_file,
)
from drray.config import Config, DatasetConfig
from drray.data.prepare import (
    RETRIED_KINDS,
    PrepareParams,
    build_manifest,
    prepare_rows,
    reject_row,
)
from drray.data.shards import (
    MANIFEST,
    PREPARED_LEGACY,
    REJECT_SCHEMA,
    PreparedDataError,
    ShardWriter,
    read_index,
    read_manifest,
    write_rejects,
)
from drray.data.sources import DME_SOURCES, InputItem, collect_inputs, printable
from drray.data.splits import POSITIVE_NEEDS_DME, random_partition, read_partition
from drray.data.synthetic import write_dataset
from drray.distributed.runtime import ensure_ray
from drray.progress import Progress, say

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, int], None]


class NothingPrepared(ValueError):
    """No input could be prepared, and the output folder already holds a good prepared set."""


def prepare_source(*, source: str, images: str | Path, labels: list[str | Path], out: str | Path,
                   params: PrepareParams, id_from: str = "stem", partition: str | None = None,
                   test_fraction: float | None = None, seed: int = 0, batch_size: int = 16,
                   num_cpus: int | None = None, reuse_current: bool = False,
                   patients: str | Path | None = None) -> dict:
    """Prepare one raw data set into ``out``; return its manifest.

    With ``reuse_current``, an existing output made from the same inputs (file names, sizes,
    times, label and patients file contents, id rule) with the same parameters is kept as it
    is. ``out`` must lie outside the inputs and be new, empty or a prepared set drray wrote:
    checked before any work. ``patients``: CSV image_id,patient_id (:func:`collect_inputs`).
    """
    report = collect_inputs(source, images, labels, id_from, patients)
    check_output(out, images, report.label_files)
    # "grouping": --test-fraction draws over patients now; a set drawn over images is redone
    split_rule = {"partition": sha256_file(partition) if partition and Path(partition).is_file() else partition,
                  "test_fraction": test_fraction, "seed": seed, "grouping": "patient"}
    fingerprint = hashlib.sha256(f"{report.fingerprint}{split_rule}".encode()).hexdigest()
    retried: list[str] = []
    if reuse_current and (current := _current_manifest(out, params, fingerprint)):
        retried = rejects_that_prepare_now(out, params, tried_before=current.get("retried_rejects", []))
        if not retried:
            log.info("%s is up to date (same inputs and parameters): kept", out)
            return {**current, "reused": True}
        say("prepare", f"{len(retried)} image(s) of {out} that could not be read last time read now "
                       f"({', '.join(retried[:5])}): preparing the set again")
    items = _with_splits(report.items, partition, test_fraction, seed)
    return prepare_dataset(
        items, out, params, source=source, images=str(images), label_files=report.label_files,
        id_from=id_from, duplicate_label_rows=report.duplicate_label_rows, inputs_fingerprint=fingerprint,
        batch_size=batch_size, num_cpus=num_cpus, progress=Progress(f"prepare {source} -> {out}"),
        retried_rejects=retried,
    )


def check_output(out: str | Path, images: str | Path, label_files: list[Path]) -> None:
    """Refuse an ``out`` whose replacement would destroy inputs or anything drray did not write."""
    refuse_overlap(out, {"--images": images}, files=label_files, what="--out")
    check_replaceable(out, what="--out", legacy=PREPARED_LEGACY)


def _current_manifest(out: str | Path, params: PrepareParams, fingerprint: str) -> dict | None:
    try:
        manifest = read_manifest(out)
    except PreparedDataError:
        return None
    same = (manifest.get("params") == dataclasses.asdict(params)
            and manifest.get("inputs_fingerprint") == fingerprint)
    return manifest if same else None


def rejects_that_prepare_now(out: str | Path, params: PrepareParams, tried_before: list[str],
                             look_at: int = 5) -> list[str]:
    """Ids of rejects for a reason other than the file's contents (:data:`RETRIED_KINDS`: the
    system failed to read it, or drray failed on it) that the pipeline's own function prepares
    now. Each is tried once per set of inputs (``tried_before``: the ids whose reading again made
    this set; they fail in the pipeline though not here, so trying again would redo the set on
    every run), and only the first ``look_at``: a folder without read permission costs a look at
    a few, and one that reads now is reason enough to prepare the set again."""
    import pyarrow.parquet as pq

    path = Path(out) / "rejects.parquet"
    if not path.is_file():
        return []
    skip = set(tried_before)
    rows = [{"image_id": r["image_id"], "path": r["path"]} for r in pq.read_table(path).to_pylist()
            if r["kind"] in RETRIED_KINDS and r["path"] and r["image_id"] not in skip]
    return [r["image_id"] for r in prepare_rows(rows[:look_at], params).to_pylist() if r["kind"] is None]


def _with_splits(items: list[InputItem], partition: str | None, test_fraction: float | None,
                 seed: int) -> list[InputItem]:
    """Override the source's own splits with a partition file (checked against the manifest
    ``drray partition`` wrote beside it, if any) or a seeded random partition by patient.

    The random partition is drawn over the inputs that can be prepared, so that a stray file or
    label row (a reject) added to the data set does not move images between train and test;
    ``drray partition --source`` draws over the same ids, so the two agree.
    """
    if partition and test_fraction is not None:
        raise ValueError("give either a partition file or a test fraction, not both")
    if partition:
        mapping = read_partition(partition)
        return [dataclasses.replace(i, split=mapping.get(i.image_id, "unassigned")) for i in items]
    if test_fraction is not None:
        patients = {i.image_id: i.patient_id for i in items if not i.reject}
        mapping = random_partition(list(patients), test_fraction, seed, patients)
        return [dataclasses.replace(i, split=mapping.get(i.image_id, i.split)) for i in items]
    return items


def params_from(cfg: Config) -> PrepareParams:
    d = cfg.data
    return PrepareParams(size=d.size, image_format=d.image_format, jpeg_quality=d.jpeg_quality,
                         max_pixels=d.max_pixels, mask_outside=d.mask_outside)


def ensure_prepared(name: str, ds: DatasetConfig, cfg: Config) -> dict:
    """Synthesise (if configured and missing) and prepare one data set; keep a current one.
    One job at a time (a lock beside the prepared folder): jobs started together on one data set
    (a SLURM array's trials, two runs of one config) would otherwise each see a half-written
    folder as the other's, and prepare from images still being written."""
    if not Path(ds.images).is_dir() and ds.synthetic is None:  # before the lock: a typo creates nothing
        raise FileNotFoundError(
            f"data.{name}.images: folder {ds.images} not found. Point it at your {ds.source} images "
            f"(--set data.{name}.images=PATH) or add a data.{name}.synthetic section to generate data."
        )
    with preparation_lock(Path(ds.prepared), name):
        return _ensure_prepared(name, ds, cfg)


@contextlib.contextmanager
def preparation_lock(prepared: Path, name: str, notice_after_s: float = 5.0):
    """Hold the lock of one prepared folder (``.<folder name>.lock`` beside it); say so when waiting."""
    from filelock import FileLock, Timeout

    lock, locked = FileLock(str(prepared.parent / f".{prepared.name}.lock")), True
    try:
        prepared.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=notice_after_s)
    except Timeout:  # before OSError, of which it is one
        say("prepare", f"waiting for another job preparing data.{name} into {prepared} (lock {lock.lock_file})")
        lock.acquire()
    except OSError as exc:  # a prepared set on a read-only share: nobody writes it, nothing to order
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        log.info("no lock for %s (its folder is not writable: %s): preparing without one", prepared, exc.strerror)
        locked = False
    try:
        yield
    finally:
        if locked:
            lock.release()


def synthesise(images: Path, spec) -> None:
    """Write a configured synthetic set into ``images`` (a folder that does not exist yet) through
    a temporary folder beside it, renamed when complete: a job killed while synthesising (a
    cancelled SLURM job) left a half-written folder that the next run took for the data set
    ("label file trainLabels.csv not found"); now it leaves a temporary that the next run removes."""
    clean_stale_temporaries(images)
    partial = images.parent / f".{images.name}.synth-{os.getpid()}"
    write_dataset(partial, spec)
    os.replace(partial, images)


def _ensure_prepared(name: str, ds: DatasetConfig, cfg: Config) -> dict:
    images = Path(ds.images)
    if not images.is_dir():  # a synthetic set (checked in ensure_prepared)
        synthesise(images, ds.synthetic)
    manifest = prepare_source(
        source=ds.source, images=images, labels=list(ds.labels), out=ds.prepared, params=params_from(cfg),
        id_from=ds.id_from, partition=ds.partition, test_fraction=ds.test_fraction, seed=cfg.run.seed,
        batch_size=cfg.data.prepare_batch, num_cpus=cfg.run.num_cpus, reuse_current=True, patients=ds.patients,
    )
    if not manifest["counts"]["prepared"]:
        raise ValueError(f"data.{name}: no image of {images} could be prepared ({reject_summary(manifest)}); "
                         f"the reasons per file are in {ds.prepared}/rejects.parquet")
    check_positive(name, ds, cfg.data.positive)
    return manifest


def check_positive(name: str, ds: DatasetConfig, positive: str) -> None:
    """Refuse a positive class the prepared set cannot give: referable_dme on a set whose shards
    grade no DME at all (EyePACS), where every image would count by its grade alone, silently
    referable DR again. Checked here, where every data set a run trains or evaluates on is
    first read, so a run fails before its hours of training, not after."""
    if positive not in POSITIVE_NEEDS_DME:
        return
    index = read_index(ds.prepared, ["dme", "grade"]).to_pylist()
    if any(r["dme"] is not None for r in index):
        return
    graded = "; ".join(f"{source}: {where}" for source, where in DME_SOURCES.items())
    raise ValueError(
        f"data.positive={positive} counts an image positive for referable DR or referable macular oedema "
        f"(DME), but data.{name} ({ds.source}, {ds.prepared}) records no DME: none of its "
        f"{sum(r['grade'] is not None for r in index)} labeled images has one. Sources that record DME: "
        f"{graded}. Choose data.positive=referable (or any_dr), or a data set that grades DME.")


def _prepare_batch(batch: pa.Table, params: PrepareParams) -> pa.Table:
    return prepare_rows(batch.to_pylist(), params)


def prepare_dataset(items: list[InputItem], out: str | Path, params: PrepareParams, *,
                    source: str, images: str, label_files: list[Path], id_from: str = "stem",
                    duplicate_label_rows: int = 0, inputs_fingerprint: str = "",
                    batch_size: int = 16, rows_per_shard: int = 500, num_cpus: int | None = None,
                    progress: ProgressFn | None = None, retried_rejects: list[str] | None = None) -> dict:
    """Prepare every input item into ``out``; return the manifest. ``retried_rejects``: the
    earlier rejects that read now, the reason for this preparation (:func:`rejects_that_prepare_now`).

    Shards are kept small (``rows_per_shard``): a shard is the unit that training reads in
    random order, so smaller shards shuffle a large pool better at no cost in memory.
    """
    started = time.time()
    out = Path(out)
    clean_stale_temporaries(out)
    rejects = [reject_row(i.image_id, printable(i.path) if i.path else None, i.reject_kind, i.reject)
               for i in items if i.reject]
    # paths travel as bytes: a file name that is not UTF-8 is no Arrow string (prepare_rows)
    todo = [
        {"image_id": i.image_id, "path": os.fsencode(i.path), "grade": i.grade, "dme": i.dme,
         "patient_id": i.patient_id, "source": i.source, "split": i.split}
        for i in items if not i.reject
    ]
    prepared_rows: list[dict] = []
    if todo:
        ensure_ray(num_cpus)
    timing = {"ray_start_s": round(time.time() - started, 2)}
    with atomic_directory(out, what="prepared-data folder", legacy=PREPARED_LEGACY) as tmp:
        writer = ShardWriter(tmp / "shards", rows_per_shard)
        pipeline_started = time.time()

        def take(batches) -> None:
            for batch in batches:
                if "first_batch_s" not in timing:  # worker start-up shows here, not in the rate after
                    timing.update(first_batch_s=round(time.time() - pipeline_started, 2),
                                  first_batch_rows=batch.num_rows)
                ok = pc.is_null(batch["kind"])
                good, bad = batch.filter(ok), batch.filter(pc.invert(ok))
                writer.write(good)
                prepared_rows.extend(good.select(["image_id", "grade", "split", "patient_id"]).to_pylist())
                rejects.extend(bad.select(REJECT_SCHEMA.names).to_pylist())
                if progress:
                    progress(len(prepared_rows) + len(rejects), len(items))

        take(_run_pipeline(todo, params, batch_size))
        returned = {r["image_id"] for r in prepared_rows} | {r["image_id"] for r in rejects}
        if lost := [row for row in todo if row["image_id"] not in returned]:  # once more, before giving up
            say("prepare", f"{len(lost)} image(s) did not come back from the pipeline "
                           f"({', '.join(r['image_id'] for r in lost[:5])}): preparing them again")
            take(_run_pipeline(lost, params, batch_size))
        shards = writer.close()
        check_accounted_for(items, prepared_rows, rejects, out)
        timing["pipeline_s"] = round(time.time() - pipeline_started, 2)
        rejects.sort(key=lambda r: (r["image_id"], r["path"] or ""))
        write_rejects(tmp / "rejects.parquet", rejects)
        manifest = build_manifest(
            source=source, images=printable(str(images)), id_from=id_from,
            label_files=[{"path": str(p), "sha256": sha256_file(p)} for p in label_files],
            params=params, inputs=len(items), prepared_rows=prepared_rows, rejects=rejects,
            shards=shards, duplicate_label_rows=duplicate_label_rows, started=started,
            content_hash=_content_hash(shards), inputs_fingerprint=inputs_fingerprint, timing=timing,
        )
        manifest["retried_rejects"] = sorted(retried_rejects or [])
        if not prepared_rows:
            _keep_previous_if_good(out, manifest)
        atomic_write_json(tmp / MANIFEST, manifest)  # written last: its presence means complete
    return manifest


def check_accounted_for(items: list[InputItem], prepared_rows: list[dict], rejects: list[dict], out: Path) -> None:
    """Every input comes back once, prepared or rejected. A row lost on its way from the
    pipeline's tasks would otherwise leave a set one image short for every later run, without a
    word; raised inside the output's temporary, so nothing is written."""
    expected = Counter(i.image_id for i in items)
    returned = Counter(r["image_id"] for r in prepared_rows) + Counter(r["image_id"] for r in rejects)
    if returned != expected:
        lost, twice = sorted((expected - returned).elements()), sorted((returned - expected).elements())
        raise PreparedDataError(
            f"preparing {out}: {len(lost)} input(s) came back neither prepared nor rejected "
            f"({', '.join(lost[:5]) or 'none'}) and {len(twice)} more often than given "
            f"({', '.join(twice[:5]) or 'none'}); nothing was written. Run it again, and report it "
            f"with the run's drray.log if it recurs")


def _keep_previous_if_good(out: Path, failed: dict) -> None:
    """Raise (so the new, empty set is thrown away) when ``out`` holds prepared images."""
    try:
        previous = read_manifest(out)["counts"]["prepared"]
    except (PreparedDataError, KeyError, ValueError):
        return
    if previous:
        raise NothingPrepared(
            f"no image could be prepared ({reject_summary(failed)}); the prepared set already in {out} "
            f"({previous} images) is kept as it was")


def reject_summary(manifest: dict) -> str:
    counts = manifest["counts"]
    kinds = ", ".join(f"{k} {v}" for k, v in counts["rejected_by_reason"].items())
    return f"{counts['rejected']} of {counts['inputs']} inputs rejected: {kinds or 'none'}"


def _run_pipeline(todo: list[dict], params: PrepareParams, batch_size: int):
    if not todo:
        return
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # deterministic shard contents
    try:
        ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / (4 * batch_size))))
        ds = ds.map_batches(_prepare_batch, fn_kwargs={"params": params}, batch_size=batch_size,
                            batch_format="pyarrow", num_cpus=1)
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    finally:
        ctx.execution_options.preserve_order = saved


def _content_hash(shards: list[dict]) -> str:
    h = hashlib.sha256()
    for shard in shards:
        h.update(f"{shard['file']}:{shard['rows']}:{shard['sha256']}\n".encode())
    return h.hexdigest()
