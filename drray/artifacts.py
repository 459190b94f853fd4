"""Run-directory layout, content hashes, atomic writes and the rule that protects users' files.

Every output is written aside under a temporary name and renamed into place, so a killed job
never leaves a half-written file or directory that a later stage would take as complete.

A user's files are never replaced: an output folder that drray replaces whole carries a mark
(``.drray-output.json``) listing what drray put there, and a folder is replaced only when it is
absent, empty, or holds nothing but what its mark lists. Folders that drray only adds to (run
directories) carry a mark too, and an existing folder without one is refused.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESOLVED_CONFIG = "config.resolved.yaml"
OUTPUT_MARK = ".drray-output.json"


class NotOurOutput(ValueError):
    """An output path holds something drray did not write: writing there could destroy it."""


@dataclass(frozen=True)
class Legacy:
    """How an output folder written before marks existed is recognised: it holds ``sign`` and
    nothing but names that match ``entries`` (glob patterns)."""

    sign: str
    entries: frozenset[str]

    def recognises(self, names: set[str]) -> bool:
        return self.sign in names and all(any(fnmatch.fnmatchcase(n, p) for p in self.entries) for n in names)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _mark(what: str, entries: Iterable[str] | None) -> dict:
    import drray

    mark = {"written_by": "drray", "drray_version": drray.__version__, "what": what,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if entries is not None:
        mark["entries"] = sorted(entries)
    return mark


def read_mark(folder: str | Path) -> dict | None:
    """The mark drray left in a folder it wrote, or None."""
    try:
        mark = json.loads((Path(folder) / OUTPUT_MARK).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and mark.get("written_by") == "drray" else None


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _is_temporary(name: str) -> bool:
    """A temporary file of drray's atomic writes, left by a killed run (``.<name>.tmp-<token>``)."""
    return name.startswith(".") and ".tmp-" in name


def check_replaceable(final: str | Path, *, what: str, legacy: Legacy | None = None) -> None:
    """Raise :class:`NotOurOutput` unless ``final`` may be replaced whole: it is absent, an empty
    folder, or a folder holding only what drray's mark in it lists (or, for folders from before
    marks, what ``legacy`` recognises)."""
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return
    if final.is_symlink() or not final.is_dir():
        raise NotOurOutput(f"{what} {final} exists and is not a folder drray wrote: choose a new or empty folder")
    names = {p.name for p in final.iterdir() if not _is_temporary(p.name)} - {OUTPUT_MARK}
    if not names:
        return
    mark = read_mark(final)
    if mark is not None and "entries" in mark:
        foreign = names - set(mark["entries"])
        if not foreign:
            return
        raise NotOurOutput(
            f"{what} {final} holds files drray did not write ({_listing(foreign)}); drray replaces this "
            f"folder whole, so it stops here: move those files out or choose another folder")
    if legacy is not None and legacy.recognises(names):
        return
    raise NotOurOutput(
        f"{what} {final} is a folder drray did not write (it holds {_listing(names)}); drray replaces "
        f"its output folder whole, so it stops here: choose a new or empty folder")


def claim_folder(folder: str | Path, *, what: str, legacy_signs: Iterable[str] = ()) -> Path:
    """Make ``folder`` an output folder of drray's that later commands add to (a run directory):
    create it, or accept it when it is empty, marked by drray, or holds an entry matching one of
    ``legacy_signs`` (glob patterns: what such a folder held before marks existed); refuse
    anything else before any work starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotOurOutput(f"{what} {folder} is a file, not a folder: point it at a new or empty folder")
    if folder.is_dir() and read_mark(folder) is None:
        names = {p.name for p in folder.iterdir()}
        signs = list(legacy_signs)
        if names and not any(fnmatch.fnmatchcase(n, sign) for n in names for sign in signs):
            raise NotOurOutput(
                f"{what} {folder} is a folder drray did not write (it holds {_listing(names)}); drray "
                f"writes reports, models and stage outputs there, so it stops here: choose a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    if read_mark(folder) is None:
        atomic_write_json(folder / OUTPUT_MARK, _mark(what, None))
    return folder


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} - {OUTPUT_MARK}


def clear_own_files(folder: str | Path, *, what: str) -> None:
    """Before drray rewrites a folder of files (``drray synth``): remove the files its last run
    there wrote, as its mark lists them, and nothing else. A folder holding any file the mark
    does not list (or without a mark) is refused."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotOurOutput(f"{what} {folder} is a file, not a folder: choose a new or empty folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    mark = read_mark(folder)
    present = _files_under(folder)
    if mark is None or "entries" not in mark:
        raise NotOurOutput(f"{what} {folder} is a folder drray did not write (it holds {_listing(present)}): "
                           f"choose a new or empty folder")
    foreign = present - set(mark["entries"])
    if foreign:
        raise NotOurOutput(f"{what} {folder} holds files drray did not write ({_listing(foreign)}): move them "
                           f"out or choose another folder")
    for name in present:
        (folder / name).unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(sub.iterdir()):
            sub.rmdir()
    (folder / OUTPUT_MARK).unlink()


