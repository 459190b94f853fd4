"""The stage data pipeline's batch functions (pure: tested without Ray)."""

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from drray.data.selection import select_rows
from drray.data.transforms import AugmentSpec
from drray.distributed.datasets import Selection, to_model_inputs
from drray.methods import CleanImage, NoisyImage
from drray.methods.simclr import SimCLRViews


def jpeg(colour, size=32):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def shard_batch():
    return pa.table({
        "image_id": ["a", "b", "c", "d"],
        "image": [jpeg((200, 80, 30)), jpeg((10, 10, 10)), jpeg((90, 90, 90)), jpeg((30, 200, 40))],
        "split": ["train", "train", "test", "train"],
    })


def test_select_rows_filters_split_and_targets():
    selection = Selection("unused", NoisyImage(), 32, split="train", targets={"a": 1.0, "c": 0.0, "d": 0.0})
    out = select_rows(shard_batch(), selection.rows)
    assert out.column("image_id").to_pylist() == ["a", "d"]  # c is test, b has no target
    assert out.column("target").to_pylist() == [1.0, 0.0]


def test_select_rows_without_targets_keeps_the_split():
    out = select_rows(shard_batch(), Selection("unused", SimCLRViews(AugmentSpec(size=32)), 32, split="train").rows)
    assert out.column("image_id").to_pylist() == ["a", "b", "d"] and "target" not in out.column_names


def test_model_inputs_for_each_mode():
    rows = select_rows(shard_batch(), Selection("unused", CleanImage(), 32, split=None, targets={"a": 1.0, "b": 0.0}).rows)
    ev = to_model_inputs(rows, Selection.clean("unused", 32, split=None, targets={"a": 1.0, "b": 0.0}))
    assert ev["image"].shape == (2, 3, 32, 32) and ev["image"].dtype == np.uint8  # normalised on the device
    assert ev["target"].tolist() == [1.0, 0.0] and list(ev["image_id"]) == ["a", "b"]
    simclr = Selection("unused", SimCLRViews(AugmentSpec(size=24)), 32, split="train")
    shipped = to_model_inputs(select_rows(shard_batch(), simclr.rows), simclr)
    assert set(shipped) == {"image_id", "image"} and shipped["image"].dtype == np.uint8  # once, decoded
    views = simclr.views.augment({"image": torch.from_numpy(shipped["image"])}, torch.Generator().manual_seed(0))
    assert set(views) == {"view1", "view2"} and views["view1"].shape == (3, 3, 24, 24)  # made on the device


def test_the_unlabeled_stream_ships_its_images_under_their_own_key():
    from drray.methods import FixMatch

    selection = Selection("unused", FixMatch().unlabeled_views, 32, split="train")
    shipped = to_model_inputs(select_rows(shard_batch(), selection.rows), selection)
    assert set(shipped) == {"image_id", "u_image"}  # beside the labeled stream's "image" in a zipped batch


def test_empty_batch_keeps_the_schema():
    selection = Selection("unused", NoisyImage(), 32, split="val", targets={"a": 1.0})
    rows = select_rows(shard_batch(), selection.rows)
    out = to_model_inputs(rows, selection)
    assert out["image"].shape == (0, 3, 32, 32) and out["target"].shape == (0,)


def _two_eyed_pool(root, patients: int, size: int = 8):
    """A prepared set stored as prepare writes it: a patient's two eyes in neighbouring rows."""
    import json

    from drray.data.shards import ShardWriter

    writer = ShardWriter(root / "shards", rows_per_shard=250, rows_per_group=125)
    image = jpeg((90, 90, 90), size)
    ids = [f"{p}_{eye}" for p in range(patients) for eye in ("left", "right")]
    writer.write(pa.table({"image_id": ids, "image": [image] * len(ids), "grade": [None] * len(ids),
                           "dme": [None] * len(ids), "patient_id": [i.split("_")[0] for i in ids],
                           "source": ["eyepacs"] * len(ids), "split": ["train"] * len(ids), "path": ids,
                           "orig_width": [size] * len(ids), "orig_height": [size] * len(ids),
                           "fundus_cx": [0.0] * len(ids), "fundus_cy": [0.0] * len(ids), "fundus_r": [1.0] * len(ids)}))
    (root / "manifest.json").write_text(json.dumps({"shards": writer.close(), "params": {"size": size}}))
    return ids


