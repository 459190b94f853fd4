"""Partitions and nested, seeded label sampling."""

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from drray.artifacts import NotOurOutput
from drray.data.splits import (
    SamplingError,
    binary_target,
    check_partition_out,
    label_order,
    patient_folds,
    patient_of,
    random_partition,
    read_partition,
    read_patients,
    sample_labeled,
    write_partition,
)
from jobs.cli import main


@pytest.fixture
def pool():
    rng = np.random.default_rng(0)
    ids = [f"{i}_{'left' if i % 2 else 'right'}" for i in range(2000)]
    grades = list(rng.choice(5, size=2000, p=[0.735, 0.07, 0.151, 0.024, 0.02]))
    return ids, grades


def test_binary_target():
    assert [binary_target(g) for g in range(5)] == [0, 0, 1, 1, 1]
    assert [binary_target(g, "any_dr") for g in range(5)] == [0, 1, 1, 1, 1]
    # referable DR and/or referable DME (Gulshan et al.): DME 1-2 makes any grade positive
    assert [binary_target(g, "referable_dme", 1) for g in range(5)] == [1, 1, 1, 1, 1]
    assert [binary_target(g, "referable_dme", 0) for g in range(5)] == [0, 0, 1, 1, 1]
    assert binary_target(0, "referable_dme", 2) == 1 and binary_target(0, "referable_dme") == 0  # not graded
    assert binary_target(0, "referable", 1) == 0  # DME only counts where the positive class says so
    with pytest.raises(SamplingError, match="unknown positive class 'severe'"):
        binary_target(3, "severe")


def test_sampling_is_deterministic_and_seed_dependent(pool):
    ids, grades = pool
    a = sample_labeled(ids, grades, fraction=0.05, seed=1, validation=0.2)
    assert a == sample_labeled(ids, grades, fraction=0.05, seed=1, validation=0.2)
    assert a != sample_labeled(ids, grades, fraction=0.05, seed=2, validation=0.2)
    # the input order does not matter
    order = np.random.default_rng(5).permutation(len(ids))
    shuffled = sample_labeled([ids[i] for i in order], [grades[i] for i in order], fraction=0.05, seed=1,
                              validation=0.2)
    assert shuffled == a


@pytest.mark.parametrize("strategy", ["random", "balanced"])
def test_the_budget_holds_its_validation_and_both_parts_are_nested(pool, strategy):
    ids, grades = pool
    previous, val0 = set(), set()
    for fraction in [0.01, 0.02, 0.05, 0.1, 0.2]:
        labeled, val = sample_labeled(ids, grades, fraction=fraction, strategy=strategy, seed=3, validation=0.25)
        budget = round(fraction * len(ids))
        assert len(labeled) + len(val) == budget  # validation is inside the budget, not on top
        assert abs(len(val) - 0.25 * budget) <= 1
        assert previous <= set(labeled) and val0 <= set(val)  # nested: train and validation
        assert not set(labeled) & set(val)
        previous, val0 = set(labeled), set(val)
    assert sample_labeled(ids, grades, count=40, seed=3, validation=0.0)[1] == []  # 0: no validation


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


def test_full_fraction_takes_everything_validation_included(pool):
    ids, grades = pool
    labeled, val = sample_labeled(ids, grades, fraction=1.0, seed=0, validation=0.05)
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


def test_a_patients_eyes_stay_together():
    ids = [f"{p}_{eye}" for p in range(300) for eye in ("left", "right")] + ["IM000123", "IM000124"]
    part = random_partition(ids, 0.2, seed=4)
    for p in range(300):
        assert part[f"{p}_left"] == part[f"{p}_right"]
    assert Counter(part.values())["test"] == 2 * 60  # 20% of the 302 patients, 60 of them pairs
    assert patient_of("10_left") == "10" and patient_of("10_lefty") == "10_lefty"
    # a patients file groups what the names do not show (and overrides them)
    patients = {"IM000123": "p1", "IM000124": "p1", "3_left": "x", "3_right": "y"}
    for seed in range(20):
        grouped = random_partition(ids, 0.5, seed=seed, patients=patients)
        assert grouped["IM000123"] == grouped["IM000124"]
    apart = [random_partition(ids, 0.5, s, patients) for s in range(20)]
    assert any(part["3_left"] != part["3_right"] for part in apart)  # two patients now: sometimes apart


def test_one_image_per_patient_draws_as_over_images():
    """The draw drray made before it grouped by patient, for sets whose ids name no patient."""
    ids = [f"img{i:04d}" for i in range(500)]
    ordered = sorted(ids)
    perm = np.random.default_rng([3, 7]).permutation(len(ordered))
    test = {ordered[i] for i in perm[:round(500 * 0.3)]}
    assert random_partition(ids, 0.3, seed=3) == {i: "test" if i in test else "train" for i in ordered}


