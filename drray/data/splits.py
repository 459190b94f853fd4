"""Train/test partitions and label-fraction sampling. Pure functions, seeded.

Partitions are drawn over patients: both eyes of a patient land on the same side, so a test
image's other eye never trained the model. A partition travels as a CSV ``image_id,split``
with a manifest beside it (:func:`write_partition`): the seed, the test fraction, the counts and
the SHA-256 of its sorted ids, so whoever reads the file can check it is the one described.

Label sampling is *nested*: for a given seed, every patient gets a fixed position in one
ordering, and a labeled subset is a prefix of it. The subset for 1% is therefore contained in the
subset for 2%, so a label-fraction sweep compares like with like. The validation subset is taken
from the *end* of the same ordering, so it is the same images for every fraction (as long as the
fraction leaves room for it) and never overlaps the labeled subset. Sampling takes whole
patients too: both eyes of a patient are labeled or neither, in validation or not, so the
validation AUC is never measured on the fellow eye of a training image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drray.artifacts import NotOurOutput, atomic_write_json, atomic_write_text, sha256_file

# The positive class: grade at least this, or (referable_dme) any risk of macular oedema too:
# Gulshan et al. 2016's "moderate or worse DR and/or referable DME" (IDRiD risk 1-2,
# Messidor-2 adjudicated_dme 1).
POSITIVE_MIN_GRADE = {"referable": 2, "any_dr": 1, "referable_dme": 2}
POSITIVE_NEEDS_DME = frozenset({"referable_dme"})
# EyePACS names an image <patient>_<eye>: 10_left and 10_right are patient 10's two eyes.
EYEPACS_EYE = re.compile(r"(\d+)_(?:left|right)")
PARTITION_WHAT = "partition"  # the manifest's "what": a partition drray wrote


class SamplingError(ValueError):
    pass


def binary_target(grade: int, positive: str = "referable", dme: int | None = None) -> int:
    """1 for the positive class: referable DR (grade >= 2), any DR (grade >= 1), or referable DR
    or DME (grade >= 2 or dme >= 1). An image whose DME was not graded (``dme`` None) counts by
    its grade alone; a data set that grades no DME at all is refused before training
    (``drray.distributed.prepare.check_positive``)."""
    if positive not in POSITIVE_MIN_GRADE:
        raise SamplingError(f"unknown positive class {positive!r}: choose {', '.join(POSITIVE_MIN_GRADE)}")
    oedema = positive in POSITIVE_NEEDS_DME and dme is not None and dme >= 1
    return int(grade >= POSITIVE_MIN_GRADE[positive] or oedema)


# ---------------------------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------------------------


def patient_of(image_id: str, patients: Mapping[str, str] | None = None) -> str:
    """An image's patient: the one a patients file gives, else EyePACS's (10_left -> 10), else
    the image is its own patient.

    Two rules may name the same patient for different images (an image '10' and EyePACS's
    patient 10): they are then kept together, which makes a partition stricter, never leakier.
    """
    if patients and image_id in patients:
        return patients[image_id]
    eye = EYEPACS_EYE.fullmatch(image_id)
    return eye.group(1) if eye else image_id


def random_partition(ids: Sequence[str], test_fraction: float, seed: int,
                     patients: Mapping[str, str] | None = None) -> dict[str, str]:
    """A seeded train/test partition of a pooled set, drawn over patients (:func:`patient_of`):
    ``test_fraction`` of the patients, with all their images, are test. Independent of the
    input order; with one image per patient, the same draw as over images."""
    if not 0.0 < test_fraction < 1.0:
        raise SamplingError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    patient = {i: patient_of(i, patients) for i in sorted(set(ids))}
    ordered = sorted(set(patient.values()))
    perm = np.random.default_rng([seed, 7]).permutation(len(ordered))
    n_test = round(len(ordered) * test_fraction)
    test = {ordered[i] for i in perm[:n_test]}
    return {i: ("test" if p in test else "train") for i, p in patient.items()}


def read_partition(path: str | Path) -> dict[str, str]:
    """A partition file: CSV with columns image_id,split (e.g. the Voets et al. partition).

    When the manifest ``drray partition`` wrote lies beside it, the file must hold the ids and
    splits that manifest records (:func:`check_partition`).
    """
    mapping = _read_id_csv(path, "split", "partition file", "is in two splits")
    check_partition(path, mapping)
    return mapping


def read_patients(path: str | Path) -> dict[str, str]:
    """A patients file: CSV image_id,patient_id."""
    return _read_id_csv(path, "patient_id", "patients file", "has two patients")


def _read_id_csv(path: str | Path, column: str, what: str, conflict: str) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise SamplingError(f"{what} {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image_id", column} <= set(reader.fieldnames):
            raise SamplingError(f"{path}: expected columns image_id,{column}; found {reader.fieldnames}")
        out: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            image_id, value = (row["image_id"] or "").strip(), (row[column] or "").strip()
            if not image_id or not value:
                raise SamplingError(f"{path}:{line}: empty image_id or {column}")
            if out.get(image_id, value) != value:
                raise SamplingError(f"{path}:{line}: {image_id} {conflict}")
            out[image_id] = value
    return out


# ---------------------------------------------------------------------------------------------
# Partition files and their manifests
# ---------------------------------------------------------------------------------------------


def partition_manifest_path(path: str | Path) -> Path:
    """The manifest beside a partition file: partition.csv -> partition.manifest.json."""
    return Path(path).with_suffix(".manifest.json")


def lines_sha256(lines: Iterable[str]) -> str:
    """SHA-256 of the lines sorted, each ending in a newline, UTF-8. For a partition's ids it is
    ``tail -n +2 FILE | cut -d, -f1 | LC_ALL=C sort | sha256sum`` (ids without commas or quotes)."""
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def _hashes(mapping: Mapping[str, str]) -> dict[str, str]:
    """The ids' hash (drawn over the same images?) and the assignment's (the same partition?)."""
    return {"ids_sha256": lines_sha256(mapping),
            "assignment_sha256": lines_sha256(f"{i},{s}" for i, s in mapping.items())}


def _own_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(manifest, dict) and manifest.get("written_by") == "drray" and manifest.get("what") == PARTITION_WHAT
    return manifest if ours else None


def check_partition(path: str | Path, mapping: Mapping[str, str]) -> None:
    """Raise unless ``mapping`` (read from ``path``) is the partition its manifest records; a
    file without a drray manifest beside it (the Voets et al. file) is taken as it is."""
    manifest_path = partition_manifest_path(path)
    manifest = _own_manifest(manifest_path)
    if manifest is None:
        return
    got = _hashes(mapping)
    for key, what in (("ids_sha256", "ids"), ("assignment_sha256", "splits")):
        if got[key] != manifest.get(key):
            raise SamplingError(
                f"partition file {path}: its {what} are not the ones {manifest_path.name} records "
                f"({key} {got[key][:12]}..., recorded {str(manifest.get(key))[:12]}...): the file was edited, "
                f"cut short or belongs to another partition. Rebuild it with drray partition (seed "
                f"{manifest.get('seed')}, test fraction {manifest.get('test_fraction')}), or remove "
                f"{manifest_path.name} to use the file as it is")


def check_partition_out(path: str | Path) -> None:
    """A partition is written to a new path, or over drray's own earlier partition (its manifest
    beside it, the CSV as drray wrote it): never over a file drray did not write."""
    path = Path(path)
    manifest_path = partition_manifest_path(path)
    if path.is_symlink() or path.is_dir() or manifest_path.is_symlink() or manifest_path.is_dir():
        raise NotOurOutput(f"--out {path}: it or {manifest_path.name} is a folder or a link: choose a new file name")
    if not path.exists() and not manifest_path.exists():
        return
    manifest = _own_manifest(manifest_path)
    if manifest is None:
        there = manifest_path if manifest_path.exists() else path
        raise NotOurOutput(f"--out {path}: {there} exists and is not a partition drray wrote: choose a new "
                           f"file name (drray never overwrites a file it did not write)")
    if path.exists():
        try:
            got = _hashes(_read_id_csv(path, "split", "partition file", "is in two splits"))
            same = all(manifest.get(key) == value for key, value in got.items())
        except SamplingError:
            same = False
        if not same:
            raise NotOurOutput(f"--out {path} was changed since drray wrote it (it no longer matches "
                               f"{manifest_path.name}): choose a new file name, or move it away first")


def write_partition(path: str | Path, mapping: Mapping[str, str], *, seed: int, test_fraction: float,
                    patients: Mapping[str, str] | None = None, patients_file: str | Path | None = None,
                    drawn_from: dict | None = None) -> dict:
    """Write ``mapping`` as CSV image_id,split (sorted by id) and its manifest beside it; return
    the manifest. Refuses a path holding a file drray did not write (:func:`check_partition_out`)."""
    import drray

    path = Path(path)
    check_partition_out(path)
    patient = {i: patient_of(i, patients) for i in mapping}
    patient_split = {patient[i]: s for i, s in mapping.items()}
    manifest = {
        "written_by": "drray", "what": PARTITION_WHAT, "drray_version": drray.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "file": path.name, "seed": seed, "test_fraction": test_fraction,
        "grouping": "patient: the patients file's, else the data set's (shards, CSV column), else EyePACS "
                    "<n>_left/<n>_right -> <n>, else the image",
        "patients_file": {"path": str(patients_file), "sha256": sha256_file(patients_file)} if patients_file else None,
        "drawn_from": drawn_from or {},
        "counts": {
            "images": len(mapping), "patients": len(patient_split),
            "by_split": dict(sorted(Counter(mapping.values()).items())),
            "patients_by_split": dict(sorted(Counter(patient_split.values()).items())),
        },
        **_hashes(mapping),
        "hash_rule": "SHA-256 of the sorted lines (ids; id,split), each ending in a newline, UTF-8",
    }
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image_id", "split"])
    writer.writerows(sorted(mapping.items()))
    atomic_write_text(path, text.getvalue())
    atomic_write_json(partition_manifest_path(path), manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# Label sampling
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Patient:
    images: tuple[str, ...]  # sorted
    grade: int  # the worse eye's: what stratification sees
    target: int  # positive when any of its images is: what balanced sampling sees


def _patients(ids: Sequence[str], grades: Sequence[int], patients: Mapping[str, str] | None,
              dme: Sequence[int | None] | None, positive: str) -> list[_Patient]:
    """The patients of ``ids`` (:func:`patient_of`), ordered by their first image: with one image
    per patient that is the order of the sorted ids, so the draw is the one made over images
    before sampling grouped patients."""
    dme = [None] * len(ids) if dme is None else dme
    if not len(ids) == len(grades) == len(dme):
        raise SamplingError("ids, grades and dme differ in length")
    members: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for image_id, grade, oedema in zip(ids, grades, dme, strict=True):
        members[patient_of(image_id, patients)].append((image_id, grade, binary_target(grade, positive, oedema)))
    found = [_Patient(tuple(sorted(m[0] for m in group)), max(m[1] for m in group), max(m[2] for m in group))
             for group in members.values()]
    return sorted(found, key=lambda p: p.images[0])  # input order is irrelevant


def _patient_order(found: list[_Patient], strategy: str, seed: int) -> list[_Patient]:
    """``random`` is stratified by grade: the i-th of n_c patients of a class (in a seeded
    shuffle) gets the key (i + u) / n_c, u uniform in [0, 1); sorting by key interleaves the
    classes in proportion, so every prefix holds each grade in its share (within one patient).
    ``balanced`` interleaves the two binary classes one by one (the authors' 500/500)."""
    rng = np.random.default_rng([seed, 11])
    if strategy == "random":
        classes = np.asarray([p.grade for p in found])
    elif strategy == "balanced":
        classes = np.asarray([p.target for p in found])
    else:
        raise SamplingError(f"unknown sampling strategy {strategy!r}: choose random or balanced")
    keys = np.empty(len(found))
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        members = members[rng.permutation(len(members))]
        n = len(members)
        if strategy == "random":
            keys[members] = (np.arange(n) + rng.random(n)) / n
        else:
            keys[members] = np.arange(n) + rng.random(n)  # round robin, random within a round
    return [found[i] for i in np.argsort(keys, kind="stable")]


def label_order(ids: Sequence[str], grades: Sequence[int], strategy: str, seed: int,
                positive: str = "referable", patients: Mapping[str, str] | None = None,
                dme: Sequence[int | None] | None = None) -> list[str]:
    """The nested ordering of the images: labeled subsets are its prefixes (cut between
    patients). A patient's images are adjacent in it, placed by its worse eye's grade
    (``random``) or by whether any eye is positive (``balanced``)."""
    return [i for p in _patient_order(_patients(ids, grades, patients, dme, positive), strategy, seed)
            for i in p.images]


def _whole_patients(ordered: Iterable[_Patient], k: int) -> list[_Patient]:
    """The first patients of ``ordered`` that hold at least ``k`` images. Patients are taken
    whole, so the last one may bring its other images over ``k``: one image over at most for
    patients with two eyes (never under: the count asked for is always met)."""
    taken, n = [], 0
    for patient in ordered:
        if n >= k:
            break
        taken.append(patient)
        n += len(patient.images)
    return taken


def labeled_count(n_available: int, fraction: float | None, count: int | None) -> int:
    if (fraction is None) == (count is None):
        raise SamplingError("give exactly one of labels.fraction and labels.count")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise SamplingError(f"labels.fraction must be in (0, 1], got {fraction}")
        return max(1, math.floor(n_available * fraction + 0.5))
    if count <= 0:
        raise SamplingError(f"labels.count must be positive, got {count}")
    if count > n_available:
        raise SamplingError(f"labels.count {count} is more than the {n_available} labeled images available")
    return count


def sample_labeled(ids: Sequence[str], grades: Sequence[int], *, fraction: float | None = None,
                   count: int | None = None, strategy: str = "random", seed: int = 0,
                   positive: str = "referable", validation: float = 0.0, patients: Mapping[str, str] | None = None,
                   dme: Sequence[int | None] | None = None) -> tuple[list[str], list[str]]:
    """(train, validation): the label budget, seeded, made of whole patients (``patients``:
    image id -> patient, else :func:`patient_of`), split into the images a method trains on and
    the ones that choose its epochs and thresholds. Both are part of the budget: ``count`` (or
    ``fraction`` of the labeled images) is every labeled image the method may see.

    The budget is a prefix of the strategy's ordering; walking it, a patient goes to validation
    while that keeps validation at ``validation`` of the images so far (rounded). So both parts
    are nested across fractions (1%'s train and validation lie inside 2%'s), and validation is
    stratified like the budget. Counts are of images: patients are taken until the count is
    reached, so the budget may hold one image more than asked for (the last patient's second
    eye; :func:`_whole_patients`). ``dme`` (per image) is needed by balanced sampling with
    ``positive="referable_dme"`` only.
    """
    if not 0.0 <= validation < 1.0:
        raise SamplingError(f"labels.validation {validation} must be a share of the budget in [0, 1)")
    found = _patients(ids, grades, patients, dme, positive)
    ordered = _patient_order(found, strategy, seed)
    k = labeled_count(len(ids), fraction, count)
    if strategy == "balanced":
        per_class = np.bincount([p.target for p in found for _ in p.images], minlength=2)
        if k > 2 * per_class.min():
            raise SamplingError(
                f"balanced sampling of {k} images needs {math.ceil(k / 2)} per class, but the smaller "
                f"class has only {per_class.min()}; use labels.strategy=random or fewer labels"
            )
    train, held_out, seen = [], [], 0
    for patient in _whole_patients(ordered, k):
        seen += len(patient.images)
        part = held_out if len(held_out) + len(patient.images) <= round(validation * seen) else train
        part.extend(patient.images)
    if not train:
        raise SamplingError(f"labels.validation {validation} of a budget of {k} images leaves none to train on")
    return train, held_out


def patient_folds(ids: Sequence[str], grades: Sequence[int], k: int, *, seed: int = 0, positive: str = "referable",
                  patients: Mapping[str, str] | None = None, dme: Sequence[int | None] | None = None) -> dict[str, int]:
    """image id -> fold 0..k-1 of a labeled set (the out-of-fold thresholds' folds): whole
    patients, stratified by the worse eye's grade (random sampling's seeded order, dealt round
    robin), so each fold holds each grade in its share and no patient is in two folds."""
    if k < 2:
        raise SamplingError(f"out-of-fold predictions need at least 2 folds, got {k}")
    found = _patients(ids, grades, patients, dme, positive)
    if len(found) < k:
        raise SamplingError(f"{k} folds need at least {k} patients; the labeled images are of {len(found)}")
    return {i: n % k for n, p in enumerate(_patient_order(found, "random", seed + 1)) for i in p.images}