def test_a_pool_epoch_shuffles_rows_so_two_eyes_share_a_batch_only_by_chance(tmp_path, ray_session):
    """Rows, not blocks: with the block order shuffled alone, nearly every patient's eyes shared
    a batch (they are neighbours in the shards), each other's SimCLR negatives."""
    from drray.distributed.datasets import Stream

    patients, batch = 200, 20
    ids = _two_eyed_pool(tmp_path, patients)
    stream = Stream(Selection(str(tmp_path), SimCLRViews(AugmentSpec(size=8)), 8, split="train"), batch,
                    epochs_per_pass=2)
    batches = [list(b["image_id"]) for b in stream.build().iter_batches(batch_size=batch, batch_format="numpy")]
    per_epoch = len(ids) // batch
    epochs = [sum(batches[:per_epoch], []), sum(batches[per_epoch:], [])]
    pairs = sum(len(b) - len({i.split("_")[0] for i in b}) for b in batches)  # patients seen twice in a batch
    chance = 2 * patients * (batch - 1) / (len(ids) - 1)  # partner in the same batch, over both epochs
    assert pairs <= chance + 4 * chance ** 0.5, (pairs, chance)  # blocks shuffled alone: ~2 x 200
    assert [sorted(e) for e in epochs] == [sorted(ids)] * 2  # every image once an epoch
    assert epochs[0] != epochs[1]  # each epoch its own order


def test_a_large_pool_streams_fewer_epochs_per_pass():
    """A pass's shuffled epochs wait in Ray's object store: the paper's 57k-image pool one at a time."""
    from jobs.common import epochs_per_pass

    assert epochs_per_pass(100, 57_146) == 1 and epochs_per_pass(100, 200_000) == 1
    assert epochs_per_pass(100, 2_899) == 10  # the demo pool: ten a pass, as before
    assert epochs_per_pass(100, 48) == 42 and epochs_per_pass(3, 48) == 3  # a small labeled subset: more


def test_a_semi_supervised_pass_is_counted_in_its_whole_pool():
    """FixMatch's epoch is pool/mu labeled batches, while its unlabeled stream reads the whole
    pool an epoch: its passes are sized by the pool (the paper's 57k images with mu 7: one
    epoch a pass, not the six that 57k/7 rows alone would allow, ~10 GB waiting shuffled)."""
    from drray.config import load_config
    from jobs import common
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "ci.yaml", ["fixmatch.epochs=100"])
    _, r = common.resolved(cfg, "fixmatch")
    plan = common.fit_plan(cfg, r, spec=None, method=None, n_rows=57_146 // 7, streamed_rows=57_146,
                           scaling=r.stage.config(cfg).scaling)
    assert plan.epochs_per_pass == 1 and plan.steps_per_epoch == 57_146 // 7 // 8


def test_a_small_budget_repeated_hundreds_of_times_a_pass_is_every_epoch_in_its_own_order(tmp_path, ray_session,
                                                                                            caplog):
    """FixMatch's labeled stream repeats a small budget hundreds of times a pass (a union of as
    many shuffled copies made a plan Ray could not pickle: tracebacks on the console every few
    seconds). Each epoch holds every image once, epochs differ, and a second pass of the same
    Dataset draws new orders."""
    from drray.distributed.datasets import Stream

    ids = _two_eyed_pool(tmp_path, 5)
    targets = {i: float(k % 2) for k, i in enumerate(ids)}
    ds = Stream(Selection(str(tmp_path), CleanImage(), 8, split="train", targets=targets), 5,
                epochs_per_pass=300).build()

    def epochs_of_one_pass():
        rows = [i for b in ds.iter_batches(batch_size=10, batch_format="numpy") for i in b["image_id"]]
        return [tuple(rows[k:k + 10]) for k in range(0, len(rows), 10)]

    first = epochs_of_one_pass()
    assert len(first) == 300 and all(sorted(e) == sorted(ids) for e in first)
    assert len(set(first)) > 250  # 10! orders: repeats are rare
    assert epochs_of_one_pass() != first  # the next pass draws its own
    assert not [r for r in caplog.records if "recursion" in r.getMessage()]
