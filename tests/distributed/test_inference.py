"""Batch inference's model actor, called directly (no Ray): it decodes the encoded rows it is
given with the training streams' pixels, one corrupt image is that row's outcome and not the
batch's, and features leave the model only for the rows that ask for them, which the select
tasks mark. The pipeline through Ray runs in tests/test_pseudolabel.py (a pool) and
tests/test_pipeline.py (evaluation's sets, with a t-SNE)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from drray.data.selection import WANTS_FEATURES, label_rows
from drray.data.transforms import decode_batch, decode_images, decode_jpeg_batch
from drray.distributed.datasets import Selection
from drray.distributed.inference import (
    DECODE_ERROR,
    MIN_OBJECT_STORE_BUDGET,
    ROWS_IN_FLIGHT_PER_ACTOR,
    Inference,
    ModelActor,
    features_column,
    features_of,
    object_store_budget,
    prob_column,
)
from drray.engine.checkpoint import load_model, save_checkpoint
from drray.engine.model import ModelSpec
from drray.engine.predict import predict_batch

SIZE = 32


def encoded(n: int, fmt: str = "JPEG", size: int = SIZE, seed: int = 0) -> list[bytes]:
    """Prepared-like images: smooth colour fields with noise, encoded as drray's prepare does."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ramp = np.linspace(0, 1, size)[None, :, None] * rng.uniform(60, 200, 3)
        pixels = np.clip(ramp + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        out.append(buffer.getvalue())
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    spec = ModelSpec("classifier", "resnet18", SIZE)
    torch.manual_seed(0)
    return str(save_checkpoint(tmp_path_factory.mktemp("teacher"), model=spec.build(), spec=spec, epoch=0,
                               metrics={}))


@pytest.fixture(scope="module")
def actor(teacher):
    return ModelActor({"teacher": teacher}, Inference(precision="fp32"), SIZE)


def rows(images: list[bytes], **extra) -> dict[str, np.ndarray]:
    """A batch as Ray Data hands it to the actor (numpy format)."""
    return {"image_id": np.array([f"img{i}" for i in range(len(images))], dtype=object),
            "image": np.array(images, dtype=object), **extra}


def plain_probs(teacher: str, images: list[bytes]) -> np.ndarray:
    model, _ = load_model(teacher)
    return predict_batch(model.eval(), decode_batch(images, SIZE), device=torch.device("cpu"), dtype=None)[0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_the_actor_decodes_encoded_rows_to_the_training_streams_pixels(actor, teacher, fmt):
    images = encoded(6, fmt)
    pixels, errors = actor.decode(np.array(images, dtype=object))
    np.testing.assert_array_equal(pixels, decode_batch(images, SIZE))  # the same decode, the same pixels
    assert errors == [""] * 6
    out = actor(rows(images, target=np.arange(6, dtype=np.float32)))
    assert "image" not in out and list(out["target"]) == list(range(6))  # other columns pass through
    np.testing.assert_allclose(out[prob_column("teacher")], plain_probs(teacher, images), atol=1e-5)
    assert list(out[DECODE_ERROR]) == [""] * 6 and features_column("teacher") not in out


def test_a_corrupt_image_is_its_rows_outcome_and_the_others_are_predicted(actor, teacher):
    good = encoded(5, seed=1)
    corrupt, truncated, wrong_size = b"\xff\xd8\xff not a jpeg", good[1][: len(good[1]) // 3], encoded(1, size=20)[0]
    batch = [good[0], corrupt, good[2], truncated, good[3], wrong_size, good[4]]
    out = actor(rows(batch))
    probs, errors = out[prob_column("teacher")], out[DECODE_ERROR]
    bad = [1, 3, 5]
    assert all(errors[i] for i in bad) and not any(errors[i] for i in (0, 2, 4, 6))
    assert "20x20" in errors[5] and "32x32" in errors[5]
    assert np.isnan(probs[bad]).all()
    np.testing.assert_allclose(probs[[0, 2, 4, 6]], plain_probs(teacher, [good[i] for i in (0, 2, 3, 4)]), atol=1e-5)
    assert len(out["image_id"]) == len(batch)  # one row out per row in: none dropped


def test_features_leave_the_model_only_for_the_rows_that_want_them(actor, teacher):
    images = encoded(5, seed=2)
    images[3] = b"broken"
    wants = np.array([True, False, False, True, True])
    out = actor(rows(images, **{WANTS_FEATURES: wants}))
    cells = [features_of(c) for c in out[features_column("teacher")]]
    assert [c.size > 0 for c in cells] == [True, False, False, False, True]  # row 3 wanted but undecodable
    model, _ = load_model(teacher)
    _, every = predict_batch(model.eval(), decode_batch([images[0], images[4]], SIZE), device=torch.device("cpu"),
                             dtype=None, features=True)
    np.testing.assert_allclose(np.stack([cells[0], cells[4]]), every, atol=1e-5)
    assert WANTS_FEATURES not in out


def test_the_batched_jpeg_decode_matches_the_cpu_decode_and_refuses_a_broken_batch():
    """The nvJPEG path's contract, checked with torchvision's CPU backend of the same call."""
    images = encoded(4, seed=3)
    cpu = torch.device("cpu")
    np.testing.assert_array_equal(decode_jpeg_batch(images, SIZE, cpu).numpy(), decode_batch(images, SIZE))
    with pytest.raises(RuntimeError):  # no partial results: the caller falls back to the CPU decode
        decode_jpeg_batch([images[0], b"\xff\xd8\xff broken"], SIZE, cpu)
    with pytest.raises(ValueError):
        decode_jpeg_batch(encoded(1, size=20), SIZE, cpu)


@pytest.mark.gpu
def test_nvjpeg_decodes_a_batch_on_the_gpu_and_falls_back_for_a_broken_image():
    images = encoded(8, seed=4)
    gpu = torch.device("cuda")
    pixels, errors = decode_images(images, SIZE, gpu)
    assert pixels.is_cuda and errors == [""] * 8
    # nvJPEG's IDCT and upsampling are not libjpeg-turbo's: close, not always equal
    assert np.abs(pixels.cpu().numpy().astype(int) - decode_batch(images, SIZE)).max() <= 8
    pixels, errors = decode_images([*images[:3], b"\xff\xd8\xff broken", *images[3:]], SIZE, gpu)
    assert [bool(e) for e in errors] == [False] * 3 + [True] + [False] * 5
    np.testing.assert_array_equal(pixels, decode_batch(images, SIZE))  # the CPU decode decided this batch


def test_rows_are_labelled_with_their_set_and_whether_they_want_features():
    rows = pa.table({"image_id": ["a", "b", "c"], "image": [b"1", b"2", b"3"]})
    labelled = label_rows(rows, "external", frozenset({"b", "z"}))
    assert labelled.column("test_set").to_pylist() == ["external"] * 3
    assert labelled.column(WANTS_FEATURES).to_pylist() == [False, True, False]
    other = label_rows(rows, "validation", frozenset())  # features asked for elsewhere: same schema, none here
    assert other.schema == labelled.schema and not any(other.column(WANTS_FEATURES).to_pylist())
    assert label_rows(rows, None, None).column_names == ["image_id", "image"]  # the pool: nothing to add


def test_actors_that_leave_no_cpu_to_the_read_tasks_are_refused_naming_the_setting():
    from drray.distributed.resources import Demand, check_fits, inference_demand

    hint = "lower pseudolabel.concurrency or pseudolabel.cpus_per_actor"
    check_fits(inference_demand(3, 1, False, "pseudolabel"), hint, capacity=Demand(4))  # 3 + 0.5 for the reads
    with pytest.raises(ValueError, match=r"pseudolabel: needs 4.5 CPUs \(data tasks' 0.5 included\).*concurrency"):
        check_fits(inference_demand(4, 1, False, "pseudolabel"), hint, capacity=Demand(4))
    with pytest.raises(ValueError, match="needs 2 GPU"):
        check_fits(inference_demand(2, 1, True, "evaluate"), "set evaluate.use_gpu=false", capacity=Demand(16, 1))


def test_the_object_store_budget_is_rows_per_actor_not_the_pool(tmp_path):
    """However large the pool, the pipeline may hold a fixed number of rows per actor (Ray
    Data's default, half the object store, let the reads run ahead until the pool was in it)."""
    def prepared(name: str, rows: int, image_bytes: int) -> Selection:
        folder = tmp_path / name
        (folder / "shards").mkdir(parents=True)
        images = [np.random.default_rng(i).bytes(image_bytes) for i in range(rows)]  # as incompressible as JPEGs
        pq.write_table(pa.table({"image": images}), folder / "shards" / "shard-00000.parquet")
        (folder / "manifest.json").write_text(json.dumps({"shards": [{"file": "shard-00000.parquet", "rows": rows}]}))
        return Selection.clean(str(folder), SIZE)

    large = prepared("large", 200, 40_000)  # ~299 px JPEGs
    budget = object_store_budget([large], Inference(concurrency=2))
    assert 2 * ROWS_IN_FLIGHT_PER_ACTOR * 40_000 <= budget <= 2 * ROWS_IN_FLIGHT_PER_ACTOR * 41_000
    assert object_store_budget([prepared("small", 200, 1_000), large], Inference(concurrency=2)) == budget
    assert object_store_budget([prepared("tiny", 20, 1_000)], Inference()) == MIN_OBJECT_STORE_BUDGET
