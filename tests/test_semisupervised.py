"""The FixMatch and MixMatch baselines' step functions on a tiny model."""

from __future__ import annotations

import pytest
import torch

from drray.methods import FixMatch, MixMatch
from tests.conftest import REPO

CI = REPO / "configs" / "ci.yaml"


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


def _batch(n: int, m: int, keys: list[str]) -> dict:
    batch = {"image": torch.randn(n, 3, 4, 4), "target": torch.randint(0, 2, (n,)).float()}
    batch.update({k: torch.randn(m, 3, 4, 4) for k in keys})
    return batch


def test_fixmatch_step_is_supervised_loss_when_nothing_is_confident():
    torch.manual_seed(0)
    model = Tiny()
    torch.nn.init.zeros_(model.net[1].weight)
    torch.nn.init.zeros_(model.net[1].bias)  # p = 0.5 everywhere: no unlabeled image passes tau
    batch = _batch(4, 8, ["u_weak", "u_strong"])
    loss, n, stats = FixMatch(threshold=0.95, lambda_u=1.0).step()(model, batch)
    assert n == 4 and loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert stats["mask_rate"].item() == 0.0  # what metrics.jsonl shows as the epoch's mask_rate
    loss.backward()
    assert model.net[1].weight.grad is not None


def test_fixmatch_reports_how_many_unlabeled_images_pass_the_threshold():
    from drray.losses import fixmatch_targets
    from drray.methods.fixmatch import pseudo_label_stats

    p = torch.sigmoid(torch.tensor([4.0, -4.0, 0.1, 3.5, 0.0]))  # p = 0.98, 0.02, 0.52, 0.97, 0.5
    stats = pseudo_label_stats(*fixmatch_targets(p, threshold=0.95))
    assert stats["mask_rate"].item() == pytest.approx(3 / 5)
    assert stats["masked_positive_rate"].item() == pytest.approx(2 / 3)
    assert stats["guess_positive_rate"].item() == pytest.approx(4 / 5)


def test_fixmatch_ramps_its_unlabeled_weight_and_continues_after_resume():
    batch = _batch(4, 8, ["u_weak", "u_strong"])
    method = FixMatch(threshold=0.95, lambda_u=1.0, rampup_steps=10)
    first, *_ = method.step(steps_done=0)(_confidently_negative(), batch)  # ramp 0: the labeled loss alone
    full, *_ = method.step(steps_done=10)(_confidently_negative(), batch)  # ramp 1: + every confident negative
    published, *_ = FixMatch(threshold=0.95, lambda_u=1.0).step()(_confidently_negative(), batch)
    assert first.item() < full.item() and full.item() == pytest.approx(published.item())
    assert first.item() == pytest.approx(torch.nn.functional.binary_cross_entropy(
        torch.full((4,), 0.02), batch["target"]).item(), rel=1e-5)


def _confidently_negative() -> Tiny:
    """A model that calls every image p = 0.02: the collapse seen on the demo data."""
    model = Tiny()
    torch.nn.init.zeros_(model.net[1].weight)
    torch.nn.init.constant_(model.net[1].bias, float(torch.logit(torch.tensor(0.02))))
    return model


def test_fixmatch_aligned_to_the_labeled_prior_does_not_train_on_a_collapsed_guess():
    batch = _batch(4, 8, ["u_weak", "u_strong"])
    _, _, published = FixMatch(threshold=0.95).step()(_confidently_negative(), batch)
    assert published["mask_rate"].item() == 1.0 and published["masked_positive_rate"].item() == 0.0
    # aligned: the model's mean 0.02 against a 20% prior lifts every guess to 0.2, confident of nothing
    _, _, aligned = FixMatch(threshold=0.95, prior=0.2).step()(_confidently_negative(), batch)
    assert aligned["mask_rate"].item() == 0.0


def test_mixmatch_aligns_its_guess_before_sharpening():
    batch = _batch(4, 4, ["u_view0", "u_view1"])
    _, _, published = MixMatch(temperature=0.5, views=2).step()(_confidently_negative(), batch)
    assert published["guess_confidence"].item() > 0.99  # 0.02 sharpened: ~0.0004
    _, _, aligned = MixMatch(temperature=0.5, views=2, prior=0.5).step()(_confidently_negative(), batch)
    assert aligned["guess_confidence"].item() == pytest.approx(0.5, abs=1e-5)  # aligned to 0.5, sharpened: 0.5