def mark_files(folder: str | Path, *, what: str) -> None:
    """Mark every file now under ``folder`` as written by drray (see :func:`clear_own_files`)."""
    folder = Path(folder)
    atomic_write_json(folder / OUTPUT_MARK, _mark(what, _files_under(folder)))


def refuse_overlap(out: str | Path, folders: dict[str, str | Path], *, what: str,
                   files: Iterable[str | Path] = ()) -> None:
    """Refuse an output folder that is, contains or lies inside an input folder (``folders``:
    description -> path), or that holds an input file: replacing the output folder would delete
    those inputs, or mix outputs into them."""
    out_r = Path(out).resolve()
    for name, folder in folders.items():
        folder_r = Path(folder).resolve()
        relation = ("is" if out_r == folder_r else "contains" if out_r in folder_r.parents
                    else "is inside" if folder_r in out_r.parents else None)
        if relation:
            raise NotOurOutput(f"{what} {out} {relation} {name} {folder}: the output folder is replaced "
                               f"whole, so it must lie outside the inputs; choose another {what}")
    for file in files:
        if out_r in Path(file).resolve().parents:
            raise NotOurOutput(f"{what} {out} holds the input file {file}: the output folder is replaced "
                               f"whole, so it must not hold inputs; choose another {what}")


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, what: str = "output folder",
                     legacy: Legacy | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success it replaces ``final``.

    ``final`` must be replaceable (:func:`check_replaceable`), checked before the work and again
    before the swap. On an exception the temporary directory is removed and ``final`` is left as
    it was. The swap is two renames (old aside, new in): a reader never sees a partly written
    directory, only the old one, none, or the new one. The new directory carries drray's mark.
    """
    final = Path(final)
    check_replaceable(final, what=what, legacy=legacy)
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = final.with_name(f".{final.name}.tmp-{token}")
    tmp.mkdir()
    try:
        yield tmp
        check_replaceable(final, what=what, legacy=legacy)  # nothing of the user's arrived meanwhile
        atomic_write_json(tmp / OUTPUT_MARK, _mark(what, (p.name for p in tmp.iterdir())))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{token}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale_temporaries(final: str | Path) -> None:
    """Remove temporaries left beside ``final`` by a killed earlier run."""
    final = Path(final)
    if final.parent.is_dir():
        for p in final.parent.glob(f".{final.name}.*-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@dataclass(frozen=True)
class StageDir:
    """A stage's directory and its layout: the one place its file names are spelled out.

    ``done.json`` is written last, when the stage is complete: a directory without it is a stage
    that has not finished (it may hold a half-trained run's metrics and best model).
    """

    path: Path

    DONE = "done.json"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> Path:  # the final model
        return self.path / "model"

    @property
    def best(self) -> Path:  # the best model by validation AUC, where the stage validated
        return self.path / "best"

    @property
    def metrics_file(self) -> Path:  # one JSON line per epoch and per event
        return self.path / "metrics.jsonl"

    @property
    def done_file(self) -> Path:
        return self.path / self.DONE

    @property
    def subset_file(self) -> Path:  # the labeled subset and validation hold-out it trained on
        return self.path / "subset.json"

    def file(self, name: str) -> Path:
        """A stage's own output file (pseudolabels.parquet, pseudolabel_join.json, ...)."""
        return self.path / name

    def final_model(self) -> Path:
        """The model a stage hands on: its best by validation AUC where it validated, else the last."""
        return self.best if (self.best / "model.pt").is_file() else self.model

    def is_done(self) -> bool:
        return self.done_file.is_file()

    def done(self) -> dict | None:
        """What the finished stage recorded, or None when it has not finished."""
        return json.loads(self.done_file.read_text()) if self.is_done() else None

    def write_done(self, record: dict) -> None:
        atomic_write_json(self.done_file, record)

    def metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def epochs(self) -> list[int]:
        return [r["epoch"] for r in self.metrics() if "epoch" in r]

    def append_metrics(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def best_metrics(self) -> dict | None:
        meta = self.best / "meta.json"
        return json.loads(meta.read_text())["metrics"] if meta.is_file() else None

    def write_pid(self, rank: int) -> None:
        """Which process is which rank: for operators (and the fault-injection tests)."""
        (self.path / "workers").mkdir(parents=True, exist_ok=True)
        (self.path / "workers" / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")

    def write_timeline(self, rank: int, times: dict) -> None:
        """When a rank's fit started, had its model ready, and waited for its first batch."""
        atomic_write_json(self.path / "workers" / f"rank{rank}.timeline.json", times)

    def timeline(self, rank: int = 0) -> dict:
        return json.loads((self.path / "workers" / f"rank{rank}.timeline.json").read_text())

    def pid(self, rank: int) -> int:
        return int((self.path / "workers" / f"rank{rank}.pid").read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_resolved_config(out_dir: str | Path, cfg: Any) -> Path:
    """Write the resolved config beside an output (the record of what produced it)."""
    from drray.config import dump_yaml

    path = Path(out_dir) / RESOLVED_CONFIG
    atomic_write_text(path, dump_yaml(cfg))
    return path
