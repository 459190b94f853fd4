"""Partitions and nested, seeded label sampling."""

from collections import Counter

import numpy as np
import pytest

from drray.data.splits import (
    SamplingError,
    binary_target,
    label_order,
    random_partition,
    read_partition,
    sample_labeled,
)


@pytest.fixture
def pool():
    rng = np.random.default_rng(0)
    ids = [f"{i}_{'left' if i % 2 else 'right'}" for i in range(2000)]
    grades = list(rng.choice(5, size=2000, p=[0.735, 0.07, 0.151, 0.024, 0.02]))
    return ids, grades


def test_binary_target():
    assert [binary_target(g) for g in range(5)] == [0, 0, 1, 1, 1]
    assert [binary_target(g, "any_dr") for g in range(5)] == [0, 1, 1, 1, 1]


def test_sampling_is_deterministic_and_seed_dependent(pool):
    ids, grades = pool
    a = sample_labeled(ids, grades, fraction=0.05, seed=1, val_count=100)
    assert a == sample_labeled(ids, grades, fraction=0.05, seed=1, val_count=100)
    assert a != sample_labeled(ids, grades, fraction=0.05, seed=2, val_count=100)
    # the input order does not matter
    order = np.random.default_rng(5).permutation(len(ids))
    shuffled = sample_labeled([ids[i] for i in order], [grades[i] for i in order], fraction=0.05, seed=1, val_count=100)
    assert shuffled == a


@pytest.mark.parametrize("strategy", ["random", "balanced"])
def test_subsets_are_nested_and_validation_is_fixed(pool, strategy):
    ids, grades = pool
    previous, val0 = set(), None
    for fraction in [0.01, 0.02, 0.05, 0.1, 0.2]:
        labeled, val = sample_labeled(ids, grades, fraction=fraction, strategy=strategy, seed=3, val_count=150)
        assert previous <= set(labeled)
        assert not set(labeled) & set(val)
        assert val0 is None or val == val0
        previous, val0 = set(labeled), val


def test_random_is_stratified_by_grade(pool):
    ids, grades = pool
    grade_of = dict(zip(ids, grades, strict=True))
    full = Counter(grades)
    for k in [50, 100, 333]:
        labeled, _ = sample_labeled(ids, grades, count=k, seed=0)
        got = Counter(grade_of[i] for i in labeled)
        for g, n in full.items():
            assert abs(got[g] - k * n / len(ids)) <= 1.5, (k, g, got)


def test_balanced_is_half_and_half(pool):
    ids, grades = pool
    grade_of = dict(zip(ids, grades, strict=True))
    labeled, _ = sample_labeled(ids, grades, count=200, strategy="balanced", seed=0)
    positives = sum(binary_target(grade_of[i]) for i in labeled)
    assert positives == 100


def test_balanced_too_many_is_a_clear_error(pool):
    ids, grades = pool
    with pytest.raises(SamplingError, match="smaller class has only"):
        sample_labeled(ids, grades, fraction=1.0, strategy="balanced", seed=0)


def test_count_and_fraction_errors(pool):
    ids, grades = pool
    with pytest.raises(SamplingError, match="exactly one"):
        sample_labeled(ids, grades, fraction=0.1, count=10)
    with pytest.raises(SamplingError, match="exactly one"):
        sample_labeled(ids, grades)
    with pytest.raises(SamplingError, match="more than"):
        sample_labeled(ids, grades, count=5000)
    with pytest.raises(SamplingError, match="fraction"):
        sample_labeled(ids, grades, fraction=1.5)
    with pytest.raises(SamplingError, match="unknown sampling strategy"):
        label_order(ids, grades, "greedy", 0)


def test_full_fraction_takes_everything_but_validation(pool):
    ids, grades = pool
    labeled, val = sample_labeled(ids, grades, fraction=1.0, seed=0, val_count=100)
    assert len(labeled) == 1900 and len(set(labeled) | set(val)) == 2000


def test_random_partition(pool):
    ids, _ = pool
    part = random_partition(ids, 0.15, seed=0)
    assert Counter(part.values()) == {"train": 1700, "test": 300}
    assert part == random_partition(list(reversed(ids)), 0.15, seed=0)
    assert part != random_partition(ids, 0.15, seed=1)


def test_partition_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("image_id,split\na,train\nb,test\n")
    assert read_partition(path) == {"a": "train", "b": "test"}
    path.write_text("image_id,split\na,train\na,test\n")
    with pytest.raises(SamplingError, match="two splits"):
        read_partition(path)
    path.write_text("id,part\na,train\n")
    with pytest.raises(SamplingError, match="image_id,split"):
        read_partition(path)
