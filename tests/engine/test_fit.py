"""The fit loop in a plain process (no Ray): epochs, the metrics log, best and final models,
resume from the latest checkpoint, early stopping, passes of several epochs, EMA, and a short
epoch refused. The same loop runs inside Ray Train (tests/test_stages.py, tests/test_pipeline.py)."""

import json

import numpy as np
import pytest
import torch

from drray.artifacts import StageDir
from drray.config import OptimConfig
from drray.engine.fit import FitPlan, LocalRuntime, fit
from drray.engine.model import ModelSpec
from drray.methods import Classify, FixMatch

SIZE, BATCH, STEPS = 32, 8, 2


def labeled_stream(n_batches: int, seed: int = 0, calls: list | None = None, fail_on_call: int | None = None):
    """One pass: ``n_batches`` batches of images whose target is their brightness (learnable)."""

    def stream(batch_size, drop_last):
        if calls is not None:
            calls.append(batch_size)
            if fail_on_call is not None and len(calls) == fail_on_call:
                raise RuntimeError("the worker died")
        rng = np.random.default_rng(seed + len(calls or []))
        for _ in range(n_batches):
            target = rng.integers(0, 2, batch_size).astype(np.float32)
            images = (rng.integers(0, 60, (batch_size, 3, SIZE, SIZE)) + 150 * target[:, None, None, None])
            ids = np.asarray([f"img{i}" for i in range(batch_size)], dtype=object)
            yield {"image_id": ids, "image": images.astype(np.uint8), "target": target}

    return stream


def plan_for(tmp_path, **changes) -> FitPlan:
    base = dict(name="teacher", out_dir=str(tmp_path / "teacher-abc"), spec=ModelSpec("classifier", "resnet18", SIZE),
                method=Classify(), epochs=3, batch_size=BATCH, steps_per_epoch=STEPS,
                optim=OptimConfig(name="adam", lr=1e-3), precision="fp32", validate=True, seed=0)
    return FitPlan(**{**base, **changes})


def runtime_for(tmp_path, **streams) -> LocalRuntime:
    defaults = {"train": labeled_stream(STEPS * 10), "val": labeled_stream(3, seed=99)}
    return LocalRuntime({**defaults, **streams}, tmp_path / "checkpoints")


def test_every_epoch_is_logged_and_the_best_and_final_models_are_kept(tmp_path):
    plan = plan_for(tmp_path)
    metrics = fit(plan, runtime_for(tmp_path))
    out = StageDir(tmp_path / "teacher-abc")
    lines = [r for r in out.metrics() if "epoch" in r]
    assert [r["epoch"] for r in lines] == [0, 1, 2] and metrics["epoch"] == 2
    assert all(r["images"] == STEPS * BATCH and np.isfinite(r["loss"]) for r in lines)
    aucs = [r["val_auc"] for r in lines]
    assert out.best_metrics()["val_auc"] == max(aucs)
    assert json.loads((out.best / "meta.json").read_text())["epoch"] == aucs.index(max(aucs))
    assert (out.model / "model.pt").is_file() and json.loads((out.model / "meta.json").read_text())["epoch"] == 2
    assert out.final_model() == out.best
    assert out.pid(0) > 0


def test_a_run_that_died_resumes_from_its_last_checkpoint(tmp_path):
    calls: list = []
    # every pass is one epoch; the third pass (epoch 2) dies
    dying = runtime_for(tmp_path, train=labeled_stream(STEPS, calls=calls, fail_on_call=3))
    with pytest.raises(RuntimeError, match="the worker died"):
        fit(plan_for(tmp_path, epochs=4), dying)
    out = StageDir(tmp_path / "teacher-abc")
    assert out.epochs() == [0, 1]
    calls.clear()
    again = runtime_for(tmp_path, train=labeled_stream(STEPS, calls=calls))
    fit(plan_for(tmp_path, epochs=4), again)
    assert out.epochs() == [0, 1, 2, 3]  # every epoch once: continued, not restarted
    resumed = [r for r in out.metrics() if r.get("event") == "resumed"]
    assert [r["epochs_done"] for r in resumed] == [2]
    assert len(calls) == 2  # only epochs 2 and 3 were trained again


def test_early_stopping_stops_every_rank_at_the_same_epoch(tmp_path):
    plan = plan_for(tmp_path, epochs=5, patience=1, min_delta=1.0)  # no AUC can gain 1.0
    fit(plan, runtime_for(tmp_path))
    out = StageDir(tmp_path / "teacher-abc")
    assert out.epochs() == [0, 1]
    assert [r["after_epoch"] for r in out.metrics() if r.get("event") == "stopped_early"] == [1]
    assert (out.model / "model.pt").is_file() and (out.best / "model.pt").is_file()


def test_a_pass_streams_several_epochs_each_with_its_full_batches(tmp_path):
    calls: list = []
    runtime = runtime_for(tmp_path, train=labeled_stream(STEPS * 2, calls=calls))
    fit(plan_for(tmp_path, epochs=3, epochs_per_pass=2, validate=False), runtime)
    out = StageDir(tmp_path / "teacher-abc")
    assert out.epochs() == [0, 1, 2] and len(calls) == 2
    assert {r["images"] for r in out.metrics() if "epoch" in r} == {STEPS * BATCH}
    assert not out.best.exists() and out.final_model() == out.model  # nothing validated: the last model


def test_a_short_epoch_is_an_error_not_a_smaller_epoch(tmp_path):
    runtime = runtime_for(tmp_path, train=labeled_stream(1))
    with pytest.raises(RuntimeError, match="delivered 8 of 16 images"):
        fit(plan_for(tmp_path), runtime)


