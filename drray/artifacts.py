"""Run-directory layout, content hashes and atomic writes.

Every output is written aside under a temporary name and renamed into place, so a killed job
never leaves a half-written file or directory that a later stage would take as complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RESOLVED_CONFIG = "config.resolved.yaml"


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success it replaces ``final``.

    On an exception the temporary directory is removed and ``final`` is left as it was.
    The swap is two renames (old aside, new in): a reader never sees a partly written
    directory, only the old one, none, or the new one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = final.with_name(f".{final.name}.tmp-{token}")
    tmp.mkdir()
    try:
        yield tmp
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
