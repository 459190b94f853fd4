"""`drray submit` on a real SLURM cluster of 2 nodes on this machine (slurm/local-cluster.sh:
munged + slurmctld + 2 slurmd), submitit, and Ray formed over the allocation.

The slow tests share one story: configs/ci.yaml's pipeline on 2 nodes with a 3-minute limit
hits the limit (SLURM's warning signal: the job requeues itself), is then requeued by
``scontrol requeue`` midway, and finishes, with no finished stage redone; then a sweep as a
job array reuses that run's stages through the stage cache.

Without slurm-wlm / munge these tests skip, saying how to enable them; with
DRRAY_REQUIRE_SLURM=1 (CI) they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "configs" / "ci.yaml"
SWEEP_CI = REPO / "configs" / "sweep-ci.yaml"
CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"


# --- the cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    required = os.environ.get("DRRAY_REQUIRE_SLURM") == "1"
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(t) is None]
    if missing:
        message = (f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge "
                   "(as root) to run the SLURM tests; DRRAY_REQUIRE_SLURM=1 makes this a failure")
        if required:
            pytest.fail(message)
        pytest.skip(message)
    directory = Path(f"/tmp/drray-slurm-{os.getpid()}")  # short: munge's socket path
    home = tmp_path_factory.mktemp("drray-home")
    started = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(directory), "--nodes", "2", "--cpus", "2"],
                             capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(directory)], capture_output=True, timeout=120)
        message = f"the local SLURM cluster did not start:\n{started.stdout}\n{started.stderr}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "DRRAY_HOME")}
    os.environ.update(SLURM_CONF=str(directory / "slurm.conf"), DRRAY_HOME=str(home))
    yield directory
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(directory)], capture_output=True, timeout=120)
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    shutil.rmtree(directory, ignore_errors=True)


def drray(*args: str, timeout: float = 120, sigint_ignored: bool = False) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``sigint_ignored``: started as from ``nohup ... &`` or cron, with
    SIGINT ignored (inherited by everything it starts unless drray undoes it)."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=ignore)


def submitted_ids(output: str) -> list[str]:
    return [line.split(" as job ")[1].split()[0] for line in output.splitlines() if " as job " in line]


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f).get("JobState", "")


def release_held(job_ids: list[str]) -> None:
    """A requeued job waits ~120 s (BeginTime) before SLURM runs it again; the tests do not."""
    for job_id in job_ids:
        out = subprocess.run(["squeue", "-h", "-r", "-j", job_id.split("_")[0], "-o", "%i %r"],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            jid, _, reason = line.partition(" ")
            if reason.strip() == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)


def wait_until(condition, what: str, timeout: float, job_ids: list[str], folder: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        release_held(job_ids)
        value = condition()
        if value:
            return value
        time.sleep(1.0)
    logs = ""
    if folder is not None:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*_0_log.err")))
    states = {j: job_state(j) for j in job_ids}
    raise AssertionError(f"timed out waiting for {what} (job states {states})\n{logs}")


def events(folder: Path, job_id: str) -> list[dict]:
    path = folder / f"{job_id}_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def invocations(run: Path) -> list[dict]:
    path = run / "pipeline.json"
    return json.loads(path.read_text())["invocations"] if path.is_file() else []


# --- fast: checked before anything is submitted ---------------------------------------------------


def _no_new_jobs(before: str) -> None:
    registry = Path(os.environ["DRRAY_HOME"]) / "jobs.jsonl"
    assert (registry.read_text() if registry.is_file() else "") == before
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip() == ""


@pytest.mark.slurm
def test_bad_profile_or_partition_is_refused_before_submission(cluster, tmp_path):
    registry = Path(os.environ["DRRAY_HOME"]) / "jobs.jsonl"
    before = registry.read_text() if registry.is_file() else ""
    profile = tmp_path / "site.yaml"
    profile.write_text("partition: debug\npartiton: gpu\n")
    bad_key = drray("submit", "pipeline", "--config", str(CI), "--profile", str(profile))
    assert bad_key.returncode != 0
    assert "unknown key(s) 'partiton'" in bad_key.stderr and str(profile) in bad_key.stderr
    bad_partition = drray("submit", "pipeline", "--config", str(CI), "--profile", "local", "--partition", "gpu-h100")
    assert bad_partition.returncode != 0
    assert "partition 'gpu-h100'" in bad_partition.stderr and "sinfo lists: debug" in bad_partition.stderr
    no_profile = drray("submit", "pipeline", "--config", str(CI), "--profile", "nosuchsite")
    assert no_profile.returncode != 0 and "available: " in no_profile.stderr and "local" in no_profile.stderr
    bad_limit = drray("submit", "pipeline", "--config", str(CI), "--time", "1", "--signal-delay", "90")
    assert bad_limit.returncode != 0 and "signal_delay_s (90 s) must be shorter" in bad_limit.stderr
    _no_new_jobs(before)


@pytest.mark.slurm
def test_cancel_a_real_job(cluster, tmp_path):
    submitted = drray("submit", "pretrain", "--config", str(CI), "--set", f"run.dir={tmp_path}",
                      "--profile", "local", "--nodes", "2")
    assert submitted.returncode == 0, submitted.stderr
    (job_id,) = submitted_ids(submitted.stdout)
    assert f"drray logs {job_id} --follow" in submitted.stdout
    folder = tmp_path / "slurm"
    wait_until(lambda: any(e["event"] == "ray_ready" for e in events(folder, job_id)), "its Ray cluster", 120,
               [job_id], folder)
    cancelled = drray("cancel", job_id)
    assert cancelled.returncode == 0 and f"cancelled {job_id}" in cancelled.stdout
    wait_until(lambda: job_state(job_id) == "CANCELLED", "the job to be cancelled", 60, [job_id])
    listed = drray("jobs").stdout
    assert any(line.split()[:3] == [job_id, "pretrain", "CANCELLED"] for line in listed.splitlines()), listed
    # SLURM's kill reaches every process of the job (SIGTERM, SIGKILL after KillWait 10 s): no
    # Ray node of it is left
    ray_left = lambda: subprocess.run(["pgrep", "-af", f"/tmp/r-{job_id}-"], capture_output=True,  # noqa: E731
                                      text=True).stdout.strip()
    deadline = time.time() + 30
    while ray_left() and time.time() < deadline:
        time.sleep(0.5)
    assert ray_left() == ""
    assert "not among the jobs drray submitted" in drray("logs", "99999").stderr


@pytest.mark.slurm
def test_a_failing_job_is_reported_failed_with_its_error(cluster, tmp_path):
    """--wait exits non-zero; `drray jobs` shows FAILED and the job's own error."""
    result = drray("submit", "evaluate", "--config", str(CI), "--set", f"run.dir={tmp_path}", "--profile", "local",
                   "--wait", timeout=300)
    assert result.returncode != 0 and "not completed" in result.stderr
    (job_id,) = submitted_ids(result.stdout)
    assert f"job {job_id} (evaluate): FAILED" in result.stdout
    row = next(line for line in drray("jobs").stdout.splitlines() if line.split()[:1] == [job_id])
    assert "FAILED" in row
    failed = [e for e in events(tmp_path / "slurm", job_id) if e["event"] == "failed"]
    assert len(failed) == 1 and "models" in failed[0]["error"] and "Traceback" in failed[0]["traceback"]


