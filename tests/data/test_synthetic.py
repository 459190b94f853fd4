"""The synthetic fundus generator: layouts of the real data sets, proportions, determinism."""

import csv
import hashlib

import numpy as np
import pytest

from drray.data.synthetic import (
    EYEPACS_CAMERA,
    EYEPACS_GRADE_P,
    exact_grades,
    eye_pairs,
    render_fundus,
    synthesize,
)


def digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eyepacs_layout(synthetic_eyepacs):
    train = read_csv(synthetic_eyepacs / "trainLabels.csv")
    test = read_csv(synthetic_eyepacs / "testLabels.csv")
    assert list(train[0]) == ["image", "level"] and list(test[0]) == ["image", "level", "Usage"]
    assert len(train) == 40 and len(test) == 10
    assert {r["Usage"] for r in test} <= {"Public", "Private"}
    assert all((synthetic_eyepacs / "train" / f"{r['image']}.jpeg").is_file() for r in train)
    assert all((synthetic_eyepacs / "test" / f"{r['image']}.jpeg").is_file() for r in test)
    assert train[0]["image"] == "10_left" and train[1]["image"] == "10_right"
    assert not {r["image"] for r in train} & {r["image"] for r in test}


def test_messidor2_layout(synthetic_messidor):
    rows = read_csv(synthetic_messidor / "messidor_data.csv")
    assert list(rows[0]) == ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"]
    assert all((synthetic_messidor / "images" / r["image_id"]).is_file() for r in rows)
    assert {r["image_id"].rsplit(".", 1)[1] for r in rows} == {"png", "JPG"}


def test_grade_proportions_are_exact():
    grades = exact_grades(1000, EYEPACS_GRADE_P, np.random.default_rng(0))
    assert np.bincount(grades, minlength=5).tolist() == [734, 70, 151, 25, 20]
    assert len(exact_grades(3200, EYEPACS_GRADE_P, np.random.default_rng(0))) == 3200


def agreement(left, right):
    """Share of patients whose two eyes have the same grade, and Cohen's kappa."""
    left, right = np.asarray(left), np.asarray(right)
    equal = float(np.mean(left == right))
    chance = float(np.sum(np.bincount(left, minlength=5) * np.bincount(right, minlength=5))) / len(left) ** 2
    return equal, (equal - chance) / (1 - chance)


def test_a_patients_two_eyes_mostly_share_their_grade():
    grades = exact_grades(4001, EYEPACS_GRADE_P, np.random.default_rng(0))
    paired = eye_pairs(grades, np.random.default_rng(1))
    assert sorted(paired) == sorted(grades) and paired[-1] == grades[-1]  # the same grades: exact proportions
    left, right = paired[0:4000:2], paired[1:4000:2]
    equal, kappa = agreement(left, right)
    independent, _ = agreement(grades[0:4000:2], grades[1:4000:2])  # what unpaired draws give (~0.57)
    assert 0.8 <= equal <= 0.92 and equal > independent + 0.2 and kappa > 0.6, (equal, kappa, independent)
    assert np.mean(np.abs(left - right) <= 1) > 0.97  # otherwise mostly one grade apart
    referable = np.r_[right[left >= 2], left[right >= 2]]
    assert np.mean(referable >= 2) > 0.85  # a referable eye's fellow is mostly referable too
    assert (eye_pairs(grades, np.random.default_rng(1)) == paired).all()


def test_synthetic_eyepacs_patients_have_two_correlated_eyes(synthetic_eyepacs):
    for name, n in (("trainLabels.csv", 40), ("testLabels.csv", 10)):
        rows = read_csv(synthetic_eyepacs / name)
        grades = {r["image"]: int(r["level"]) for r in rows}
        patients = sorted({i.split("_")[0] for i in grades})
        assert len(patients) == n // 2 and all(f"{p}_{e}" in grades for p in patients for e in ("left", "right"))
        counts = np.bincount(list(grades.values()), minlength=5)
        assert (counts == np.bincount(exact_grades(n, EYEPACS_GRADE_P, np.random.default_rng(0)), minlength=5)).all()
    rows = read_csv(synthetic_eyepacs / "trainLabels.csv")
    left, right = [int(r["level"]) for r in rows[0::2]], [int(r["level"]) for r in rows[1::2]]
    assert agreement(left, right)[0] >= 0.75  # 20 patients; independent draws: ~0.57


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # 40 images are 3 chunks of the process pool: with 2 workers they split between processes
    synthesize(a, 40, seed=7, workers=1, frame_scale=0.25)
    synthesize(b, 40, seed=7, workers=2, frame_scale=0.25)  # parallelism does not change the output
    synthesize(c, 6, seed=8, workers=1, frame_scale=0.25)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_an_image_does_not_depend_on_what_its_process_drew_before():
    """Every pixel comes from the image's own generator (no process-wide random state, such as
    the C ``rand()`` behind Pillow's effect_noise): the same image drawn again after another
    one in the same process is the same image, sensor noise included."""
    def draw(seed):
        return np.asarray(render_fundus(np.random.default_rng([seed, 1]), 2, "right", EYEPACS_CAMERA,
                                        frame_scale=0.2))
    seeds = range(6)  # sensor noise is drawn for ~93% of EyePACS-style frames (sigma > 0.5)
    first = [draw(s) for s in seeds]
    again = [draw(s) for s in reversed(seeds)][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_left_eye_is_the_mirror_of_the_right():
    right = render_fundus(np.random.default_rng([1, 2]), 0, "right", EYEPACS_CAMERA)
    left = render_fundus(np.random.default_rng([1, 2]), 0, "left", EYEPACS_CAMERA)
    # the optic disc (brightest region) is on opposite sides
    def disc_x(img):
        arr = np.asarray(img.convert("L"), dtype=float)
        return np.unravel_index(arr.argmax(), arr.shape)[1] / arr.shape[1]
    assert (disc_x(right) - 0.5) * (disc_x(left) - 0.5) < 0


def test_original_size_frames(tmp_path):
    synthesize(tmp_path, 1, seed=0, original_size=True, workers=1)
    from PIL import Image

    with Image.open(next((tmp_path / "train").iterdir())) as img:
        assert img.size == (3888, 2592)


def test_unknown_style(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic style"):
        synthesize(tmp_path, 1, style="optos")


@pytest.mark.slow
def test_referable_is_not_separable_by_global_colour(tmp_path):
    """Lesions must matter: colour histograms alone stay below AUC 0.7 (DESIGN bar)."""
    from drray.data.fundus import decode_image
    from drray.data.prepare import PrepareParams, prepare_rows
    from drray.data.sources import collect_inputs
    from drray.metrics import colour_histograms, cross_validated_auc

    synthesize(tmp_path, 500, style="eyepacs", seed=11, frame_scale=0.6, workers=2)
    items = collect_inputs("eyepacs", tmp_path, ["trainLabels.csv"]).items
    table = prepare_rows([vars(i) for i in items], PrepareParams(size=64))
    rows = [r for r in table.to_pylist() if r["image"] is not None]
    assert len(rows) >= 495
    images = [np.asarray(decode_image(r["image"])) for r in rows]
    targets = np.array([int(r["grade"] >= 2) for r in rows])
    auc = cross_validated_auc(colour_histograms(images), targets)
    assert auc < 0.7, auc
