"""What the stage jobs share: prepared data, the labeled subset, fit plans and publishing.

Where a stage's output lives, and what its key is made of, is the stage graph's business
(``jobs.stages``); this module is what a job needs to run once it knows its directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from drray.artifacts import StageDir, atomic_directory, sha256_file, write_resolved_config
from drray.config import Config, ScalingConfig, run_dir, stages_dir
from drray.data.shards import read_index
from drray.data.splits import binary_target, patient_folds, patient_of, sample_labeled
from drray.distributed.datasets import Selection, Stream
from drray.distributed.prepare import ensure_prepared
from drray.distributed.runtime import ensure_ray
from drray.distributed.scaling import AUTO, cluster_shape, training_workers
from drray.distributed.train import fit_stage, plan_record
from drray.engine.checkpoint import MODEL_LEGACY, read_meta
from drray.engine.fit import FitPlan
from drray.progress import say
from jobs import stages

log = logging.getLogger(__name__)


def prepared_eyepacs(cfg: Config) -> dict:
    """Make sure the training data is prepared (synthesised first where configured); start Ray."""
    manifest = ensure_prepared("eyepacs", cfg.data.eyepacs, cfg)
    ensure_ray(cfg.run.num_cpus)
    return manifest


def resolved(cfg: Config, name: str) -> tuple[dict, stages.Resolved]:
    """The prepared data's manifest and stage ``name`` resolved for ``cfg`` (Ray started)."""
    manifest = prepared_eyepacs(cfg)
    return manifest, stages.resolve(cfg, manifest)[stages.stage(name).name]


@dataclass(frozen=True)
class LabeledSubset:
    labeled: dict[str, float]  # image_id -> binary target: the budget's images a method trains on
    validation: dict[str, float]  # the budget's images that choose epochs and thresholds
    available: int  # labeled train images in the data: what a fraction is of
    heldout: dict[str, float] = dataclasses.field(default_factory=dict)  # labels.fold's fold: not trained on

    @property
    def used(self) -> int:  # the budget spent: train + validation
        return len(self.labeled) + len(self.validation) + len(self.heldout)

    def record(self) -> dict:
        held = {"heldout": sorted(self.heldout)} if self.heldout else {}
        return {"labeled": sorted(self.labeled), "validation": sorted(self.validation), **held}


def labeled_subset(cfg: Config) -> LabeledSubset:
    """The label budget of the train split (its train and validation parts), seeded, nested,
    of whole patients (the shards' patient_id): no patient has an eye on each side of either
    line. Every stage that reads a grade reads it here, and each call records what it read in
    RUN/labels.parquet: the budget, and nothing else, is what a run spends."""
    index = read_index(cfg.data.eyepacs.prepared, columns=["image_id", "grade", "dme", "patient_id", "split"])
    labeled = pc.and_(pc.equal(index["split"], "train"), pc.is_valid(index["grade"]))
    rows = {r["image_id"]: r for r in index.filter(labeled).to_pylist()}  # Python rows of the labeled only
    if not rows:
        raise ValueError(f"{cfg.data.eyepacs.prepared}: no labeled images in the train split")
    ids = list(rows)
    lab, positive = cfg.labels, cfg.data.positive
    labeled, validation = sample_labeled(
        ids, [rows[i]["grade"] for i in ids], fraction=lab.fraction, count=lab.count, strategy=lab.strategy,
        seed=lab.seed, positive=positive, validation=lab.validation,
        patients={i: rows[i]["patient_id"] for i in ids}, dme=[rows[i]["dme"] for i in ids])
    target = lambda i: float(binary_target(rows[i]["grade"], positive, rows[i]["dme"]))  # noqa: E731
    record_labels_read(cfg, {i: ("train", rows[i]["grade"]) for i in labeled}
                       | {i: ("validation", rows[i]["grade"]) for i in validation})
    heldout = set()
    if lab.fold is not None:  # the oof stage's fold j of k: trained on the rest, predicted by that model
        j, k = lab.fold
        folds = patient_folds(labeled, [rows[i]["grade"] for i in labeled], k, seed=lab.seed, positive=positive,
                              patients={i: rows[i]["patient_id"] for i in labeled}, dme=[rows[i]["dme"] for i in labeled])
        heldout = {i for i in labeled if folds[i] == j}
    return LabeledSubset({i: target(i) for i in labeled if i not in heldout}, {i: target(i) for i in validation},
                         len(rows), {i: target(i) for i in sorted(heldout)})


LABELS_FILE = "labels.parquet"  # in the run directory: every labeled training image a stage read


