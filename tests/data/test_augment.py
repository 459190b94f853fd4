"""Batched augmentation with per-image parameters (drray.data.augment): randomness per image and
view, determinism by seed, identity when switched off, each op's rate and range, agreement with
torchvision's per-image ops, and the same statistics on CPU and CUDA."""

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from drray.data import augment as A
from drray.data.transforms import AugmentSpec

OFF = dict(crop_scale=(1.0, 1.0), hflip=0.0, vflip=0.0, rotation=0.0, jitter_prob=0.0, grayscale_prob=0.0,
           blur_prob=0.0)  # every SimCLR augmentation switched off


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 6, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=seeded(seed))


def only(**on) -> AugmentSpec:
    return AugmentSpec(size=24, **{**OFF, **on})


def test_identical_images_get_distinct_views_and_the_two_views_differ():
    same = images(1).expand(8, 3, 24, 24)
    view1, view2 = A.SimCLRAugment(AugmentSpec(size=24))(same, seeded())
    assert len({v.numpy().tobytes() for v in view1}) == 8  # per image, not per batch
    assert all(not torch.allclose(a, b) for a, b in zip(view1, view2, strict=True))
    for on in (dict(crop_scale=(0.2, 1.0)), dict(rotation=180.0), dict(jitter_prob=1.0), dict(blur_prob=1.0)):
        alone, _ = A.SimCLRAugment(only(**on))(same, seeded())  # each op draws per image on its own
        assert len({v.numpy().tobytes() for v in alone}) == 8, on


