"""Evaluation's side of batch inference, without Ray: the t-SNE asks for the features of its
sample of one set only (chosen by image id, so the same images whatever order predictions come
in), and the collected columns keep every decoded row, the sample's features, and the
undecodable rows apart with their reasons."""

import numpy as np

from drray.distributed.datasets import Selection
from drray.distributed.inference import DECODE_ERROR, features_column, prob_column
from jobs.evaluate import EXTERNAL, EYEPACS_TEST, VALIDATION, _collect, tsne_sample

MODELS = {"teacher": "unused", "student": "unused"}


def sets(*names):
    return {name: Selection.clean(".", 32, split=None, targets={f"{name}{i}": float(i % 2) for i in range(50)})
            for name in names}


def test_the_tsne_asks_features_of_a_seeded_sample_of_its_one_set():
    chosen = tsne_sample(sets(VALIDATION, EYEPACS_TEST, EXTERNAL), 10, seed=0)
    assert list(chosen) == [EXTERNAL] and len(chosen[EXTERNAL]) == 10
    assert chosen[EXTERNAL] <= set(sets(EXTERNAL)[EXTERNAL].targets)
    assert tsne_sample(sets(EXTERNAL, VALIDATION, EYEPACS_TEST), 10, seed=0) == chosen  # by id, not by order
    assert tsne_sample(sets(VALIDATION, EYEPACS_TEST, EXTERNAL), 10, seed=1) != chosen
    assert list(tsne_sample(sets(VALIDATION, EYEPACS_TEST), 10, seed=0)) == [EYEPACS_TEST]
    assert tsne_sample(sets(EYEPACS_TEST, EXTERNAL), 0, seed=0) is None  # no t-SNE: no features at all


def batch(test_set, ids, features=None, errors=None):
    n = len(ids)
    out = {"image_id": np.array(ids, dtype=object), "patient_id": np.array(ids, dtype=object),
           "target": np.arange(n, dtype=np.float32) % 2, "test_set": np.array([test_set] * n, dtype=object),
           DECODE_ERROR: np.array(errors or [""] * n, dtype=object)}
    for k, m in enumerate(MODELS):
        out[prob_column(m)] = np.full(n, 0.1 * (k + 1), np.float32)
        out[features_column(m)] = np.array([np.full(4, k + i, np.float32).tobytes() if i in (features or ()) else b""
                                            for i in range(n)], dtype=object)
    return out


def test_collected_columns_hold_every_decoded_row_and_only_the_samples_features():
    batches = [batch(EYEPACS_TEST, ["a", "b", "c"], errors=["", "OSError: truncated", ""]),
               batch(EXTERNAL, ["y", "x", "z", "w"], features={1, 3})]
    columns, features, undecodable = _collect(batches, MODELS)
    assert list(columns["image_id"]) == ["a", "c", "y", "x", "z", "w"]
    assert undecodable == [{"image_id": "b", "test_set": EYEPACS_TEST, "reason": "OSError: truncated"}]
    assert list(features["target"]) == [1.0, 1.0]  # rows x and w, in id order: w first
    np.testing.assert_array_equal(features["teacher"], [[3] * 4, [1] * 4])
    np.testing.assert_array_equal(features["student"], [[4] * 4, [2] * 4])


def test_a_tsne_sample_without_enough_decoded_images_is_said_and_drawn_from_nothing(tmp_path, capsys):
    """Every sampled image undecodable (or a tiny test set): the job goes on without the figure
    (t-SNE itself raises for fewer points than its perplexity)."""
    from drray.config import load_config
    from jobs.evaluate import _figures
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "ci.yaml", ["evaluate.tsne_images=10"])
    columns = {"test_set": np.array([VALIDATION] * 3, dtype=object)}
    features = {"target": np.zeros(2, np.float32), **{m: np.zeros((2, 4), np.float32) for m in MODELS}}
    _figures(columns, MODELS, {"results": []}, cfg, tmp_path, features)
    assert not (tmp_path / "tsne.png").exists()
    assert "no t-SNE figure: 2 image(s) of eyepacs_test have features" in capsys.readouterr().err