def test_weight_decay_spares_batchnorm_and_biases():
    from drray.engine.optim import parameter_groups
    from drray.models.backbones import create_backbone

    model = create_backbone("resnet18")
    decayed, spared = parameter_groups(model, 5e-4)
    assert decayed["weight_decay"] == 5e-4 and spared["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert {"bn1.weight", "bn1.bias", "layer1.0.bn2.weight", "layer2.0.downsample.1.bias"} <= spared_names
    assert not any(name.endswith("conv1.weight") for name in spared_names)
    assert {names[id(p)] for p in decayed["params"]} >= {"conv1.weight", "layer1.0.conv1.weight"}
    assert len(decayed["params"]) + len(spared["params"]) == len(list(model.parameters()))


def test_mixmatch_step_ramps_its_unlabeled_weight_and_continues_after_resume():
    torch.manual_seed(0)
    model = Tiny()
    batch = _batch(4, 4, ["u_view0", "u_view1"])
    method = MixMatch(temperature=0.5, alpha=0.75, lambda_u=100.0, rampup_steps=10, views=2)
    step = method.step(steps_done=0)
    torch.manual_seed(1)
    first, n, stats = step(model, batch)  # ramp 0: the labeled loss alone
    assert 0.5 <= stats["guess_confidence"].item() <= 1 and 0 <= stats["guess_positive_rate"].item() <= 1
    assert n == 4 and torch.isfinite(first)
    resumed = method.step(steps_done=10)
    torch.manual_seed(1)
    full, *_ = resumed(model, batch)  # same draws, ramp 1: adds 100 x the unlabeled MSE
    assert full.item() > first.item()


# Both stages through Ray Train, publishing their EMA: tests/test_pipeline.py (table1 on the
# pipeline's run, so the suite pays for these fits once).


def test_a_short_run_is_warned_that_its_ema_is_mostly_the_initial_weights(capsys):
    from jobs.semisupervised import _warn_if_ema_is_mostly_initial, initial_weight_in_ema

    assert abs(initial_weight_in_ema(0.999, 280) - 0.7557) < 1e-3  # the demo's 10 epochs x 28 steps
    _warn_if_ema_is_mostly_initial("fixmatch", 0.999, 280)
    err = capsys.readouterr().err
    assert "still holds 76% of the initial weights" in err and "lower fixmatch.ema_decay (e.g. 0.989)" in err
    _warn_if_ema_is_mostly_initial("fixmatch", 0.99, 280)  # 6% left: no warning
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["fixmatch", "mixmatch"])
def test_a_baseline_with_init_pretrained_starts_from_the_pretrainings_backbone(name, tmp_path, monkeypatch):
    """The job's own path to the fit loop (jobs.semisupervised.run, Ray and the data stubbed out):
    the model the loop starts with holds the pretraining's backbone, and its own fresh head."""
    import dataclasses

    from drray.config import load_config
    from drray.engine import fit as fit_loop
    from drray.engine.checkpoint import save_checkpoint
    from drray.engine.model import ModelSpec
    from jobs import common, semisupervised, stages

    cfg = load_config(CI, [f"run.dir={tmp_path / 'run'}", f"{name}.init=pretrained"])
    resolved = stages.resolve(cfg, {"content_hash": "c0ffee"})
    pretrain, r = resolved["pretrain"], resolved[name]
    simclr = ModelSpec("simclr", cfg.pretrain.backbone, cfg.data.size, proj_hidden=16, proj_out=8)
    torch.manual_seed(0)
    pretrained = simclr.build()
    pretrained.backbone.layer1[0].bn1.running_mean.normal_()  # trained statistics, not a fresh model's zeros
    save_checkpoint(pretrain.dir.model, model=pretrained, spec=simclr, epoch=1, metrics={})
    pool = [f"{i}_left" for i in range(200)]
    plans = []
    monkeypatch.setattr(common, "resolved", lambda cfg, stage: ({}, r))
    monkeypatch.setattr(common, "pool_ids", lambda cfg: pool)
    monkeypatch.setattr(common, "labeled_subset", lambda cfg: common.LabeledSubset(
        dict.fromkeys(pool[:16], 0.0), dict.fromkeys(pool[16:24], 1.0), 200))
    monkeypatch.setattr(common, "fit", lambda cfg, r, plan, datasets: plans.append(plan) or {})
    semisupervised.run(cfg, name)
    (plan,) = plans
    assert plan.init_backbone == str(pretrain.dir.model) and plan.init_model is None
    torch.manual_seed(1)  # a head (and a backbone, were it not loaded) other than the pretraining's draw
    start = fit_loop._initial_model(plan)
    expected = pretrained.backbone.state_dict()
    assert start.backbone.state_dict().keys() == expected.keys()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer1.0.bn1.running_mean"):
        assert torch.equal(start.backbone.state_dict()[key], expected[key]), key

    random_start = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), init="random")})
    spec, checkpoint = semisupervised.initial_model(random_start, stages.resolve(random_start, {"content_hash": "c0ffee"})[name])
    assert checkpoint is None and spec.init == "random"
    other = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), backbone="resnet50")})
    with pytest.raises(ValueError, match=f"set {name}.backbone=resnet18"):
        semisupervised.initial_model(other, stages.resolve(other, {"content_hash": "c0ffee"})[name])
