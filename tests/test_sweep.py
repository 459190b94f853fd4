"""`drray run sweep` (configs/sweep-ci.yaml at one seed: 2 fractions = 2 trials) on real Ray and
Tune: one trial's process is SIGKILLed (Tune retries it), then the whole sweep is SIGKILLed after
a trial finished and run again (finished trials are not redone); both trials' results, one
pretraining. (Several seeds: the grid and mean/sd tests here, and the SLURM job-array sweep in
test_slurm.py, which runs 2 seeds.)"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from drray.config import ClusterShare, ConfigError, load_config
from drray.distributed.resources import Demand
from drray.distributed.scaling import ClusterShape
from drray.report import sweep_summary
from jobs import sweep
from tests.conftest import REPO, ci_data_problem

SWEEP_CI = REPO / "configs" / "sweep-ci.yaml"
TRIALS = ["frac0.1-seed0", "frac0.25-seed0"]


# --- plain functions ----------------------------------------------------------------------------


def test_the_ci_sweep_config_is_ci_yaml_plus_a_sweep():
    cfg, ci = load_config(SWEEP_CI), load_config(REPO / "configs" / "ci.yaml")
    assert cfg.sweep.fractions == (0.1, 0.25) and cfg.sweep.seeds == (0, 1)
    assert cfg.pretrain == ci.pretrain and cfg.data == ci.data and cfg.finetune == ci.finetune
    assert cfg.evaluate.tsne_images == 0 and cfg.evaluate.bootstrap == ci.evaluate.bootstrap
    assert [t["name"] for t in sweep.grid(cfg)] == TRIALS + ["frac0.1-seed1", "frac0.25-seed1"]


def test_config_bases_report_cycles_and_missing_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml not found"):
        load_config(tmp_path / "c.yaml")


def test_grid_and_trial_configs(tmp_path):
    cfg = load_config(SWEEP_CI, [f"run.dir={tmp_path}"])
    with pytest.raises(ValueError, match="exactly one of sweep.fractions"):
        sweep.grid(dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, counts=(10,))))
    with pytest.raises(ValueError, match="not in"):
        sweep.grid(dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, fractions=(0.1, 2.0))))
    counts = dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, fractions=(), counts=(10, 30)))
    assert [t["name"] for t in sweep.grid(counts)] == ["n10-seed0", "n30-seed0", "n10-seed1", "n30-seed1"]
    trial = sweep.trial_config(cfg, sweep.grid(cfg)[3])
    assert (trial.labels.fraction, trial.labels.count, trial.labels.seed) == (0.25, None, 1)
    assert Path(trial.run.dir) == tmp_path.resolve() / "trials" / "frac0.25-seed1"
    assert Path(trial.run.stages) == tmp_path.resolve()  # every trial's stages in the sweep's cache


def test_the_experiment_follows_settings_not_placement(tmp_path):
    cfg = load_config(SWEEP_CI)
    name = sweep.experiment_name(cfg, sweep.grid(cfg))
    moved = load_config(SWEEP_CI, [f"run.dir={tmp_path}", "sweep.concurrent_trials=2", "sweep.max_failures=3"])
    assert sweep.experiment_name(moved, sweep.grid(moved)) == name
    changed = load_config(SWEEP_CI, ["student_finetune.epochs=3"])
    assert sweep.experiment_name(changed, sweep.grid(changed)) != name


def test_a_sweep_that_does_not_fit_the_cluster_says_what_is_missing():
    cfg = load_config(SWEEP_CI, ["sweep.concurrent_trials=3"])
    assert sweep.trial_demand(cfg, cpus(6)) == Demand(2.0, 0, "finetune.scaling")  # 0.5 + 1 worker + 0.5 data
    sweep.check_sweep_fits(cfg, cpus(6))
    with pytest.raises(ValueError, match=r"need 6 CPUs.*has 4 CPUs.*sweep.concurrent_trials=2"):
        sweep.check_sweep_fits(cfg, cpus(4))
    gpu = load_config(SWEEP_CI, ["distill.scaling.use_gpu=true", "distill.scaling.num_workers=2",
                                 "distill.batch_size=32"])
    with pytest.raises(ValueError, match=r"2 GPUs.*has 4 CPUs and 0 GPUs.*add nodes"):
        sweep.check_sweep_fits(gpu, cpus(4))
    baseline = load_config(SWEEP_CI, ["pipeline.baselines=[fixmatch]", "fixmatch.scaling.num_workers=2",
                                      "fixmatch.batch_size=8"])
    assert sweep.trial_demand(baseline, cpus(4)) == Demand(3.0, 0, "fixmatch.scaling")  # a baseline's workers count too


def test_auto_workers_take_one_trials_share_of_the_gpus():
    cfg = load_config(SWEEP_CI, ["sweep.concurrent_trials=2", "distill.scaling.use_gpu=true",
                                 "distill.scaling.num_workers=auto", "distill.batch_size=32",
                                 "pseudolabel.concurrency=auto", "pseudolabel.use_gpu=true"])
    eight_gpus = ClusterShape(64, 8, 1)
    assert sweep.trial_demand(cfg, eight_gpus.share(ClusterShare(2))).gpus == 4  # 4 workers, 4 actors per trial
    sweep.check_sweep_fits(cfg, eight_gpus)  # two trials of 4 GPUs fit 8
    trial = sweep.trial_config(cfg, sweep.grid(cfg)[0], share=sweep.tune_share(cfg))  # as a Tune trial gets it
    assert trial.share == ClusterShare(2, 0.5) and trial.distill.scaling.num_workers == "auto"  # resolved in the trial
    assert sweep.trial_config(cfg, sweep.grid(cfg)[0]).share == ClusterShare()  # a SLURM array task: a cluster of its own


def test_auto_counts_leave_a_trial_its_own_cpus():
    """16 CPUs, 2 trials, each trial's actor holding 2: "auto" CPU inference fills the 6 CPUs
    left of its half (5 actors and the read tasks' 0.5), so the sweep fits what auto sized
    (it filled all 8 before, and the check then refused its own choice)."""
    cfg = load_config(SWEEP_CI, ["sweep.concurrent_trials=2", "sweep.trial_cpus=2", "pseudolabel.concurrency=auto",
                                 "evaluate.concurrency=auto"])
    share = sweep.tune_share(cfg)
    one = sweep.trial_demand(cfg, cpus(16).share(share))
    assert one.cpus == 2 + 5.5 and one.cpus <= 8
    sweep.check_sweep_fits(cfg, cpus(16))


def cpus(n: float) -> ClusterShape:
    return ClusterShape(n, 0, 1)


def test_sweep_summary_mean_and_sd_over_seeds():
    rows = [{"test_set": "external", "method": "teacher", "fraction": 0.1, "count": 20, "auc": a}
            for a in (0.6, 0.8, 0.7)]
    rows.append({"test_set": "external", "method": "teacher", "fraction": 0.25, "count": 50, "auc": 0.9})
    summary = sweep_summary(rows)
    assert summary[("external", "teacher", 0.1, 20)]["mean"] == pytest.approx(0.7)
    assert summary[("external", "teacher", 0.1, 20)]["sd"] == pytest.approx(0.1)  # n - 1
    assert summary[("external", "teacher", 0.25, 50)]["sd"] == 0.0


def test_the_sweep_report_gives_mean_sd_and_n_per_labels_method_and_test_set_and_plots_every_seed(tmp_path,
                                                                                                   monkeypatch):
    """sweep_blocks on a written sweep.parquet (no Ray): the table's mean +- sd (n seeds), one seed
    shown without an sd, and the figure given every seed's AUC beside the mean and sd."""
    import pyarrow as pa

    from drray import plots, report

    rows = []
    for seed, aucs in enumerate(((0.6, 0.7), (0.8, 0.75), (0.7, 0.8))):
        for (fraction, count), auc in zip(((0.1, 24), (0.25, 60)), aucs, strict=True):
            rows.append({"trial": f"frac{fraction:g}-seed{seed}", "fraction": fraction, "count": count, "seed": seed,
                         "method": "teacher", "test_set": "external", "auc": auc, "ci_low": auc - 0.1,
                         "ci_high": auc + 0.1, "n": 60, "positives": 12, "trial_seconds": 10.0})
    rows.append({**rows[0], "trial": "frac0.1-seed0", "method": "student", "auc": 0.9})  # one seed only
    pq.write_table(pa.Table.from_pylist(rows, schema=report.SWEEP_SCHEMA), tmp_path / "sweep.parquet")
    given = {}
    monkeypatch.setattr(plots, "sweep_figure", lambda panels, path: given.update(panels))
    md = report.markdown(report.sweep_blocks(tmp_path))
    assert "| 10% (24) | 0.700 +- 0.100 (3) | 0.900 (1 seed: no sd) |" in md
    assert "| 25% (60) | 0.750 +- 0.050 (3) |  |" in md
    teacher = given["Messidor-2-style external"]["teacher"]
    assert [(f, round(m, 6), round(sd, 6), a) for f, m, sd, a in teacher] == [
        (0.1, 0.7, 0.1, [0.6, 0.8, 0.7]), (0.25, 0.75, 0.05, [0.7, 0.75, 0.8])]
    assert pq.read_table(tmp_path / "sweep.parquet").column("seed").to_pylist().count(1) == 2  # per seed, kept


def test_the_sweep_figure_draws_error_bars_and_every_seeds_dot(tmp_path, monkeypatch):
    from drray import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.sweep_figure({"t": {"teacher": [(0.1, 0.7, 0.1, [0.6, 0.8, 0.7]), (0.25, 0.75, 0.05, [0.7, 0.75, 0.8])]}},
                       tmp_path / "s.png")
    ax = figures[0].axes[0]
    bars = ax.containers[0]  # the errorbar: mean line, caps, +-sd segments
    assert list(bars.lines[0].get_ydata()) == [0.7, 0.75]
    segments = bars.lines[2][0].get_segments()
    assert [(round(s[0][1], 6), round(s[1][1], 6)) for s in segments] == [(0.6, 0.8), (0.7, 0.8)]
    assert sorted(y for c in ax.collections[1:] for y in c.get_offsets()[:, 1]) == [0.6, 0.7, 0.7, 0.75, 0.8, 0.8]


# --- the real sweep ------------------------------------------------------------------------------


def _wait(condition, what: str, proc: subprocess.Popen, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"sweep exited while waiting for {what}:\n" + proc.communicate()[0][-4000:]
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


def _attempts(run: Path, name: str) -> list[dict]:
    path = run / "trials" / name / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _stage_status(run: Path, name: str, stage: str) -> str | None:
    path = run / "trials" / name / "pipeline.json"
    if not path.is_file():
        return None
    entries = [e for inv in json.loads(path.read_text())["invocations"] for e in inv["stages"] if e["stage"] == stage]
    return entries[-1]["status"] if entries else None


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    run = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "-m", "jobs.cli", "run", "sweep", "--config", str(SWEEP_CI), "--set", f"run.dir={run}",
           "--set", "sweep.seeds=[0]"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    # 1. A trial's process dies in its teacher stage: Tune retries the trial.
    first = _wait(lambda: next((n for n in TRIALS if _stage_status(run, n, "teacher") == "running"), None),
                  "a trial's teacher stage", proc, 300)
    # inside the stage: its Ray Train worker is up (the stage cache is the sweep's run dir)
    _wait(lambda: list(run.glob("teacher-*/workers/rank0.pid")), "the teacher's training worker", proc, 300)
    os.kill(_attempts(run, first)[0]["pid"], signal.SIGKILL)
    # 2. Once a trial has finished and another is under way, the whole sweep is killed.
    _wait(lambda: (run / "trials" / first / "trial.json").is_file(), "the retried trial to finish", proc, 600)
    second = _wait(lambda: next((n for n in TRIALS if n != first and _attempts(run, n)), None), "a second trial",
                   proc, 120)
    _wait(lambda: _stage_status(run, second, "teacher") == "running", "the second trial's teacher", proc, 300)
    os.killpg(proc.pid, signal.SIGKILL)
    killed_log = proc.communicate()[0]
    assert not (run / "sweep.parquet").exists()
    # 3. The same command again finishes the sweep.
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert not (problem := ci_data_problem()), problem  # the counts below are of the whole set
    return run, first, killed_log, again


@pytest.mark.ray
@pytest.mark.slow
def test_every_trial_from_exactly_one_pretraining(swept):
    run, _, _, again = swept
    assert len(list(run.glob("pretrain-*"))) == 1  # the stage cache: one SimCLR run for the sweep
    pretrain = next(run.glob("pretrain-*"))
    epochs = [r["epoch"] for r in map(json.loads, (pretrain / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]
    assert epochs == [0, 1]  # trained once, never again by a trial or the rerun
    for name in TRIALS:
        assert _stage_status(run, name, "pretrain") == "skipped"
    assert len(list(run.glob("teacher-*"))) == 2 and len(list(run.glob("supervised-*"))) == 2
    table = pq.read_table(run / "sweep.parquet").to_pylist()
    assert sorted({r["trial"] for r in table}) == sorted(TRIALS)
    assert {(r["method"], r["test_set"]) for r in table} >= {
        (m, s) for m in ("teacher", "student", "supervised") for s in ("eyepacs_test", "external")}
    for name in TRIALS:  # each trial's AUCs are its own run's metrics.json
        metrics = json.loads((run / "trials" / name / "metrics.json").read_text())["results"]
        ours = {(r["method"], r["test_set"]): r["auc"] for r in table if r["trial"] == name}
        assert ours == {(r["model"], r["test_set"]): r["auc"] for r in metrics if r["unit"] == "image"}
    counts = {r["fraction"]: r["count"] for r in table}
    assert counts == {0.1: 24, 0.25: 60}  # the budgets (validation included) of the 240 labeled train images
    # nested: a seed's 10% subset lies inside its 25% subset
    small = json.loads((_stage_dir(run, "frac0.1-seed0", "teacher") / "subset.json").read_text())["labeled"]
    large = json.loads((_stage_dir(run, "frac0.25-seed0", "teacher") / "subset.json").read_text())["labeled"]
    assert set(small) < set(large)
    assert "frac0.25-seed0" in again.stdout and "mean +- sd" in again.stdout


def _stage_dir(run: Path, name: str, stage: str) -> Path:
    invocations = json.loads((run / "trials" / name / "pipeline.json").read_text())["invocations"]
    return Path(next(e["dir"] for inv in invocations for e in inv["stages"] if e["stage"] == stage and "dir" in e))


@pytest.mark.ray
@pytest.mark.slow
def test_a_trial_whose_process_died_was_retried_and_completed(swept):
    run, first, killed_log, _ = swept
    attempts = _attempts(run, first)
    assert len(attempts) >= 2 and attempts[1]["pid"] != attempts[0]["pid"]
    assert "failed; retrying" in killed_log
    invocations = json.loads((run / "trials" / first / "pipeline.json").read_text())["invocations"]
    assert invocations[0]["status"] == "running"  # the killed attempt never finished
    assert {e["stage"]: e["status"] for e in invocations[1]["stages"]}["pretrain"] == "skipped"
    assert invocations[-1]["status"] == "complete"


@pytest.mark.ray
@pytest.mark.slow
def test_the_rerun_restored_the_sweep_without_redoing_finished_trials(swept):
    run, first, _, again = swept
    assert "resuming" in again.stderr
    record = json.loads((run / "sweep.json").read_text())["invocations"]
    assert [inv["status"] for inv in record] == ["running", "complete"]
    assert {e["stage"]: e["status"] for e in record[1]["stages"]} == {
        "prepare": "skipped", "pretrain": "skipped", "trials": "ran"}
    # the trial that had finished before the kill: one complete pipeline run, no other
    invocations = json.loads((run / "trials" / first / "pipeline.json").read_text())["invocations"]
    assert sum(inv["status"] == "complete" for inv in invocations) == 1
    assert all(not a["already_finished"] for a in _attempts(run, first)[:2])
    for name in TRIALS:
        assert (run / "trials" / name / "report.md").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_table_figure_and_report(swept):
    run, _, _, _ = swept
    md = (run / "sweep.md").read_text()
    assert "| 10% (24) |" in md and "| 25% (60) |" in md and "(1 seed: no sd) |" in md  # one seed: no sd; budgets
    assert Image.open(run / "figures" / "sweep_auc.png").size[0] > 500
    report = (run / "report.md").read_text()
    assert "Label-fraction sweep" in report and "figures/sweep_auc.png" in report
    assert "data:image/png;base64," in (run / "report.html").read_text()
