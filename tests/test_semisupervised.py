"""The FixMatch and MixMatch baselines: their step functions on a tiny model, and both stages
through Ray Train at ci scale, publishing the EMA of the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drray.config import load_config
from drray.engine.checkpoint import load_model
from drray.engine.steps import fixmatch_step, mixmatch_step
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
    loss, n = fixmatch_step(0.95, 1.0)(model, batch)
    assert n == 4 and loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    loss.backward()
    assert model.net[1].weight.grad is not None


def test_mixmatch_step_ramps_its_unlabeled_weight_and_continues_after_resume():
    torch.manual_seed(0)
    model = Tiny()
    batch = _batch(4, 4, ["u_view0", "u_view1"])
    step = mixmatch_step(0.5, 0.75, lambda_u=100.0, rampup_steps=10, steps_done=0)
    torch.manual_seed(1)
    first, n = step(model, batch)  # ramp 0: the labeled loss alone
    assert n == 4 and torch.isfinite(first)
    resumed = mixmatch_step(0.5, 0.75, lambda_u=100.0, rampup_steps=10, steps_done=10)
    torch.manual_seed(1)
    full, _ = resumed(model, batch)  # same draws, ramp 1: adds 100 x the unlabeled MSE
    assert full.item() > first.item()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixmatch", "mixmatch"])
def test_baseline_trains_through_ray_train_and_publishes_its_ema(method, tmp_path, ray_session):
    from jobs import semisupervised

    cfg = load_config(CI, [f"run.dir={tmp_path}"])
    out = Path(semisupervised.run(cfg, method)["dir"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [0, 1]
    assert all(r["val_auc"] is not None and r["loss"] == r["loss"] for r in records if "epoch" in r)
    model, meta = load_model(out / "model")
    assert meta["spec"]["backbone"] == "resnet18" and meta["spec"]["kind"] == "classifier"
    # the published weights are the EMA kept in the last training checkpoint, not the raw ones
    last = sorted(p for p in (tmp_path / "ray" / out.name).glob("checkpoint_*") if p.is_dir())[-1]
    ema = torch.load(last / "ema.pt", weights_only=True)
    raw = torch.load(last / "model.pt", weights_only=True)
    published = torch.load(out / "model" / "model.pt", weights_only=True)
    key = next(k for k in published if k.endswith("weight") and published[k].dtype.is_floating_point)
    assert torch.equal(published[key], ema[key]) and not torch.equal(published[key], raw[key])
    assert semisupervised.run(cfg, method)["skipped"]  # finished: not trained again
