"""The engine without Ray: schedules, optimisers, checkpoints, the loop, and learning."""

import math
import random

import numpy as np
import pytest
import torch

from drray.data.transforms import AugmentSpec
from drray.engine.checkpoint import load_model, load_training_state, read_meta, save_checkpoint
from drray.engine.loop import make_scaler, resolve_precision, train_epoch
from drray.engine.model import ModelSpec, init_backbone_from
from drray.engine.optim import LARS, build_optimizer, build_scheduler, lr_factor
from drray.engine.predict import predict
from drray.methods import SimCLR
from drray.methods.classify import classify_step
from drray.models.checkpoints import CheckpointMismatch


def test_lr_factor_warmup_then_cosine():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, 100, 0, "constant") == 1.0
    assert lr_factor(0, 100, 0, "fixmatch_cosine") == 1.0  # FixMatch: cos(7 pi k / 16 K)
    assert lr_factor(100, 100, 0, "fixmatch_cosine") == pytest.approx(math.cos(7 * math.pi / 16))
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(1, 10, 0, "step")


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "lars"])
def test_optimisers_reduce_a_quadratic(name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = build_optimizer([w], name, lr=0.05 if name != "lars" else 5.0)
    start = float((w**2).sum().detach())
    for _ in range(50):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert float((w**2).sum().detach()) < start


def test_lars_trust_ratio_scales_the_step():
    w = torch.nn.Parameter(torch.full((4, 4), 2.0))
    opt = LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.01)
    w.grad = torch.full((4, 4), 100.0)
    opt.step()
    # step = lr * trust * grad = 0.01 * |w|/|g| * g = 0.01 * (8 / 400) * 100 = 0.02
    assert torch.allclose(w, torch.full((4, 4), 2.0 - 0.02))


def _lars_per_parameter(params, lr, momentum, weight_decay, trust_coefficient, buffers):
    """LARS as the paper states it, one parameter at a time (the reference for the foreach one)."""
    with torch.no_grad():
        for p in params:
            grad = p.grad
            if p.ndim > 1:
                grad = grad + weight_decay * p
                p_norm, g_norm = p.norm(), grad.norm()
                if p_norm > 0 and g_norm > 0:
                    grad = grad * (trust_coefficient * p_norm / g_norm)
            buf = buffers.setdefault(id(p), torch.zeros_like(p))
            buf.mul_(momentum).add_(grad)
            p.add_(buf, alpha=-lr)


def test_lars_multi_tensor_step_equals_the_per_parameter_rule():
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (8,), (8,), (5, 8), (5,), (3, 3)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ours[-1].data.zero_()  # a zero weight: trust 1, as where |w| = 0
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = LARS(ours, lr=0.3, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.001)
    buffers = {}
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, reference, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours[1].grad = None if step == 2 else ours[1].grad  # a parameter without a gradient is left alone
        if step == 2:
            reference[1].grad = None
        opt.step()
        _lars_per_parameter([q for q in reference if q.grad is not None], 0.3, 0.9, 1e-4, 0.001, buffers)
        for p, q in zip(ours, reference, strict=True):
            assert torch.allclose(p, q, atol=1e-6), step


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(ValueError):
        resolve_precision("int8", cpu)


