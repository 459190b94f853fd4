"""Real-data sources: EyePACS (Kaggle), Messidor-2 (Krause grades) and a generic folder + CSV.

A source turns a folder of image files and its label CSVs into a list of :class:`InputItem`,
one per input: every image file found, plus every label row whose image is missing. Items that
can already be judged unusable (bad grade, conflicting duplicate labels, ungradable, missing
image, a second file with the same id) carry a ``reject`` reason; the others go on to image
preparation. Nothing is dropped silently: the caller writes every reject to ``rejects.parquet``.

Image files of any common format are matched to label rows by file stem.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from drray.data.fundus import IMAGE_EXTENSIONS

SOURCES = ("eyepacs", "messidor2", "folder")


class SourceError(ValueError):
    """The source as a whole cannot be read (missing folder, CSV without its columns)."""


@dataclass(frozen=True)
class InputItem:
    image_id: str
    path: str | None  # None: a label row without an image file
    grade: int | None  # None: unlabeled
    split: str
    source: str
    reject: str | None = None  # why it cannot be prepared, for a person
    reject_kind: str | None = None  # the reason's category, for counting


@dataclass(frozen=True)
class _LabelRow:
    image_id: str
    grade_text: str
    where: str  # "file.csv:line", for messages
    split: str
    skip_reason: str | None = None  # e.g. Messidor-2 ungradable
    skip_kind: str | None = None


@dataclass
class SourceReport:
    items: list[InputItem]
    label_files: list[Path] = field(default_factory=list)
    fingerprint: str = ""  # of file names, sizes, mtimes and label contents: "same inputs?"
    label_rows: int = 0
    duplicate_label_rows: int = 0  # same id, same grade: merged (counted here)
    notes: dict[str, int] = field(default_factory=dict)


def collect_inputs(source: str, images: str | Path, labels: list[str | Path]) -> SourceReport:
    """List the inputs of a data set: image files under ``images`` joined with label rows."""
    if source not in SOURCES:
        raise SourceError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    images = Path(images)
    if not images.is_dir():
        raise SourceError(f"image folder {images} does not exist or is not a folder")
    label_paths = [_resolve_label_path(images, p) for p in labels]
    rows: list[_LabelRow] = []
    for path in label_paths:
        rows.extend(_READERS[source](path))
    files = list_image_files(images)
    report = _join(source, images, files, rows)
    report.label_files = label_paths
    report.fingerprint = _fingerprint(source, images, files, label_paths)
    return report


def _fingerprint(source: str, root: Path, files: list[Path], label_paths: list[Path]) -> str:
    h = hashlib.sha256(source.encode())
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for path in label_paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def _resolve_label_path(images: Path, path: str | Path) -> Path:
    path = Path(path)
    candidates = [path] if path.is_absolute() else [path, images / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SourceError(f"label file {path} not found (looked in: {', '.join(map(str, candidates))})")


def list_image_files(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, symlinked folders not followed), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Label readers: one per source, each yielding _LabelRow
# ---------------------------------------------------------------------------------------------


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise SourceError(
                f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'} "
                f"(expected {', '.join(required)})"
            )
        reader.fieldnames = header
        # line numbers as a person counts them in the file (the header is line 1)
        return [(i + 2, {k: (v or "").strip() for k, v in row.items() if k}) for i, row in enumerate(reader)]


def _read_eyepacs(path: Path) -> list[_LabelRow]:
    """trainLabels.csv (image,level) or testLabels.csv (image,level,Usage)."""
    split = "test" if "test" in path.name.lower() else "train"
    return [
        _LabelRow(_stem(row["image"]), row["level"], f"{path.name}:{line}", split)
        for line, row in _read_csv(path, ("image", "level"))
    ]


def _read_messidor2(path: Path) -> list[_LabelRow]:
    """Krause et al. adjudicated grades: image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable."""
    rows = []
    for line, row in _read_csv(path, ("image_id", "adjudicated_dr_grade", "adjudicated_gradable")):
        gradable = row["adjudicated_gradable"]
        skip = None
        if gradable not in ("1", "1.0", "True", "true"):
            skip = f"ungradable (adjudicated_gradable={gradable or 'empty'} in {path.name}:{line})"
        rows.append(_LabelRow(_stem(row["image_id"]), row["adjudicated_dr_grade"],
                              f"{path.name}:{line}", "test", skip, "ungradable" if skip else None))
    return rows


def _read_folder(path: Path) -> list[_LabelRow]:
    """Generic CSV: image_id,grade[,split]."""
    return [
        _LabelRow(_stem(row["image_id"]), row["grade"], f"{path.name}:{line}", row.get("split") or "train")
        for line, row in _read_csv(path, ("image_id", "grade"))
    ]


_READERS = {"eyepacs": _read_eyepacs, "messidor2": _read_messidor2, "folder": _read_folder}


def _stem(name: str) -> str:
    """Ids are file stems: 'IM000123.JPG' and 'IM000123' name the same image."""
    base = os.path.basename(name)
    root, ext = os.path.splitext(base)
    return root if ext.lower() in IMAGE_EXTENSIONS else base


def parse_grade(text: str) -> tuple[int | None, str | None]:
    """A DR grade 0-4 from CSV text, or (None, reason)."""
    try:
        value = float(text)
    except ValueError:
        return None, f"grade {text!r} is not a number" if text else "grade is empty"
    if not value.is_integer() or not 0 <= value <= 4:
        return None, f"grade {text} is outside 0-4"
    return int(value), None


# ---------------------------------------------------------------------------------------------
# Joining files and labels
# ---------------------------------------------------------------------------------------------


def _join(source: str, root: Path, files: list[Path], rows: list[_LabelRow]) -> SourceReport:
    labels, duplicates = _merge_label_rows(rows)
    items: list[InputItem] = []
    first_file: dict[str, Path] = {}
    for path in files:
        image_id = path.stem
        if image_id in first_file:
            items.append(InputItem(image_id, str(path), None, _folder_split(path, root), source,
                                   f"duplicate image id: {first_file[image_id]} has the same name",
                                   "duplicate_image"))
            continue
        first_file[image_id] = path
        label = labels.get(image_id)
        if label is None:
            items.append(InputItem(image_id, str(path), None, _folder_split(path, root), source))
        else:
            grade, split, problem, kind = label
            items.append(InputItem(image_id, str(path), grade, split, source, problem, kind))
    for image_id, (_, split, problem, _) in sorted(labels.items()):
        if image_id not in first_file:
            where = problem or "label row"
            items.append(InputItem(image_id, None, None, split, source,
                                   f"image missing: no file for this id under {root} ({where})",
                                   "image_missing"))
    return SourceReport(items, label_rows=len(rows), duplicate_label_rows=duplicates)


def _merge_label_rows(rows: list[_LabelRow]) -> tuple[dict[str, tuple], int]:
    """id -> (grade, split, problem, problem kind); agreeing duplicates merge, conflicting reject."""
    by_id: dict[str, list[_LabelRow]] = defaultdict(list)
    for row in rows:
        by_id[row.image_id].append(row)
    merged, duplicates = {}, 0
    for image_id, group in by_id.items():
        duplicates += len(group) - 1
        first = group[0]
        if first.skip_reason:
            merged[image_id] = (None, first.split, first.skip_reason, first.skip_kind)
            continue
        parsed = [(parse_grade(r.grade_text), r) for r in group]
        bad = [(reason, r) for (g, reason), r in parsed if reason]
        if bad:
            reason, r = bad[0]
            merged[image_id] = (None, first.split, f"{reason} ({r.where})", "bad_grade")
            continue
        grades = sorted({g for (g, _), _ in parsed})
        if len(grades) > 1:
            places = ", ".join(r.where for r in group)
            merged[image_id] = (None, first.split,
                                f"conflicting grades {' and '.join(map(str, grades))} for this id ({places})",
                                "conflicting_grades")
            continue
        merged[image_id] = (grades[0], first.split, None, None)
    return merged, duplicates


def _folder_split(path: Path, root: Path) -> str:
    """An unlabeled image's split from the folder it sits in (train/, test/), else train."""
    for part in path.relative_to(root).parts[:-1]:
        if part.lower() in ("train", "test", "val", "valid", "validation"):
            return {"valid": "val", "validation": "val"}.get(part.lower(), part.lower())
    return "train"