def test_partition_file_round_trip_and_hash_check(tmp_path):
    ids = [f"{p}_{eye}" for p in range(50) for eye in ("left", "right")]
    out = tmp_path / "p.csv"
    mapping = random_partition(ids, 0.2, seed=1)
    manifest = write_partition(out, mapping, seed=1, test_fraction=0.2, drawn_from={"prepared": "x"})
    assert read_partition(out) == mapping
    beside = json.loads((tmp_path / "p.manifest.json").read_text())
    assert beside == manifest and (beside["seed"], beside["test_fraction"]) == (1, 0.2)
    assert beside["counts"] == {"images": 100, "patients": 50, "by_split": {"test": 20, "train": 80},
                                "patients_by_split": {"test": 10, "train": 40}}
    # the ids' hash is the shell's: tail -n +2 p.csv | cut -d, -f1 | LC_ALL=C sort | sha256sum
    column = sorted(line.split(",")[0] for line in out.read_text().splitlines()[1:])
    assert beside["ids_sha256"] == hashlib.sha256("".join(f"{i}\n" for i in column).encode()).hexdigest()
    # rows reordered and CRLF (a spreadsheet saved it): still the same partition
    lines = out.read_text().splitlines()
    out.write_text("\r\n".join([lines[0]] + lines[:0:-1]) + "\r\n")
    assert read_partition(out) == mapping
    out.write_text("\n".join(lines[:-1]) + "\n")  # cut short
    with pytest.raises(SamplingError, match="its ids are not the ones p.manifest.json records"):
        read_partition(out)
    first_id, first_split = lines[1].split(",")
    flipped = {"train": "test", "test": "train"}[first_split]
    out.write_text("\n".join([lines[0], f"{first_id},{flipped}"] + lines[2:]) + "\n")
    with pytest.raises(SamplingError, match="its splits are not the ones"):
        read_partition(out)
    (tmp_path / "p.manifest.json").unlink()  # without the manifest a file is taken as it is
    assert read_partition(out)[first_id] == flipped


def test_a_partition_never_overwrites_a_file_drray_did_not_write(tmp_path):
    users = tmp_path / "voets.csv"
    users.write_text("image_id,split\na,train\n")
    with pytest.raises(NotOurOutput, match="is not a partition drray wrote"):
        check_partition_out(users)
    (tmp_path / "mine.manifest.json").write_text("{}")  # a user's file where the manifest would go
    with pytest.raises(NotOurOutput, match="mine.manifest.json exists and is not a partition drray wrote"):
        check_partition_out(tmp_path / "mine.csv")
    out = tmp_path / "p.csv"
    write_partition(out, {"a": "train", "b": "test"}, seed=0, test_fraction=0.5)
    write_partition(out, {"a": "test", "b": "train"}, seed=1, test_fraction=0.5)  # its own: replaced
    assert read_partition(out) == {"a": "test", "b": "train"}
    out.write_text("image_id,split\na,test\nb,test\n")  # edited by hand: the user's now
    with pytest.raises(NotOurOutput, match="was changed since drray wrote it"):
        write_partition(out, {"a": "train", "b": "test"}, seed=0, test_fraction=0.5)
    assert out.read_text() == "image_id,split\na,test\nb,test\n"


def test_patients_file(tmp_path):
    path = tmp_path / "patients.csv"
    path.write_text("image_id,patient_id\na,1\nb,1\n")
    assert read_patients(path) == {"a": "1", "b": "1"}
    path.write_text("image_id,patient_id\na,1\na,2\n")
    with pytest.raises(SamplingError, match="a has two patients"):
        read_patients(path)