def tiny_spec(kind="classifier"):
    return ModelSpec(kind, "resnet18", 32, proj_hidden=16, proj_out=8)


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    spec = tiny_spec()
    model = spec.build()
    opt = build_optimizer(model.parameters(), "adam", 1e-3)
    sched = build_scheduler(opt, 10, 2, "cosine")
    scaler = make_scaler(torch.device("cpu"), None)
    x = torch.randn(4, 3, 32, 32)
    classify_step(model, {"image": x, "target": torch.ones(4)})[0].backward()
    opt.step()
    sched.step()
    np.random.seed(3)
    random.seed(4)
    save_checkpoint(tmp_path, model=model, spec=spec, epoch=7, metrics={"loss": 1.0}, optimizer=opt,
                    scheduler=sched, scaler=scaler)
    expected = (torch.rand(3), np.random.rand(3), random.random())

    weights = torch.load(tmp_path / "model.pt", weights_only=True)  # safe loading, no pickle
    assert set(weights) == set(model.state_dict())
    other = spec.build()
    opt2 = build_optimizer(other.parameters(), "adam", 1e-3)
    sched2 = build_scheduler(opt2, 10, 2, "cosine")
    epoch, metrics = load_training_state(tmp_path, model=other, optimizer=opt2, scheduler=sched2, scaler=scaler)
    assert epoch == 7 and metrics == {"loss": 1.0}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    assert sched2.last_epoch == sched.last_epoch
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.allclose(expected[1], again[1]) and expected[2] == again[2]
    loaded, meta = load_model(tmp_path)
    assert meta["epoch"] == 7 and read_meta(tmp_path)["spec"]["backbone"] == "resnet18"


def test_wrong_architecture_checkpoint_names_keys(tmp_path):
    simclr = ModelSpec("simclr", "resnet18", 32, proj_hidden=16, proj_out=8)
    save_checkpoint(tmp_path, model=simclr.build(), spec=simclr, epoch=0, metrics={})
    wrong = ModelSpec("classifier", "densenet121", 32).build()
    with pytest.raises(CheckpointMismatch) as exc:
        init_backbone_from(wrong, tmp_path)
    message = str(exc.value)
    assert "model.pt" in message and ("missing" in message.lower() or "unexpected" in message.lower())
    assert "conv1.weight" in message or "features." in message
    right = ModelSpec("classifier", "resnet18", 32).build()
    init_backbone_from(right, tmp_path)  # the explicit key map: backbone.* kept, projection.* dropped


def _views(images, spec_size=32, seed=0):
    from drray.data.transforms import AugmentSpec
    from drray.methods.simclr import SimCLRViews

    views = SimCLRViews(AugmentSpec(size=spec_size, crop_scale=(0.3, 1.0)))
    return views.augment({"image": torch.stack(images)}, torch.Generator().manual_seed(seed))


def test_two_views_differ_per_image():
    images = [torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8) for _ in range(4)]
    batch = _views(images)
    assert batch["view1"].shape == (4, 3, 32, 32)
    assert not torch.allclose(batch["view1"], batch["view2"])
    # one image, many draws: the crops/jitter differ (per-sample, not per-batch parameters)
    same = _views([images[0]] * 4)
    assert not torch.allclose(same["view1"][0], same["view1"][1])


@pytest.mark.slow
def test_simclr_loss_falls_on_synthetic_fundus_images(tmp_path):
    """Learning, not just running: SimCLR's loss goes down over epochs on synthetic data."""
    from drray.data.fundus import decode_image
    from drray.data.prepare import PrepareParams, prepare_rows
    from drray.data.sources import collect_inputs
    from drray.data.synthetic import synthesize

    synthesize(tmp_path, 192, seed=5, frame_scale=0.5, workers=2)
    items = collect_inputs("eyepacs", tmp_path, ["trainLabels.csv"]).items
    rows = [r for r in prepare_rows([vars(i) for i in items], PrepareParams(size=32)).to_pylist() if r["image"]]
    images = [torch.from_numpy(np.asarray(decode_image(r["image"])).copy()).permute(2, 0, 1) for r in rows]
    torch.manual_seed(0)
    spec = ModelSpec("simclr", "resnet18", 32, proj_hidden=128, proj_out=32)
    model = spec.build()
    opt = build_optimizer(model.parameters(), "adam", 1e-3)
    sched = build_scheduler(opt, 100, 0, "constant")
    scaler = make_scaler(torch.device("cpu"), None)
    step = SimCLR(AugmentSpec(size=32), temperature=0.5, gather=False).step()
    losses = []
    for epoch in range(6):
        order = torch.randperm(len(images)).tolist()
        batches = [_views([images[i] for i in order[s:s + 64]], seed=epoch * 10 + s) for s in range(0, len(order) - 63, 64)]
        metrics = train_epoch(model, batches, step, opt, sched, scaler, device=torch.device("cpu"), dtype=None)
        losses.append(metrics["loss"])
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < losses[0] - 0.1, losses


