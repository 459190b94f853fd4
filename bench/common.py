"""Benchmark helpers: peak memory of a process tree, and writing sections of RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def _children(pid: int) -> list[int]:
    out = []
    try:  # a process may exit while we look at it
        for task in Path(f"/proc/{pid}/task").glob("*"):
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Memory of a process and all its descendants (Linux /proc), as the sum of their
    proportional set sizes: shared pages (Ray's object store is shared memory mapped by every
    Ray process) are divided among the processes that map them instead of counted by each."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += _children(p)
    return total


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.05, cwd: Path | None = None,
                 at_peak: Callable[[int], int] | None = None) -> tuple[float, int, str] | tuple[float, dict, str]:
    """Run a command; return (seconds, peak RSS of its process tree in bytes, stdout). With
    ``at_peak`` (a function of the command's pid), the peak is {"tree": bytes, "driver": what
    at_peak gave when the tree's peak was reached}."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, **(env or {})})
    peak = {"tree": 0, "driver": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            tree = tree_rss_bytes(proc.pid)
            if tree > peak["tree"]:
                peak.update(tree=tree, driver=at_peak(proc.pid) if at_peak else 0)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    stop.set()
    thread.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, (peak if at_peak else peak["tree"]), out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or add) the section '## name' of ``path`` (bench/RESULTS.md); the rest of the
    file is kept as it is."""
    text = path.read_text() if path.exists() else (
        "# Benchmark results\n\nWritten by the scripts in bench/ (`make bench`); each figure is a ratio "
        "against a plain baseline measured in the same run on the same machine.\n"
    )
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)