def test_fixmatch_zips_the_unlabeled_stream_and_publishes_its_ema(tmp_path):
    def unlabeled(batch_size, drop_last):
        rng = np.random.default_rng(5)
        for _ in range(STEPS * 10):
            yield {"u_image": rng.integers(0, 255, (batch_size, 3, SIZE, SIZE)).astype(np.uint8)}

    plan = plan_for(tmp_path, method=FixMatch(threshold=0.6), unlabeled_batch=2 * BATCH, ema_decay=0.5, epochs=2)
    runtime = runtime_for(tmp_path, unlabeled=unlabeled)
    fit(plan, runtime)
    out = StageDir(tmp_path / "teacher-abc")
    assert out.epochs() == [0, 1]
    lines = [json.loads(line) for line in out.metrics_file.read_text().splitlines()]
    assert all(0 <= line["mask_rate"] <= 1 for line in lines if "epoch" in line and "loss" in line)
    checkpoint = sorted((tmp_path / "checkpoints").glob("checkpoint_*"))[-1]
    raw = torch.load(checkpoint / "model.pt", weights_only=True)
    ema = torch.load(checkpoint / "ema.pt", weights_only=True)
    published = torch.load(out.model / "model.pt", weights_only=True)
    key = next(k for k in published if k.endswith("conv1.weight"))
    assert torch.equal(published[key], ema[key]) and not torch.equal(published[key], raw[key])


def test_the_pretraining_monitor_probes_the_features_every_n_epochs_and_after_the_last(tmp_path):
    from drray.data.transforms import AugmentSpec
    from drray.methods import SimCLR

    def views(batch_size, drop_last):  # the pool's decoded images: the loop makes the two views
        rng = np.random.default_rng(3)
        for _ in range(STEPS * 10):
            yield {"image": rng.integers(0, 255, (batch_size, 3, SIZE, SIZE)).astype(np.uint8)}

    plan = plan_for(tmp_path, name="pretrain", out_dir=str(tmp_path / "pretrain-abc"), validate=False,
                    spec=ModelSpec("simclr", "resnet18", SIZE, proj_hidden=32, proj_out=16),
                    method=SimCLR(AugmentSpec(size=SIZE), temperature=0.5), epochs=3, probe_every=2)
    runtime = runtime_for(tmp_path, train=views, probe_train=labeled_stream(2, seed=1),
                          probe_val=labeled_stream(2, seed=2))
    fit(plan, runtime)
    lines = [r for r in StageDir(tmp_path / "pretrain-abc").metrics() if "epoch" in r]
    probed = {r["epoch"]: r.get("knn_auc") for r in lines}
    assert probed[0] is None and 0.5 < probed[1] <= 1 and 0.5 < probed[2] <= 1  # epoch 2 of 2, and the last


def test_knn_votes_follow_the_nearest_labeled_features():
    from drray.engine.probe import knn_scores

    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    scores = knn_scores(train, np.array([1, 1, 0, 0], np.float32), np.array([[1, 0.05], [0.05, 1]], np.float32), k=2)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.0)


def test_a_resumed_epoch_trains_on_the_views_the_uninterrupted_run_made(tmp_path):
    """The views are made in the loop from a generator of (seed, rank, epoch) alone: epoch 2 of a
    run resumed after epoch 1 sees the views epoch 2 of an uninterrupted run saw."""
    from dataclasses import dataclass

    from drray.methods import NoisyImage
    from drray.methods.classify import classify_step

    @dataclass(frozen=True)
    class Recording:
        seen: list
        train_views = NoisyImage()
        unlabeled_views = None

        def step(self, steps_done=0):
            def step(model, batch):
                self.seen.append(float(batch["image"].double().sum()))
                return classify_step(model, batch)
            return step

    def same_images(fail_on_call=None, calls=[]):  # noqa: B006 - counts the passes across runs
        def stream(batch_size, drop_last):
            calls.append(1)
            if len(calls) == fail_on_call:
                raise RuntimeError("the worker died")
            yield from labeled_stream(STEPS)(batch_size, drop_last)
        return stream

    whole = []
    fit(plan_for(tmp_path / "a", method=Recording(whole), validate=False), runtime_for(tmp_path / "a", train=same_images()))
    resumed = []
    dying = runtime_for(tmp_path / "b", train=same_images(fail_on_call=3, calls=[]))
    with pytest.raises(RuntimeError, match="the worker died"):
        fit(plan_for(tmp_path / "b", method=Recording(resumed), validate=False), dying)
    resumed.clear()
    fit(plan_for(tmp_path / "b", method=Recording(resumed), validate=False), runtime_for(tmp_path / "b", train=same_images()))
    assert len(whole) == 3 * STEPS and len(resumed) == STEPS
    assert resumed == whole[2 * STEPS:]  # epoch 2's views, exactly
    assert whole[:STEPS] != whole[STEPS:2 * STEPS]  # and every epoch draws anew


@pytest.mark.gpu
def test_a_compiled_model_trains_on_cuda_and_saves_the_plain_models_keys(tmp_path):
    """scaling.compile: the forward compiled in place, so checkpoints load into a plain model."""
    from drray.engine.checkpoint import load_model

    runtime = LocalRuntime({"train": labeled_stream(STEPS * 10), "val": labeled_stream(3, seed=99)},
                           tmp_path / "checkpoints", device="cuda")
    metrics = fit(plan_for(tmp_path, epochs=1, compile=True, channels_last=True, precision="bf16"), runtime)
    assert np.isfinite(metrics["loss"])
    model, _ = load_model(StageDir(tmp_path / "teacher-abc").model, torch.device("cpu"))  # strict keys
    assert not any("_orig_mod" in k for k in model.state_dict())