def test_predict_returns_probabilities_with_ids():
    model = tiny_spec().build()
    batches = [{"image_id": ["a", "b"], "image": np.random.rand(2, 3, 32, 32).astype(np.float32)}]
    ids, probs = predict(model, batches, device=torch.device("cpu"), dtype=None)
    assert ids == ["a", "b"] and probs.shape == (2,) and ((probs >= 0) & (probs <= 1)).all()


def test_uint8_images_are_normalised_on_the_device():
    from drray.data.transforms import MEAN, STD
    from drray.engine.loop import to_device

    images = np.full((2, 3, 4, 4), 255, np.uint8)
    out = to_device({"image": images, "target": np.ones(2, np.float32)}, torch.device("cpu"))
    assert out["image"].dtype == torch.float32
    assert torch.allclose(out["image"][0, :, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))
    assert out["target"].dtype == torch.float32


def test_early_stopping_rule_by_hand():
    from drray.engine.stopping import should_stop

    assert not should_stop([0.6, 0.7, 0.69], patience=2)
    assert should_stop([0.6, 0.7, 0.69, 0.70], patience=2)  # 0.70 does not beat 0.70
    assert not should_stop([0.6, 0.7, 0.69, 0.71], patience=2)
    # min_delta: 0.705 is not enough of a gain over 0.70, and the best stays 0.70
    assert should_stop([0.6, 0.7, 0.705, 0.709], patience=2, min_delta=0.01)
    assert not should_stop([0.6, 0.7, 0.705, 0.711], patience=2, min_delta=0.01)
    assert should_stop([0.6, None, None], patience=2)  # no validation AUC counts as no gain
    assert not should_stop([], patience=1)
    with pytest.raises(ValueError, match="patience"):
        should_stop([0.5], patience=0)


def test_batches_are_made_ahead_in_order_and_errors_reach_the_loop():
    import itertools
    import threading

    from drray.engine.loop import ahead

    made_in = set()

    def make(x):
        made_in.add(threading.current_thread().name)
        return x * 10

    assert list(ahead(range(7), make)) == [0, 10, 20, 30, 40, 50, 60]
    assert made_in == {"drray-ahead"}  # not in the loop's thread
    drawn = []
    source = (drawn.append(i) or i for i in itertools.count())  # a stream shared by epochs
    first = ahead(source, make, depth=2)
    assert [next(first), next(first)] == [0, 10]
    first.close()  # the epoch ends early (a failed step)
    assert len(drawn) <= 2 + 2 + 1  # used, queued, and the one in hand: no more taken from the stream

    def broken(x):
        if x == 3:
            raise ValueError("image 3 is broken")
        return x

    with pytest.raises(ValueError, match="image 3 is broken"):
        list(ahead(range(5), broken))


def test_the_next_batch_is_made_while_the_step_runs():
    import threading

    from drray.engine.loop import ahead

    second_made = threading.Event()

    def make(x):
        if x == 1:
            second_made.set()
        return x

    for x in ahead(range(3), make):
        if x == 0:  # the step of batch 0: batch 1 is being made meanwhile, not after
            assert second_made.wait(timeout=10)


@pytest.mark.gpu
def test_batches_reach_cuda_from_read_only_arrays_and_from_the_device():
    from drray.engine.loop import to_device

    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    images.flags.writeable = False  # as Ray Data hands them out
    cuda = torch.device("cuda")
    moved = to_device({"image": images, "on_device": torch.ones(2, 3, 4, 4, device=cuda)}, cuda)
    assert moved["image"].device.type == "cuda" and moved["on_device"].device.type == "cuda"
    assert torch.equal(moved["image"].cpu(), to_device({"image": images}, torch.device("cpu"))["image"])
