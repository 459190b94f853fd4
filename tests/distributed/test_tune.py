"""drray.distributed.tune.run_grid on a real Ray Tune: a trial that keeps failing is retried,
then reported as failed while the others finish; a second call restores the experiment and
reruns only the failed trial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drray.distributed.tune import run_grid

pytestmark = pytest.mark.ray


def flaky(config: dict, log: str) -> dict:
    """Records every attempt; trial "bad" raises until a file named "fixed" exists."""
    name = config["trial"]["name"]
    with open(Path(log) / "attempts.jsonl", "a") as f:
        f.write(json.dumps(name) + "\n")
    if name == "bad" and not (Path(log) / "fixed").exists():
        raise RuntimeError("this trial is broken")
    return {"value": config["trial"]["x"] * 2}


def _attempts(log: Path) -> list[str]:
    return [json.loads(line) for line in (log / "attempts.jsonl").read_text().splitlines()]


def test_a_failing_trial_is_retried_reported_and_rerun_on_restore(ray_session, tmp_path):
    from ray import tune

    trials = [{"name": "good", "x": 1}, {"name": "bad", "x": 2}, {"name": "also-good", "x": 3}]
    fn = tune.with_parameters(flaky, log=str(tmp_path))
    grid = dict(storage=tmp_path / "tune", experiment="grid", trial_cpus=0.5, concurrent=1, max_failures=1)
    outcomes = run_grid(fn, trials, **grid)
    assert [(o.name, o.status) for o in outcomes] == [("good", "finished"), ("bad", "failed"),
                                                      ("also-good", "finished")]
    assert "this trial is broken" in outcomes[1].error
    assert sorted(_attempts(tmp_path)) == ["also-good", "bad", "bad", "good"]  # 1 try + 1 retry
    (tmp_path / "fixed").touch()
    again = run_grid(fn, trials, **grid)  # same experiment: restored
    assert [o.status for o in again] == ["finished"] * 3
    assert sorted(_attempts(tmp_path)) == ["also-good", "bad", "bad", "bad", "good"]  # only "bad" ran again


def test_trial_names_must_be_unique(ray_session, tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_grid(flaky, [{"name": "a"}, {"name": "a"}], storage=tmp_path, experiment="x", trial_cpus=0.5,
                 concurrent=1, max_failures=0)