def test_the_same_seed_gives_the_same_views_and_another_seed_others():
    x = images()
    augment = A.SimCLRAugment(AugmentSpec(size=24))
    first, again, other = augment(x, seeded(3)), augment(x, seeded(3)), augment(x, seeded(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.allclose(first[0], other[0])
    for make in (A.NoiseAugment(), A.WeakAugment(), A.StrongAugment()):
        assert torch.equal(make(x, seeded(1)), make(x, seeded(1)))


def test_with_every_augmentation_off_a_view_is_the_image():
    x = images()
    view1, view2 = A.SimCLRAugment(only())(x, seeded())
    assert torch.allclose(view1, x / 255, atol=1e-5) and torch.allclose(view2, x / 255, atol=1e-5)
    assert torch.equal(A.Jitter(0.4, 0.4, 0.4, 0.1, p=0.0)(x / 255, seeded()), x / 255)
    unmoved = A.WeakAugment(translate=0.0)(x, seeded())  # the flip alone: the image or its mirror, exactly
    assert all(torch.equal(v, i / 255) or torch.equal(v, i.flip(-1) / 255) for v, i in zip(unmoved, x, strict=True))


@pytest.mark.parametrize("make", [lambda x, g: A.SimCLRAugment(AugmentSpec(size=16))(x, g)[0], A.NoiseAugment(),
                                  A.WeakAugment(), A.StrongAugment()],
                         ids=["simclr", "noise", "weak", "strong"])
def test_views_are_float_in_the_unit_range_on_the_input_device(make):
    x = images(8)
    out = make(x, seeded())
    assert out.dtype == torch.float32 and out.device == x.device and out.shape[0] == 8
    assert out.min() >= 0 and out.max() <= 1


def test_crop_areas_and_aspect_ratios_stay_in_their_ranges():
    for scale in ((0.2, 1.0), (0.85, 0.95)):  # the narrow range needs the ratio rule, not clamping
        box = A.crop_boxes(4000, scale, seeded())
        w, h, cx, cy = box.unbind(1)
        area, ratio = w * h, w / h
        assert area.min() >= scale[0] - 1e-6 and area.max() <= scale[1] + 1e-6
        assert area.min() < scale[0] + 0.02 and area.max() > scale[1] - 0.02  # the whole range is drawn
        assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
        assert ((cx.abs() + w) <= 1 + 1e-6).all() and ((cy.abs() + h) <= 1 + 1e-6).all()  # inside the image
    theta = A.simclr_geometry(4000, AugmentSpec(size=24), seeded())
    area = theta[:, :, :2].det().abs()  # the crop's share of the image, from the sampling matrices
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 1 + 1e-5


def test_flips_and_rotation_are_drawn_per_image_in_range():
    n = 4000
    flipped = A.simclr_geometry(n, only(hflip=0.5, vflip=0.2), seeded())[:, :, :2]
    assert abs((flipped[:, 0, 0] < 0).float().mean() - 0.5) < 0.05
    assert abs((flipped[:, 1, 1] < 0).float().mean() - 0.2) < 0.05
    turned = A.simclr_geometry(n, only(rotation=30.0), seeded())
    angle = torch.rad2deg(torch.atan2(turned[:, 1, 0], turned[:, 0, 0]))
    assert angle.abs().max() <= 30 + 1e-3 and angle.min() < -28 and angle.max() > 28


def grey_share(spec: AugmentSpec, n: int = 2000) -> float:
    colourful = torch.tensor([200, 40, 90], dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, 4, 4)
    view, _ = A.SimCLRAugment(spec)(colourful, seeded())
    return float((view.amax(1) - view.amin(1) < 1e-6).flatten(1).all(1).float().mean())


def test_grayscale_and_jitter_apply_to_their_share_of_the_images():
    # binomial(2000, p): a standard deviation of 0.009 at most; 0.05 is over 5 of them
    assert abs(grey_share(only(grayscale_prob=0.2)) - 0.2) < 0.05
    assert grey_share(only()) == 0.0
    x = torch.full((2000, 3, 4, 4), 0.5)
    jittered = A.Jitter(0.4, 0.4, 0.4, 0.0, p=0.8)(x, seeded())
    assert abs((jittered != 0.5).flatten(1).any(1).float().mean() - 0.8) < 0.05
    factors = A.Jitter(0.4, 0.4, 0.4, 0.1, p=0.8).draw(4000, seeded())
    for name in ("brightness", "contrast", "saturation"):
        assert factors[name].min() >= 0.6 and factors[name].max() <= 1.4 and factors[name].std() > 0.2
    assert factors["hue"].abs().max() <= 0.1


def test_colour_ops_with_per_image_factors_match_torchvision_image_by_image():
    x = images(4).float() / 255
    factors = torch.tensor([0.5, 0.9, 1.3, 1.7])
    per_image = factors.view(-1, 1, 1, 1)
    for ours, theirs in ((A.adjust_brightness, TF.adjust_brightness), (A.adjust_contrast, TF.adjust_contrast),
                         (A.adjust_saturation, TF.adjust_saturation)):
        expected = torch.stack([theirs(x[i], float(f)) for i, f in enumerate(factors)])
        assert torch.allclose(ours(x, per_image), expected, atol=1e-5), ours.__name__
    shifts = torch.tensor([-0.4, -0.05, 0.1, 0.5])
    expected = torch.stack([TF.adjust_hue(x[i], float(s)) for i, s in enumerate(shifts)])
    assert torch.allclose(A.adjust_hue(x, shifts), expected, atol=1e-5)


def test_blur_is_separable_truncated_and_close_to_the_full_kernel():
    kernels = A.blur_kernels(torch.tensor([0.1, 2.0]))
    assert kernels.shape == (2, 2 * math.ceil(3 * 2.0) + 1) == (2, 13)  # not 29 taps at 299 px
    assert torch.allclose(kernels.sum(1), torch.ones(2))
    impulse = torch.zeros(1, 3, 31, 31)
    impulse[..., 15, 15] = 1
    spread = A.gaussian_blur(impulse, torch.tensor([2.0]))[0, 0]
    assert (spread[15] > 0).sum() == 13 and (spread[:, 15] > 0).sum() == 13
    x = images(2, 40).float() / 255
    full = torch.stack([TF.gaussian_blur(x[i], [29, 29], [2.0, 2.0]) for i in range(2)])
    assert (A.gaussian_blur(x, torch.tensor([2.0, 2.0])) - full).abs().max() < 0.01
    sigma = A.SimCLRAugment(AugmentSpec(size=24)).draw(4000, seeded())
    assert sigma["sigma"].min() >= 0.1 and sigma["sigma"].max() <= 2.0
    assert abs(sigma["blurred"].float().mean() - 0.5) < 0.05


def test_strong_views_apply_their_ops_to_every_image(monkeypatch):
    ops, strength = A.rand_augment_plan(500, num_ops=2, generator=seeded())
    assert ops.shape == (500, 2) and len(ops[:, 0].unique()) == len(A.RAND_OPS)  # ops chosen per image
    assert len(strength[:, 0].abs().unique()) > 20 and torch.equal(strength[:, 0].abs(), strength[:, 1].abs())
    for name in A.RAND_OPS:  # every op counts itself: +0.01 per op an image goes through
        monkeypatch.setitem(A.RAND_OPS, name, lambda x, s: x + 0.01)
    counted = A.rand_augment(torch.zeros(64, 3, 4, 4), *A.rand_augment_plan(64, 3, generator=seeded()))
    assert torch.allclose(counted, torch.full_like(counted, 0.03))
    strong = A.StrongAugment(num_ops=3, cutout=1e-6)(torch.zeros(64, 3, 4, 4, dtype=torch.uint8), seeded())
    counted = ((strong - 0.03).abs() < 1e-5).flatten(1).sum(1)  # the strong view: weak, the ops, then Cutout
    assert (counted == 3 * 4 * 4 - 3).all()  # every pixel went through 3 ops, but Cutout's one


def test_each_randaugment_op_changes_an_image_and_keeps_it_in_range():
    x = images(4, 16).float() / 255
    for name, op in A.RAND_OPS.items():
        out = op(x, torch.tensor([0.7, -0.7, 1.0, -1.0]))
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1, name
        assert name == "identity" or not torch.allclose(out, x), name
    assert torch.equal(A._equalize(x, None), torch.stack([TF.equalize((x[i] * 255).round().to(torch.uint8))
                                                          for i in range(4)]).float() / 255)


def test_mixmatch_makes_k_distinct_weak_views_of_each_unlabeled_image():
    from drray.methods.mixmatch import MixMatchViews

    views = MixMatchViews(3).views(images(1).expand(4, 3, 24, 24), seeded())
    assert sorted(views) == ["u_view0", "u_view1", "u_view2"]
    assert not torch.equal(views["u_view0"], views["u_view1"])


@pytest.mark.gpu
def test_cpu_and_cuda_give_the_same_statistics():
    x = images(64, 64)
    for make in (lambda x, g: A.SimCLRAugment(AugmentSpec(size=48))(x, g)[1], A.NoiseAugment(), A.WeakAugment(),
                 A.StrongAugment()):
        cpu, cuda = make(x, seeded(7)), make(x.cuda(), seeded(7))
        assert cuda.device.type == "cuda" and cuda.dtype == torch.float32
        cuda = cuda.cpu()
        # the parameters are drawn on the CPU either way: per-image statistics agree closely
        assert torch.allclose(cpu.mean((1, 2, 3)), cuda.mean((1, 2, 3)), atol=2e-3)
        assert torch.allclose(cpu.std((1, 2, 3)), cuda.std((1, 2, 3)), atol=2e-3)
        assert (cpu - cuda).abs().mean() < 2e-3


def test_a_methods_views_replace_its_streams_images_in_the_batch():
    from drray.methods import FixMatch, augment_batch

    batch = {"image": images(4), "target": torch.ones(4), "u_image": images(8, seed=1)}
    out = augment_batch(FixMatch(), batch, seeded())
    assert sorted(out) == ["image", "target", "u_strong", "u_weak"]
    assert out["image"].dtype == torch.float32 and out["u_strong"].shape == (8, 3, 24, 24)
    assert out["image"].min() < 0  # standardised for the model, not [0, 1]
    with pytest.raises(KeyError, match="'u_image'"):
        augment_batch(FixMatch(), {"image": images(4), "target": torch.ones(4)}, seeded())


def test_weak_views_flip_half_the_images_and_shift_them_at_most_an_eighth():
    p = A.WeakAugment().draw(4000, seeded())
    assert abs(p["weak_flip"].float().mean() - 0.5) < 0.05
    assert p["weak_shift"].abs().max() <= 0.125 and p["weak_shift"].abs().max() > 0.12
    dot = torch.zeros(200, 3, 32, 32, dtype=torch.uint8)
    dot[:, :, 16, 16] = 255
    moved = A.WeakAugment()(dot, seeded()).amax(1).flatten(1).argmax(1)
    dy, dx = moved // 32 - 16, moved % 32
    dx = torch.minimum((dx - 16).abs(), (dx - 15).abs())  # mirrored, the dot sits at column 15
    assert dy.abs().max() <= 4 and dx.max() <= 4 and dy.abs().max() >= 3  # 12.5% of 32 px