def test_partition_command_on_a_raw_data_set(tmp_path):
    """drray partition --source draws over the ids drray prepare --test-fraction draws over."""
    images = tmp_path / "eyepacs"
    for name in ["10_left", "10_right", "11_left", "11_right", "12_left", "12_right", "13_left"]:
        (images / "train").mkdir(parents=True, exist_ok=True)
        (images / "train" / f"{name}.jpeg").write_bytes(b"x")
    (images / "train" / "notes.txt").write_text("a reject: not partitioned")
    (images / "trainLabels.csv").write_text("image,level\n10_left,0\n10_right,1\n")
    out = tmp_path / "parts" / "eyepacs.csv"
    args = ["partition", "--source", "eyepacs", "--images", str(images), "--labels", "trainLabels.csv",
            "--test-fraction", "0.5", "--seed", "2", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    ids = ["10_left", "10_right", "11_left", "11_right", "12_left", "12_right", "13_left"]
    expected = random_partition(ids, 0.5, seed=2)
    assert read_partition(out) == expected
    counts = Counter(expected.values())
    assert f"{counts['train']} train / {counts['test']} test images (2 / 2 patients)" in result.output
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["drawn_from"]["source"] == "eyepacs" and manifest["patients_file"] is None
    assert CliRunner().invoke(main, args).exit_code == 0  # its own output: rewritten
    inside = CliRunner().invoke(main, args[:-1] + [str(images / "p.csv")])
    assert inside.exit_code != 0 and "lies inside --images" in inside.output
    neither = CliRunner().invoke(main, ["partition", "--test-fraction", "0.5", "--out", str(out)])
    assert neither.exit_code != 0 and "give --prepared DIR, or --source and --images" in neither.output


def test_partition_groups_by_the_patients_the_data_set_records(tmp_path):
    """A folder CSV's patient_id column keeps a patient's images together, as in the shards."""
    images = tmp_path / "clinic"
    images.mkdir()
    rows = ["image_id,grade,patient_id"]
    for patient in range(12):
        for eye in ("a", "b"):
            (images / f"p{patient}{eye}.jpg").write_bytes(b"x")
            rows.append(f"p{patient}{eye},0,P{patient}")
    (images / "grades.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "split.csv"
    result = CliRunner().invoke(main, ["partition", "--source", "folder", "--images", str(images), "--labels",
                                       "grades.csv", "--test-fraction", "0.5", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    split = read_partition(out)
    assert all(split[f"p{p}a"] == split[f"p{p}b"] for p in range(12)) and "(6 / 6 patients)" in result.output


# ---------------------------------------------------------------------------------------------
# Sampling by patient
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def eyes():
    """600 EyePACS patients with two eyes of correlated grades, 50 with one eye, and 40 images
    named otherwise, grouped by a patients file into 20 patients of two."""
    rng = np.random.default_rng(1)
    ids, grades = [], []
    for p in range(650):
        grade = int(rng.choice(5, p=[0.735, 0.07, 0.151, 0.024, 0.02]))
        for eye in ("left", "right")[: 2 if p < 600 else 1]:
            ids.append(f"{p}_{eye}")
            grades.append(grade if rng.random() < 0.85 else int(np.clip(grade + rng.choice([-1, 1]), 0, 4)))
    ids += [f"IM{i:04d}" for i in range(40)]
    grades += list(rng.choice(5, size=40))
    patients = {f"IM{i:04d}": f"exam{i // 2}" for i in range(40)}
    return ids, grades, patients


def whole(subset, ids, patients):
    """Every patient with an image in ``subset`` has all its images there."""
    inside = {patient_of(i, patients) for i in subset}
    return {i for i in ids if patient_of(i, patients) in inside} == set(subset)


@pytest.mark.parametrize("strategy", ["random", "balanced"])
def test_no_patient_is_on_both_sides_of_any_line_and_subsets_stay_nested(eyes, strategy):
    ids, grades, patients = eyes
    for seed in range(6):
        previous, val0 = set(), set()
        for fraction in [0.01, 0.02, 0.05, 0.1, 0.2, 0.3]:
            labeled, val = sample_labeled(ids, grades, fraction=fraction, strategy=strategy, seed=seed,
                                          validation=0.2, patients=patients)
            assert whole(labeled, ids, patients) and whole(val, ids, patients)  # the labeled and validation lines
            assert not set(labeled) & set(val)
            assert previous <= set(labeled) and val0 <= set(val)  # nested
            want = max(1, int(len(ids) * fraction + 0.5))
            assert want <= len(labeled) + len(val) <= want + 1  # whole patients: one image over at most
            assert abs(len(val) - 0.2 * (len(labeled) + len(val))) <= 2
            previous, val0 = set(labeled), set(val)
        part = random_partition(ids, 0.3, seed, patients)  # and the train/test line
        assert whole([i for i in ids if part[i] == "test"], ids, patients)


def test_a_count_is_met_by_whole_patients_one_image_over_at_most():
    ids = [f"{p}_{eye}" for p in range(10) for eye in ("left", "right")]
    grades = [0] * 20
    for k in range(1, 21):
        labeled, _ = sample_labeled(ids, grades, count=k, seed=0)
        assert len(labeled) == k + k % 2  # an odd count takes the last patient's second eye too
        assert whole(labeled, ids, None)
    # the validation part the same way: whole patients, a quarter of the images so far
    labeled, val = sample_labeled(ids, grades, count=16, seed=0, validation=0.25)
    assert len(val) == 4 and len(labeled) == 12 and whole(val, ids, None)
    with pytest.raises(SamplingError, match="more than the 20 labeled images"):
        sample_labeled(ids, grades, count=21, seed=0)
    with pytest.raises(SamplingError, match="leaves none to train on"):
        sample_labeled(ids, grades, count=2, seed=0, validation=0.99)


def test_stratification_is_by_the_patients_worse_eye(eyes):
    ids, grades, patients = eyes
    worse = Counter()
    for i, g in zip(ids, grades, strict=True):
        worse[patient_of(i, patients)] = max(worse[patient_of(i, patients)], g)
    share = Counter(worse.values())
    n_patients = len(worse)
    for k in [100, 300, 600]:
        labeled, _ = sample_labeled(ids, grades, count=k, seed=2, patients=patients)
        got = Counter(worse[p] for p in {patient_of(i, patients) for i in labeled})
        taken = sum(got.values())
        for g, n in share.items():
            assert abs(got[g] - taken * n / n_patients) <= 1.5, (k, g, got)


def test_balanced_alternates_positive_and_negative_patients(eyes):
    ids, grades, patients = eyes
    grade_of = dict(zip(ids, grades, strict=True))
    labeled, _ = sample_labeled(ids, grades, count=200, strategy="balanced", seed=0, patients=patients)
    groups = {}
    for i in labeled:
        groups.setdefault(patient_of(i, patients), []).append(grade_of[i])
    positive = sum(max(g) >= 2 for g in groups.values())
    assert abs(positive - len(groups) / 2) <= 1  # a patient is positive when its worse eye is


def test_the_draw_is_pinned():
    """The label budgets drray draws, for sets whose ids name no patients (and EyePACS ids with
    one eye each), pinned by hash: a change to the draw shows here, and it retrains every stage
    that reads labels. (Last changed 2026-12-01: validation moved inside the budget.)"""
    rng = np.random.default_rng(0)
    grades = list(rng.choice(5, size=2000, p=[0.735, 0.07, 0.151, 0.024, 0.02]))
    pinned = iter(["7f6e9fbd781370df", "ec987944913bc348", "3ff6156a990eb0b9", "0842a55388459f45"])
    for ids in ([f"img{i:04d}" for i in range(2000)], [f"{i}_{'left' if i % 2 else 'right'}" for i in range(2000)]):
        for kw in (dict(fraction=0.05, seed=1, validation=0.2), dict(count=200, strategy="balanced", seed=2,
                                                                    validation=0.25)):
            labeled, val = sample_labeled(ids, grades, **kw)
            digest = hashlib.sha256(("\n".join(labeled) + "|" + "\n".join(val)).encode()).hexdigest()[:16]
            assert digest == next(pinned), kw


def test_referable_dme_balances_on_dme_too():
    ids = [f"img{i}" for i in range(40)]
    grades = [0] * 40
    dme = [1] * 10 + [0] * 30  # ten positives by DME alone
    labeled, _ = sample_labeled(ids, grades, count=20, strategy="balanced", positive="referable_dme", dme=dme)
    assert sum(dme[ids.index(i)] for i in labeled) == 10
    with pytest.raises(SamplingError, match="smaller class has only 0"):
        sample_labeled(ids, grades, count=20, strategy="balanced", positive="referable_dme")


def test_folds_are_whole_patients_stratified_and_seeded():
    """The out-of-fold thresholds' folds: every image in one fold, a patient's eyes together,
    each fold with the budget's share of referable patients (within one), the same for the
    same seed."""
    rng = np.random.default_rng(4)
    ids = [f"{p}_{eye}" for p in range(60) for eye in ("left", "right")]
    grades = list(rng.choice(5, size=len(ids), p=[0.6, 0.1, 0.2, 0.05, 0.05]))
    folds = patient_folds(ids, grades, 3, seed=2)
    assert set(folds) == set(ids) and set(folds.values()) == {0, 1, 2}
    assert all(folds[f"{p}_left"] == folds[f"{p}_right"] for p in range(60))
    worse = {p: max(grades[2 * p], grades[2 * p + 1]) for p in range(60)}
    referable = [sum(worse[p] >= 2 for p in range(60) if folds[f"{p}_left"] == j) for j in range(3)]
    assert max(referable) - min(referable) <= 1
    assert [sum(folds[f"{p}_left"] == j for p in range(60)) for j in range(3)] == [20, 20, 20]
    assert folds == patient_folds(ids, grades, 3, seed=2) != patient_folds(ids, grades, 3, seed=3)
    with pytest.raises(SamplingError, match="at least 2 folds"):
        patient_folds(ids, grades, 1)
    with pytest.raises(SamplingError, match="4 folds need at least 4 patients; the labeled images are of 3"):
        patient_folds(ids[:6], grades[:6], 4)
