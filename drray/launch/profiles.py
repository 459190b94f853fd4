"""Cluster profiles: what a site's SLURM jobs need (partition, account, QOS, GPUs, time, memory,
setup lines), in a small YAML file under ``slurm/profiles/`` or anywhere, overridable by
``drray submit`` flags. Checked before anything is submitted: an unknown key or a partition the
cluster does not have is an error that names it.
"""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from drray.config import ConfigError, read_yaml_mapping

PROFILES_DIR = Path(__file__).resolve().parents[2] / "slurm" / "profiles"


class ProfileError(ConfigError):
    pass


@dataclass(frozen=True)
class Profile:
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None  # None: 1 CPU (SLURM's default); give what Ray may use
    mem_gb: float | None = None  # per node; None: the partition's default
    time_minutes: int = 60
    # SLURM sends USR2 this long before the time limit (sbatch --signal): the job then requeues
    # itself. Leave time for Ray to stop.
    signal_delay_s: int = 120
    # Time-limit requeues before the job gives up (submitit's default, 3, ends a long pipeline
    # under a short limit halfway; each requeue resumes from disk, so more cost only a restart).
    max_requeues: int = 20
    array_parallelism: int = 16  # job arrays (sweeps): at most this many tasks at once
    ray_start_timeout_s: int = 300  # every node must have joined the Ray cluster by then
    setup: list[str] = field(default_factory=list)  # shell lines before the job: module load, venv ...
    sbatch: dict = field(default_factory=dict)  # any other sbatch option, e.g. {constraint: a100}

    def with_overrides(self, **overrides) -> Profile:
        """The profile with the flags a user gave (None = not given)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


def known_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(Profile)]


def load_profile(name_or_path: str | Path | None) -> tuple[Profile, str]:
    """A profile by name (``slurm/profiles/NAME.yaml``) or path; the defaults when None.
    Returns it and where it came from."""
    if name_or_path is None:
        return Profile(), "defaults"
    path = Path(name_or_path)
    if not path.is_file():
        by_name = PROFILES_DIR / f"{name_or_path}.yaml"
        if not by_name.is_file():
            available = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none"
            raise ProfileError(f"profile {name_or_path!r}: no such file, and not a profile in {PROFILES_DIR} "
                               f"(available: {available})")
        path = by_name
    try:
        data = read_yaml_mapping(path, "a profile is a mapping of settings")
    except ConfigError as exc:
        raise ProfileError(f"profile {exc}") from exc
    unknown = sorted(set(data) - set(known_keys()))
    if unknown:
        raise ProfileError(f"profile {path}: unknown key(s) {', '.join(map(repr, unknown))}; "
                           f"known keys: {', '.join(known_keys())}")
    for key in ("setup",):
        if key in data and not isinstance(data[key], list):
            raise ProfileError(f"profile {path}: {key} must be a list of shell lines")
    if "sbatch" in data and not isinstance(data["sbatch"], dict):
        raise ProfileError(f"profile {path}: sbatch must be a mapping of sbatch options, e.g. {{constraint: a100}}")
    return Profile(**data), str(path)


def check_profile(profile: Profile, source: str) -> None:
    """Values a cluster would reject late or never run: say so now."""
    for key in ("nodes", "time_minutes", "array_parallelism", "ray_start_timeout_s"):
        if getattr(profile, key) < 1:
            raise ProfileError(f"{key} must be at least 1 (profile {source} or flag)")
    if profile.gpus_per_node < 0:
        raise ProfileError(f"gpus_per_node must be >= 0 (profile {source} or flag)")
    if profile.signal_delay_s >= profile.time_minutes * 60:
        raise ProfileError(f"signal_delay_s ({profile.signal_delay_s} s) must be shorter than the time limit "
                           f"({profile.time_minutes} min): the job would be told to requeue as it starts")


def cluster_partitions() -> list[str]:
    """The partitions the SLURM client tools see (``sinfo``; SLURM_CONF honoured)."""
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise ProfileError("sinfo not found: this machine has no SLURM client tools. Install them "
                           "(slurm-wlm), or try `drray submit --executor local`, or start a test cluster with "
                           "slurm/local-cluster.sh") from exc
    if result.returncode != 0:
        raise ProfileError(f"cannot reach the SLURM controller (sinfo: {result.stderr.strip()}); "
                           "check SLURM_CONF, or start a test cluster with slurm/local-cluster.sh")
    return [p.rstrip("*") for p in result.stdout.split()]


def check_partition(profile: Profile, source: str) -> None:
    """SLURM is there (its client tools answer) and has the profile's partition, if it names one:
    checked before submitit is asked (without SLURM it fails with a 40-line traceback)."""
    partitions = cluster_partitions()
    if profile.partition is not None and profile.partition not in partitions:
        raise ProfileError(f"partition {profile.partition!r} (profile {source} or --partition) does not exist on "
                           f"this cluster; sinfo lists: {', '.join(partitions) or 'none'}")