def record_labels_read(cfg: Config, read: dict[str, tuple[str, int]]) -> None:
    """Add ``read`` (image_id -> (role, grade)) to RUN/labels.parquet, the union over the run's
    stages (a run whose stages read different budgets, e.g. table1's 100% row, lists them all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = run_dir(cfg) / LABELS_FILE
    known = {r["image_id"]: (r["role"], r["grade"]) for r in pq.read_table(path).to_pylist()} if path.is_file() else {}
    if all(known.get(i) == v for i, v in read.items()):
        return
    # an image read for training by any stage was trained on: "train" wins over "validation"
    merged = {i: min(v, known.get(i, v)) for i, v in read.items()} | {i: v for i, v in known.items() if i not in read}
    table = pa.table({"image_id": list(merged), "role": [v[0] for v in merged.values()],
                      "grade": pa.array([v[1] for v in merged.values()], pa.int8())})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table.sort_by("image_id"), tmp)
    tmp.replace(path)


def patients_of(prepared: str) -> dict[str, str]:
    """image_id -> patient_id of a prepared set: its shards' column, or for shards without one
    EyePACS's rule (10_left -> 10; else the image is its own patient)."""
    return {r["image_id"]: r.get("patient_id") or patient_of(r["image_id"]) for r in read_index(prepared).to_pylist()}


def labeled_stream(cfg: Config, targets: dict[str, float]) -> Stream:
    """The labeled train images ``targets`` as prepared, in their stored order: a validation or
    probe stream (a Stream shuffles by default: training's)."""
    selection = Selection.clean(cfg.data.eyepacs.prepared, cfg.data.size, split="train", targets=targets)
    return Stream(selection, 256, shuffle=False)


def pool_ids(cfg: Config) -> list[str]:
    """The unlabeled pool: every prepared train-split image (labels unused)."""
    index = read_index(cfg.data.eyepacs.prepared, columns=["image_id", "split"])
    return index.filter(pc.equal(index["split"], "train"))["image_id"].to_pylist()


def start_stage(cfg: Config, out: StageDir) -> StageDir:
    """Create a stage's directory (only now: resolving it creates nothing) with its resolved config."""
    out.path.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out.path, cfg)
    return out


def inputs_of(cfg: Config, r: stages.Resolved) -> dict[str, str]:
    """The content hash of every file the stage reads from another stage or from the user (a
    model to start from, a teacher, a pseudo-label table): recorded in done.json, so a stage
    whose input was replaced under the same key is redone, not trusted."""
    files = {}
    for name, path in r.upstream.items():
        upstream = StageDir(path)
        if name == "pseudolabel":
            files[name] = upstream.file(stages.PSEUDOLABELS)
        elif name == "teacher" or r.stage.name == "oof":  # the model it labels with / the one published
            files[name] = upstream.final_model() / "model.pt"
        else:  # a fine-tuning starts from the upstream stage's final weights
            files[name] = upstream.model / "model.pt"
    outside = stages.outside_input_file(cfg, r.stage)
    if outside is not None:
        files["user"] = outside
    return {name: sha256_file(f) if f.is_file() else "missing" for name, f in files.items()}


def finished(cfg: Config, r: stages.Resolved) -> dict | None:
    """What a stage that already completed returned (then it is skipped), else None: the same
    keys as a fresh run's result. Complete means: its done.json exists and records the inputs
    that are there now (otherwise what it made is removed and it runs again)."""
    done = r.dir.done()
    if done is None:
        return None
    if done.get("inputs", {}) != inputs_of(cfg, r):
        say(r.stage.name, f"warning: an input of {r.dir.path} changed since it was made: it runs again")
        reset_stage(cfg, r)
        return None
    log.info("%s: complete in %s, skipped", r.stage.name, r.dir.path)
    result = {"stage": r.stage.name, "dir": str(r.dir.path), "skipped": True, "metrics": done.get("metrics", {})}
    join = r.dir.file(PSEUDOLABEL_JOIN)
    if join.is_file():
        result["pseudolabel_join"] = json.loads(join.read_text())
    return result


def finish_stage(cfg: Config, r: stages.Resolved, record: dict) -> None:
    """done.json, written last: the stage is complete, made from the inputs it records."""
    r.dir.write_done({"stage": r.stage.name, **record, "inputs": inputs_of(cfg, r)})


def reset_stage(cfg: Config, r: stages.Resolved) -> None:
    """Remove what a stage made (its directory and its Ray Train checkpoints: both drray's, named
    by the stage's key), so it runs again from the start."""
    for path in (r.dir.path, storage(cfg) / r.dir.name):
        if path.is_dir():
            shutil.rmtree(path)


PSEUDOLABEL_JOIN = "pseudolabel_join.json"  # distill: how pseudo-labels met the pool