def test_local_executor_runs_a_job_without_slurm(tmp_path, monkeypatch):
    """--executor local: the same job function in a background process on this machine."""
    monkeypatch.setenv("DRRAY_HOME", str(tmp_path / "home"))
    result = drray("submit", "prepare", "--config", str(CI), "--set", f"run.dir={tmp_path / 'run'}",
                   "--executor", "local", "--wait", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (job_id,) = submitted_ids(result.stdout)
    assert "(local, 1 node(s))" in result.stdout and f"job {job_id} (prepare): COMPLETED" in result.stdout
    assert [e["event"] for e in events(tmp_path / "run" / "slurm", job_id)] == ["finished"]
    # the message names the real files and ids; the finished job has its tries and timing; its
    # log holds drray's own lines; cancelling it says it had ended
    assert f"{job_id}_0_log.out" in result.stdout and f"drray cancel {job_id}" in result.stdout
    assert "<job>" not in result.stdout and "JOB_ID" not in result.stdout
    row = next(line.split() for line in drray("jobs").stdout.splitlines() if line.split()[:1] == [job_id])
    assert row[2] == "COMPLETED" and row[4] == "1" and row[5] != "-"
    logs = drray("logs", job_id).stdout  # drray's lines: the sets prepared, or found up to date
    assert "data/ci/prepared/messidor2" in logs and ("up to date" in logs or "prepare messidor2 ->" in logs), logs
    ended = drray("cancel", job_id)
    assert ended.returncode != 0 and "had already ended: COMPLETED" in ended.stderr
    assert drray("submit", "prepare", "--config", str(CI), "--executor", "local", "--nodes", "2").returncode != 0
    # a running local job is cancelled: its process ends, `drray jobs` says CANCELLED; submitted
    # from a shell that ignores SIGINT (nohup, &, cron), whose children would ignore drray cancel's
    # SIGINT too, unless drray starts them interruptible (two CI runs once trained on so)
    run = tmp_path / "long"
    started = drray("submit", "pretrain", "--config", str(CI), "--set", f"run.dir={run}", "--set", "pretrain.epochs=50",
                    "--executor", "local", sigint_ignored=True)
    (long_id,) = submitted_ids(started.stdout)
    log = run / "slurm" / f"{long_id}_0_log.err"
    deadline = time.time() + 180
    while "[pretrain] starting" not in (log.read_text() if log.is_file() else "") and time.time() < deadline:
        time.sleep(0.5)
    assert drray("cancel", long_id).returncode == 0
    deadline = time.time() + 60
    while _state_of(long_id) != "CANCELLED" and time.time() < deadline:
        time.sleep(0.5)
    assert _state_of(long_id) == "CANCELLED"


def _state_of(job_id: str) -> str:
    return next((line.split()[2] for line in drray("jobs").stdout.splitlines() if line.split()[:1] == [job_id]), "")


@pytest.mark.slurm
def test_plain_sbatch_template_forms_the_ray_cluster(cluster, tmp_path):
    """slurm/ray-on-slurm.sbatch: Ray over the allocation without submitit."""
    probe = ("import ray; ray.init(); "
             "print('RAY NODES', sum(n['Alive'] for n in ray.nodes()), ray.cluster_resources()['CPU'])")
    result = subprocess.run(["sbatch", "--wait", "--nodes", "2", f"--chdir={tmp_path}", f"--output={tmp_path}/out.log",
                             str(REPO / "slurm" / "ray-on-slurm.sbatch"), sys.executable, "-c", probe],
                            capture_output=True, text=True, timeout=180, env={**os.environ, "DRRAY_PYTHON": sys.executable})
    log = (tmp_path / "out.log").read_text()
    assert result.returncode == 0, log[-3000:]
    assert "RAY NODES 2 4.0" in log  # 2 nodes x --cpus-per-task 2
    job_id = result.stdout.split()[-1]
    leftover = subprocess.run(["pgrep", "-f", f"/tmp/r-{job_id}-"], capture_output=True, text=True).stdout
    assert leftover.strip() == ""


# --- slow: the pipeline on 2 nodes, through a time limit and a requeue -----------------------------


# ci.yaml's pipeline takes under a minute here: a longer pretraining makes the 2-minute limit
# land inside the work and leaves later attempts stages of their own. SLURM sends the warning
# 30-60 s into an attempt (its "60 s early" has a timer's resolution), so an attempt does 20-50 s
# of work: ~100 s of pipeline is interrupted once by the limit, once by the operator, and then
# finishes; more only adds attempts (each ~15 s of requeue, Ray start and imports). (12 epochs,
# ~30 s on a quiet machine, once let the first attempt finish every stage but the report.)
LONGER = ("--set", "pretrain.epochs=24")
EVERY_RUN = ("models", "report")  # steps every run redoes (milliseconds): not a stage of an attempt's own


@pytest.fixture(scope="module")
def pipeline_job(cluster, tmp_path_factory):
    run = tmp_path_factory.mktemp("slurm-pipeline")
    submitted = drray("submit", "pipeline", "--config", str(CI), "--set", f"run.dir={run}", *LONGER, "--profile",
                      "local", "--nodes", "2", "--time", "2", "--signal-delay", "60")
    assert submitted.returncode == 0, submitted.stderr
    (job_id,) = submitted_ids(submitted.stdout)
    folder = run / "slurm"
    ids = [job_id]
    # 1. Near its 2-minute limit SLURM warns the job (USR2, 60 s early): it requeues itself.
    wait_until(lambda: any(e["event"] == "requeued" for e in events(folder, job_id)), "the time-limit requeue",
               420, ids, folder)
    # 2. Once the next attempt has finished a stage of its own, an operator requeues the job.
    def progressed() -> bool:
        runs = invocations(run)
        return len(runs) >= 2 and any(s["status"] == "ran" and s["stage"] not in EVERY_RUN for s in runs[-1]["stages"])
    wait_until(progressed, "the second attempt to finish a stage", 420, ids, folder)
    # SLURM refuses a requeue while the job is requeueing itself (its limit came at the same
    # moment): ask again once an attempt is running
    def operator_requeued() -> bool:
        return job_state(job_id) == "RUNNING" and subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True).returncode == 0
    wait_until(operator_requeued, "SLURM to accept the operator's requeue", 300, ids, folder)
    requeued_at = len(invocations(run))
    # 3. It runs again (and again, should it reach its limit once more) until it completes.
    wait_until(lambda: job_state(job_id) == "COMPLETED", "the job to complete", 900, ids, folder)
    return run, job_id, folder, requeued_at


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1500)  # the fixture: a 2-node pipeline through two requeues (~4 min here)
def test_pipeline_on_two_nodes_finishes_after_time_limit_and_requeue(pipeline_job):
    run, job_id, folder, requeued_at = pipeline_job
    evs = events(folder, job_id)
    ready = [e for e in evs if e["event"] == "ray_ready"]
    assert len(ready) >= 3 and all(e["ray_nodes"] == 2 and e["nodes"] == 2 for e in ready)  # every attempt
    assert [e["attempt"] for e in evs if e["event"] == "started"] == list(range(len(ready)))
    assert evs[-1]["event"] == "finished"
    runs = invocations(run)
    assert len(runs) > requeued_at >= 2 and runs[-1]["status"] == "complete"
    # the time-limit signal: submitit requeues, then exits (SystemExit: "interrupted"); SLURM's
    # SIGTERM for the requeue can kill the process first, leaving the stage "running"
    assert runs[0]["status"] in ("interrupted", "running")
    # no stage finished by one attempt ran again in a later one (publishing the models and
    # writing the report are redone by every complete run: they take milliseconds)
    finished_in: dict[str, int] = {}
    for i, inv in enumerate(runs):
        for entry in inv["stages"]:
            if entry["status"] == "ran" and entry["stage"] not in EVERY_RUN:
                assert entry["stage"] not in finished_in, f"{entry['stage']} ran twice: {runs}"
                finished_in[entry["stage"]] = i
            if entry["stage"] in finished_in and i > finished_in[entry["stage"]]:  # found done (or interrupted
                # while it was being found done: a requeue can land in the fraction of a second that takes)
                assert entry["status"] in ("skipped", "interrupted", "running"), f"{entry['stage']} in attempt {i}: {entry}"
    assert {"pretrain", "teacher", "distill", "student", "evaluate"} <= set(finished_in)
    assert len(set(finished_in.values())) >= 2  # the work was spread over attempts
    assert (run / "report.md").is_file() and (run / "models" / "student" / "model.pt").is_file()
    # Ray was torn down on every node after every attempt
    leftover = subprocess.run(["pgrep", "-f", f"/tmp/r-{job_id}-"], capture_output=True, text=True).stdout
    assert leftover.strip() == ""


