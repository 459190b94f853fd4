"""``drray prepare`` and ``drray run prepare``: raw fundus photographs -> prepared Parquet shards.

``prepare_source`` prepares one raw data set (any source) into an output directory.
``run(cfg)`` makes sure every data set a config names is prepared: it synthesises the embedded
synthetic data where the config asks for it and the images are missing, prepares what is not
prepared yet (or was prepared with other parameters), and leaves the rest as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from drray.artifacts import (
    atomic_write_json,
    check_replaceable,
    refuse_overlap,
    sha256_file,
    write_resolved_config,
)
from drray.config import Config, DatasetConfig, run_dir
from drray.data.prepare import PrepareParams
from drray.data.shards import PREPARED_LEGACY, PreparedDataError, read_manifest
from drray.data.sources import InputItem, collect_inputs
from drray.data.splits import random_partition, read_partition
from drray.distributed.prepare import prepare_dataset, reject_summary
from drray.progress import Progress
from jobs import synth

log = logging.getLogger(__name__)


def prepare_source(*, source: str, images: str | Path, labels: list[str | Path], out: str | Path,
                   params: PrepareParams, partition: str | None = None,
                   test_fraction: float | None = None, seed: int = 0, batch_size: int = 16,
                   num_cpus: int | None = None, reuse_current: bool = False) -> dict:
    """Prepare one raw data set into ``out``; return its manifest.

    With ``reuse_current``, an existing output made from the same inputs (file names, sizes,
    times, label contents) with the same parameters is kept as it is. ``out`` must lie outside
    the inputs and be new, empty or a prepared set drray wrote: checked before any work.
    """
    report = collect_inputs(source, images, labels)
    check_output(out, images, report.label_files)
    split_rule = {"partition": sha256_file(partition) if partition and Path(partition).is_file() else partition,
                  "test_fraction": test_fraction, "seed": seed}
    fingerprint = hashlib.sha256(f"{report.fingerprint}{split_rule}".encode()).hexdigest()
    if reuse_current:
        current = _current_manifest(out, params, fingerprint)
        if current:
            log.info("%s is up to date (same inputs and parameters): kept", out)
            return {**current, "reused": True}
    items = _with_splits(report.items, partition, test_fraction, seed)
    return prepare_dataset(
        items, out, params, source=source, images=str(images), label_files=report.label_files,
        duplicate_label_rows=report.duplicate_label_rows, inputs_fingerprint=fingerprint,
        batch_size=batch_size, num_cpus=num_cpus, progress=Progress(f"prepare {source} -> {out}"),
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


def _with_splits(items: list[InputItem], partition: str | None, test_fraction: float | None,
                 seed: int) -> list[InputItem]:
    """Override the source's own splits with a partition file or a seeded random partition."""
    if partition and test_fraction is not None:
        raise ValueError("give either a partition file or a test fraction, not both")
    if partition:
        mapping = read_partition(partition)
        return [dataclasses.replace(i, split=mapping.get(i.image_id, "unassigned")) for i in items]
    if test_fraction is not None:
        mapping = random_partition([i.image_id for i in items], test_fraction, seed)
        return [dataclasses.replace(i, split=mapping[i.image_id]) for i in items]
    return items


def params_from(cfg: Config) -> PrepareParams:
    d = cfg.data
    return PrepareParams(size=d.size, image_format=d.image_format, jpeg_quality=d.jpeg_quality,
                         max_pixels=d.max_pixels, mask_outside=d.mask_outside)


def ensure_prepared(name: str, ds: DatasetConfig, cfg: Config) -> dict:
    """Synthesise (if configured and missing) and prepare one data set; keep a current one."""
    images = Path(ds.images)
    if not images.is_dir():
        if ds.synthetic is None:
            raise FileNotFoundError(
                f"data.{name}.images: folder {images} not found. Point it at your {ds.source} images "
                f"(--set data.{name}.images=PATH) or add a data.{name}.synthetic section to generate data."
            )
        synth.run(images, ds.synthetic)
    manifest = prepare_source(
        source=ds.source, images=images, labels=list(ds.labels), out=ds.prepared, params=params_from(cfg),
        partition=ds.partition, test_fraction=ds.test_fraction, seed=cfg.run.seed,
        batch_size=cfg.data.prepare_batch, num_cpus=cfg.run.num_cpus, reuse_current=True,
    )
    if not manifest["counts"]["prepared"]:
        raise ValueError(f"data.{name}: no image of {images} could be prepared ({reject_summary(manifest)}); "
                         f"the reasons per file are in {ds.prepared}/rejects.parquet")
    return manifest


def run(cfg: Config) -> dict:
    """Prepare every data set the config names; write a summary into the run directory."""
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg)
    datasets = {"eyepacs": cfg.data.eyepacs}
    if cfg.data.external is not None:
        datasets["external"] = cfg.data.external
    manifests = {name: ensure_prepared(name, ds, cfg) for name, ds in datasets.items()}
    summary = {name: {"prepared_dir": datasets[name].prepared, "reused": m.get("reused", False), **m["counts"]}
               for name, m in manifests.items()}
    atomic_write_json(out / "data.json", summary)
    return summary


def format_summary(manifest_counts: dict, where: str) -> str:
    c = manifest_counts
    lines = [
        f"{where}: {c['prepared']} of {c['inputs']} inputs prepared "
        f"({c['labeled']} labeled, {c['unlabeled']} unlabeled), {c['rejected']} rejected",
        f"  splits: {', '.join(f'{k} {v}' for k, v in c['by_split'].items()) or 'none'}",
        f"  grades: {', '.join(f'{k}: {v}' for k, v in c['by_grade'].items()) or 'none'}",
    ]
    if c["rejected_by_reason"]:
        lines.append("  rejected: " + ", ".join(f"{k} {v}" for k, v in c["rejected_by_reason"].items())
                     + f" (reasons per file in {where}/rejects.parquet)")
    return "\n".join(lines)
