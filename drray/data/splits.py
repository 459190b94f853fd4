"""Train/test partitions and label-fraction sampling. Pure functions, seeded.

Label sampling is *nested*: for a given seed, every image gets a fixed position in one ordering,
and a labeled subset is a prefix of it. The subset for 1% is therefore contained in the subset
for 2%, so a label-fraction sweep compares like with like. The validation subset is taken from
the *end* of the same ordering, so it is the same images for every fraction (as long as the
fraction leaves room for it) and never overlaps the labeled subset.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

POSITIVE_MIN_GRADE = {"referable": 2, "any_dr": 1}


class SamplingError(ValueError):
    pass


def binary_target(grade: int, positive: str = "referable") -> int:
    """1 for the positive class: referable DR (grade >= 2) or any DR (grade >= 1)."""
    return int(grade >= POSITIVE_MIN_GRADE[positive])


# ---------------------------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------------------------


def random_partition(ids: Sequence[str], test_fraction: float, seed: int) -> dict[str, str]:
    """A seeded train/test partition of a pooled set (independent of the input order)."""
    if not 0.0 < test_fraction < 1.0:
        raise SamplingError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    ordered = sorted(ids)
    perm = np.random.default_rng([seed, 7]).permutation(len(ordered))
    n_test = round(len(ordered) * test_fraction)
    test = {ordered[i] for i in perm[:n_test]}
    return {i: ("test" if i in test else "train") for i in ordered}


def read_partition(path: str | Path) -> dict[str, str]:
    """A partition file: CSV with columns image_id,split (e.g. the Voets et al. partition)."""
    path = Path(path)
    if not path.is_file():
        raise SamplingError(f"partition file {path} not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image_id", "split"} <= set(reader.fieldnames):
            raise SamplingError(f"{path}: expected columns image_id,split; found {reader.fieldnames}")
        out: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            image_id, split = row["image_id"].strip(), row["split"].strip()
            if not image_id or not split:
                raise SamplingError(f"{path}:{line}: empty image_id or split")
            if out.get(image_id, split) != split:
                raise SamplingError(f"{path}:{line}: {image_id} is in two splits")
            out[image_id] = split
    return out


# ---------------------------------------------------------------------------------------------
# Label sampling
# ---------------------------------------------------------------------------------------------


def label_order(ids: Sequence[str], grades: Sequence[int], strategy: str, seed: int,
                positive: str = "referable") -> list[str]:
    """The nested ordering: labeled subsets are its prefixes.

    ``random`` is stratified by grade: the i-th of n_c images of a class (in a seeded shuffle)
    gets the key (i + u) / n_c, u uniform in [0, 1); sorting by key interleaves the classes in
    proportion, so every prefix holds each grade in its share (within one image).
    ``balanced`` interleaves the two binary classes one by one (the authors' 500/500).
    """
    if len(ids) != len(grades):
        raise SamplingError("ids and grades differ in length")
    rng = np.random.default_rng([seed, 11])
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")  # input order is irrelevant
    ids = [ids[i] for i in order]
    grades = [grades[i] for i in order]
    if strategy == "random":
        classes = np.asarray(grades)
    elif strategy == "balanced":
        classes = np.asarray([binary_target(g, positive) for g in grades])
    else:
        raise SamplingError(f"unknown sampling strategy {strategy!r}: choose random or balanced")
    keys = np.empty(len(ids))
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        members = members[rng.permutation(len(members))]
        n = len(members)
        if strategy == "random":
            keys[members] = (np.arange(n) + rng.random(n)) / n
        else:
            keys[members] = np.arange(n) + rng.random(n)  # round robin, random within a round
    return [ids[i] for i in np.argsort(keys, kind="stable")]


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
                   positive: str = "referable", val_count: int = 0) -> tuple[list[str], list[str]]:
    """(labeled subset, validation subset), both seeded, disjoint and nested across fractions.

    The validation images are the tail of the stratified ordering, whatever the strategy, so
    they are the same images for every fraction and strategy. The labeled subset is a prefix
    of the strategy's ordering with the validation images left out; a fraction is a fraction
    of the images left after the validation hold-out.
    """
    if val_count < 0 or val_count >= len(ids):
        raise SamplingError(f"labels.val_count {val_count} must be in [0, {len(ids)})")
    stratified = label_order(ids, grades, "random", seed, positive)
    validation = stratified[len(stratified) - val_count:] if val_count else []
    held_out = set(validation)
    ordering = label_order(ids, grades, strategy, seed, positive)
    available = [i for i in ordering if i not in held_out]
    k = labeled_count(len(available), fraction, count)
    if strategy == "balanced":
        grade_of = dict(zip(ids, grades, strict=True))
        per_class = np.bincount([binary_target(grade_of[i], positive) for i in available], minlength=2)
        if k > 2 * per_class.min():
            raise SamplingError(
                f"balanced sampling of {k} images needs {math.ceil(k / 2)} per class, but the smaller "
                f"class has only {per_class.min()}; use labels.strategy=random or fewer labels"
            )
    return available[:k], validation