@pytest.mark.slurm
@pytest.mark.slow
def test_jobs_and_logs_show_the_real_job(pipeline_job):
    run, job_id, folder, _ = pipeline_job
    listed = drray("jobs").stdout
    row = next(line.split() for line in listed.splitlines() if line.split()[:1] == [job_id])
    assert row[1:4] == ["pipeline", "COMPLETED", "2"] and int(row[4]) >= 3
    logs = drray("logs", job_id)
    assert logs.returncode == 0
    assert re.search(r"\[pipeline\] stage 2/\d+: pretrain", logs.stdout) and "Ray cluster ready" in logs.stdout
    assert "requeueing" in logs.stdout


# --- slow: a sweep as a job array sharing that run's stages ------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_sweep_as_a_job_array_shares_the_stage_cache(pipeline_job, tmp_path):
    pipeline_run = pipeline_job[0]
    sweep_run = tmp_path / "sweep"
    # count 80 seed 0 (ci.yaml's budget) is the pipeline's own labeled subset: that trial finds its stages done;
    # seed 1 trains its own. Both find the pipeline's pretraining through run.stages.
    submitted = drray("submit", "sweep", "--config", str(SWEEP_CI), "--set", f"run.dir={sweep_run}", *LONGER,
                      "--set", f"run.stages={pipeline_run}", "--set", "sweep.fractions=[]",
                      "--set", "sweep.counts=[80]", "--set", "sweep.seeds=[0, 1]",
                      "--set", "evaluate.tsne_images=100",  # ci.yaml's: seed 0 finds the pipeline's evaluation too
                      "--profile", "local", "--array", "--array-parallelism", "2", "--wait", timeout=900)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
    ids = submitted_ids(submitted.stdout)
    assert len(ids) == 4 and ids[1].endswith("_0") and ids[2].endswith("_1")  # shared, 2 array tasks, results
    assert all(job_state(j) == "COMPLETED" for j in ids)
    shared = json.loads((sweep_run / "sweep.json").read_text())["invocations"][0]["stages"]
    assert {e["stage"]: e["status"] for e in shared} == {"prepare": "skipped", "pretrain": "skipped"}
    def statuses(trial: str) -> dict:
        inv = json.loads((sweep_run / "trials" / trial / "pipeline.json").read_text())["invocations"]
        return {e["stage"]: e["status"] for e in inv[-1]["stages"]}
    assert statuses("n80-seed0")["teacher"] == "skipped" and statuses("n80-seed0")["distill"] == "skipped"
    assert statuses("n80-seed1")["teacher"] == "ran" and statuses("n80-seed1")["pretrain"] == "skipped"
    table = pq.read_table(sweep_run / "sweep.parquet").to_pylist()
    assert {r["trial"] for r in table} == {"n80-seed0", "n80-seed1"}
    assert (sweep_run / "report.md").is_file() and "[drray] job" in submitted.stdout
    array_id = ids[1].split("_")[0]
    logs = drray("logs", array_id).stdout  # an array id: every task's logs
    assert "array task 0: trial n80-seed0" in logs and "array task 1: trial n80-seed1" in logs