def storage(cfg: Config) -> Path:
    """Where Ray Train keeps checkpoints for resumption (next to the stage directories)."""
    return stages_dir(cfg) / "ray"


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    return max(1, n_rows // global_batch)


def fit_plan(cfg: Config, r: stages.Resolved, *, spec, method, n_rows: int, scaling: ScalingConfig | None = None,
             streamed_rows: int | None = None, **extra) -> FitPlan:
    """A stage's FitPlan from its config section (epochs, batch_size, optim, scaling,
    checkpoint_every): what every training stage sets the same way. ``scaling``: the stage's,
    already resolved (:func:`stage_scaling`), when the job needed it before. ``streamed_rows``:
    the rows its largest stream reads an epoch, where that is not ``n_rows`` (FixMatch's epoch is
    pool/mu labeled batches, while its unlabeled stream reads the whole pool)."""
    section = r.stage.config(cfg)
    scaling = scaling or stage_scaling(cfg, r)
    batch = batch_for(section.batch_size, n_rows, scaling.num_workers, r.stage.name)
    return FitPlan(
        name=r.stage.name, out_dir=str(r.dir.path), spec=spec, method=method, epochs=section.epochs,
        batch_size=per_worker_batch(batch, scaling, r.stage.section),
        steps_per_epoch=steps_per_epoch(n_rows, batch), optim=section.optim,
        num_workers=scaling.num_workers, precision=scaling.precision, channels_last=scaling.channels_last,
        sync_batchnorm=scaling.sync_batchnorm,
        compile=scaling.compile, checkpoint_every=section.checkpoint_every,
        seed=stages.training_seed(cfg, r.stage.name), epochs_per_pass=epochs_per_pass(section.epochs, streamed_rows or n_rows),
        **extra,
    )


def stage_scaling(cfg: Config, r: stages.Resolved) -> ScalingConfig:
    """The stage's scaling with its number of workers ("auto" resolved from this job's share of
    the Ray cluster, drray.distributed.scaling); its key keeps what the config says."""
    section = r.stage.config(cfg)
    if section.scaling.num_workers != AUTO:
        return section.scaling
    return training_workers(section.scaling, section.batch_size, r.stage.section, cluster_shape(cfg.share))


def fit(cfg: Config, r: stages.Resolved, plan: FitPlan, streams: dict) -> dict:
    """Train the stage on Ray Train, then mark it complete (as many workers as its plan was
    made for: "auto" is resolved once, in fit_plan)."""
    section = r.stage.config(cfg)
    scaling = dataclasses.replace(section.scaling, num_workers=plan.num_workers)
    metrics = fit_stage(plan, streams, scaling, storage(cfg), keep_checkpoints=section.keep_checkpoints,
                        max_failures=cfg.run.max_failures)
    finish_stage(cfg, r, {"metrics": metrics, "run": plan_record(plan)})
    return {"stage": r.stage.name, "dir": str(r.dir.path), "metrics": metrics}


def epochs_per_pass(epochs: int, n_rows: int) -> int:
    """Epochs streamed by one pass of a stage's pipeline: EPOCHS_PER_PASS, or more for a small
    labeled subset (each pass costs seconds to start; its epochs cost little), fewer for a large
    pool (a pass's shuffled epochs wait in the object store: MAX_ROWS_PER_PASS)."""
    from drray.distributed.datasets import EPOCHS_PER_PASS, MAX_ROWS_PER_PASS, MIN_ROWS_PER_PASS

    rows = max(n_rows, 1)
    wanted = max(EPOCHS_PER_PASS, -(-MIN_ROWS_PER_PASS // rows))
    return max(1, min(epochs, wanted, MAX_ROWS_PER_PASS // rows))


def batch_for(global_batch: int, n_rows: int, workers: int, name: str) -> int:
    """The global batch a stage trains with: its section's, or, when it has fewer rows than
    that (a small label budget), the rows rounded down to a multiple of the workers. Batches
    are full (drop_last): a batch of 16 over 12 images would deliver none."""
    if n_rows >= global_batch:
        return global_batch
    if n_rows < workers:
        raise ValueError(f"{name}: {n_rows} training images cannot feed {workers} workers: give it more labels "
                         f"or fewer workers")
    fitted = n_rows // workers * workers
    say(name, f"batch {fitted} instead of {global_batch}: it has only {n_rows} images to train on")
    return fitted


def per_worker_batch(global_batch: int, scaling: ScalingConfig, what: str) -> int:
    if global_batch % scaling.num_workers:
        raise ValueError(f"{what}.batch_size {global_batch} is not divisible by "
                         f"{what}.scaling.num_workers {scaling.num_workers}")
    return global_batch // scaling.num_workers


def publish_model(cfg: Config, name: str, stage_out: StageDir, manifest: dict) -> Path:
    """``RUN/models/<name>``: the stage's final model (weights hard-linked, not copied, where the
    file system allows) with its preprocessing, for ``drray predict`` and ``drray run evaluate``."""
    source = stage_out.final_model()
    meta = read_meta(source)
    meta.update(source=str(source), preprocessing=manifest["params"], positive=cfg.data.positive)
    final = run_dir(cfg) / "models" / name
    with atomic_directory(final, what="published model folder", legacy=MODEL_LEGACY) as tmp:
        try:
            os.link(source / "model.pt", tmp / "model.pt")
        except OSError:
            shutil.copyfile(source / "model.pt", tmp / "model.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return final
