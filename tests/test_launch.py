"""drray.launch without SLURM: profiles, the task's view of its allocation, and a real Ray
cluster of two nodes formed through the rendezvous files (both "nodes" on this machine, the
worker in a thread), its teardown, and the error when a node never joins."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from drray.launch.profiles import Profile, ProfileError, check_profile, load_profile
from drray.launch.ray_cluster import NodeTask, gpus_visible


def test_profile_by_name_by_path_and_flags_over_it(tmp_path):
    local, source = load_profile("local")
    assert local.partition == "debug" and source.endswith("slurm/profiles/local.yaml")
    site = tmp_path / "site.yaml"
    site.write_text("partition: gpu\ngpus_per_node: 4\nsetup: [module load cuda]\nsbatch: {constraint: h100}\n")
    profile, _ = load_profile(site)
    assert (profile.partition, profile.gpus_per_node, profile.setup, profile.sbatch) == (
        "gpu", 4, ["module load cuda"], {"constraint": "h100"})
    over = profile.with_overrides(nodes=3, partition=None, time_minutes=30)
    assert (over.nodes, over.partition, over.time_minutes) == (3, "gpu", 30)
    assert load_profile(None) == (Profile(), "defaults")


@pytest.mark.parametrize("text, message", [
    ("partition: a\ngpus: 4\n", "unknown key(s) 'gpus'; known keys: partition"),
    ("setup: module load cuda\n", "setup must be a list of shell lines"),
    ("- partition\n", "a profile is a mapping of settings, got list"),
    ("partition: [a\n", "not valid YAML"),
])
def test_bad_profiles_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_profile_values_checked_before_submission():
    with pytest.raises(ProfileError, match="available: .*local"):
        load_profile("no-such-site")
    with pytest.raises(ProfileError, match=r"signal_delay_s \(120 s\) must be shorter than the time limit \(2 min\)"):
        check_profile(Profile(time_minutes=2), "defaults")
    with pytest.raises(ProfileError, match="nodes must be at least 1"):
        check_profile(Profile(nodes=0), "defaults")


def test_node_task_from_the_slurm_environment():
    env = {"SLURM_JOB_NODELIST": "n1", "SLURMD_NODENAME": "n1", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2", "SLURM_CPUS_ON_NODE": "8",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    task = NodeTask.from_slurm(env)
    assert (task.rank, task.num_nodes, task.node, task.job_id, task.attempt, task.cpus, task.gpus) == (
        0, 1, "n1", "42", 2, 8, 4)
    assert gpus_visible({"SLURM_GPUS_ON_NODE": "2"}) == 2 and gpus_visible({}) == 0
    assert gpus_visible({"CUDA_VISIBLE_DEVICES": ""}) == 0


# The Ray parts run in a fresh process: this test session's own Ray (tests/conftest.py) may be
# connected already, and a process joins one Ray cluster at a time.
FORM_CLUSTER = """
import json, os, stat, sys, threading
from pathlib import Path
import ray
from drray.launch.ray_cluster import NodeTask, RendezVous, ray_on_allocation

folder, job_id, join = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "join"
task = lambda rank, node: NodeTask(rank=rank, num_nodes=2, node=node, nodes=("h1", "h2"), job_id=job_id,
                                   attempt=0, cpus=1, gpus=0)
if join:
    worker = threading.Thread(target=lambda: ray_on_allocation(folder, task(1, "h2")).__enter__())
    worker.start()
seen = {}
try:
    with ray_on_allocation(folder, task(0, "h1"), timeout_s=120 if join else 8) as address:
        token = RendezVous(folder, task(0, "h1")).token
        seen = {"address_env": os.environ["RAY_ADDRESS"] == address, "nodes": sum(n["Alive"] for n in ray.nodes()),
                "cpus": ray.cluster_resources()["CPU"], "token_mode": oct(stat.S_IMODE(token.stat().st_mode)),
                "token_len": len(token.read_text()), "auth": os.environ["RAY_AUTH_MODE"]}
except TimeoutError as exc:
    seen = {"error": str(exc)}
if join:
    worker.join(60)
    seen["worker_alive"] = worker.is_alive()
seen.update(address_after="RAY_ADDRESS" in os.environ, initialized_after=ray.is_initialized())
print("RESULT " + json.dumps(seen))
"""


def _form(folder: Path, job_id: str, join: bool) -> dict:
    import json
    import sys

    out = subprocess.run([sys.executable, "-c", FORM_CLUSTER, str(folder), job_id, "join" if join else "alone"],
                         capture_output=True, text=True, timeout=240)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def _ray_processes(job_id: str) -> str:
    return subprocess.run(["pgrep", "-af", f"/tmp/r-{job_id}-"], capture_output=True, text=True).stdout.strip()


@pytest.mark.ray
def test_two_ray_nodes_meet_through_the_rendezvous_and_stop(tmp_path):
    job_id = f"t{os.getpid()}"
    seen = _form(tmp_path, job_id, join=True)
    assert seen == {"address_env": True, "nodes": 2, "cpus": 2.0, "token_mode": "0o600", "token_len": 64,
                    "auth": "token", "worker_alive": False, "address_after": False, "initialized_after": False}
    assert _ray_processes(job_id) == ""  # both nodes' Ray stopped, by pid


@pytest.mark.ray
def test_a_node_that_never_joins_is_named(tmp_path):
    job_id = f"u{os.getpid()}"
    seen = _form(tmp_path, job_id, join=False)
    assert "1 of 2 nodes joined (h1); missing: h2 (their tasks never started a Ray worker)" in seen["error"]
    assert _ray_processes(job_id) == "" and (tmp_path / f"ray-{job_id}-attempt0.done").exists()


def test_a_slurm_job_may_requeue_itself_as_often_as_its_profile_says(tmp_path):
    """submitit gives up after 3 time-limit requeues by default: a long pipeline under a short
    limit would die halfway although every requeue resumes from disk."""
    from drray.launch.profiles import Profile
    from drray.launch.slurm import make_executor

    executor = make_executor(tmp_path, Profile(max_requeues=7), "slurm", "pipeline")
    assert executor._executor.max_num_timeout == 7
    assert Profile().max_requeues == 20
