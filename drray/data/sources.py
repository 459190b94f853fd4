"""Real-data sources: EyePACS (Kaggle), Messidor-2 (Krause grades) and a generic folder + CSV.

A source turns a folder of files and its label CSVs into a list of :class:`InputItem`, one per
input: every file under the folder, plus every label row without an image file. Two kinds of
file are not inputs: the label CSVs given, and hidden files and folders (names starting with a
dot, such as ``.DS_Store`` or ``.git``: the file system's and tools' own, never photographs).
Items that can already be judged unusable (a file that is not a supported image, a bad grade or
split, conflicting duplicate labels, ungradable, missing image, a second file with the same id)
carry a ``reject`` reason; the others go on to image preparation. Nothing is dropped silently:
the caller writes every reject to ``rejects.parquet``.

Image files of any common format are matched to label rows by id: the file stem, or with
``id_from="path"`` the path under the image folder without its extension (``patientA/left``).
File names and label CSVs that are not UTF-8 are read as cp1252 (else latin-1), alike, so that
the ids of both still match.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
import typing
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drray.config import IdFrom
from drray.data.fundus import IMAGE_EXTENSIONS

SOURCES = ("eyepacs", "messidor2", "folder")
ID_FROM = typing.get_args(IdFrom)
# Split names a label CSV or a folder may use, and the split each one means.
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# What a text that is not UTF-8 most likely is (Excel on Windows writes cp1252); latin-1 decodes
# any bytes, so it is the last resort and decoding never fails.
TEXT_ENCODINGS = ("utf-8-sig", "cp1252", "latin-1")

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The source as a whole cannot be read (missing folder, CSV without its columns)."""


@dataclass(frozen=True)
class InputItem:
    image_id: str
    path: str | None  # the file as the OS names it (os.fsdecode); None: a label row without a file
    grade: int | None  # None: unlabeled
    split: str
    source: str
    reject: str | None = None  # why it cannot be prepared, for a person
    reject_kind: str | None = None  # the reason's category, for counting


@dataclass(frozen=True)
class _LabelRow:
    name: str  # the image as the CSV names it ('IM000123.JPG', 'patientA/left')
    grade_text: str
    where: str  # "file.csv:line", for messages
    split: str
    skip_reason: str | None = None  # e.g. Messidor-2 ungradable, a split that is none of SPLITS
    skip_kind: str | None = None


@dataclass
class SourceReport:
    items: list[InputItem]
    label_files: list[Path] = field(default_factory=list)
    fingerprint: str = ""  # of file names, sizes, mtimes, label contents and id rule: "same inputs?"
    label_rows: int = 0
    duplicate_label_rows: int = 0  # same id, same grade: merged (counted here)
    notes: dict[str, int] = field(default_factory=dict)


def collect_inputs(source: str, images: str | Path, labels: list[str | Path],
                   id_from: str = "stem") -> SourceReport:
    """List the inputs of a data set: the files under ``images`` joined with label rows."""
    if source not in SOURCES:
        raise SourceError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    if id_from not in ID_FROM:
        raise SourceError(f"unknown id_from {id_from!r}: choose one of {', '.join(ID_FROM)}")
    images = Path(images)
    if not images.is_dir():
        raise SourceError(f"image folder {printable(str(images))} does not exist or is not a folder")
    label_paths = [_resolve_label_path(images, p) for p in labels]
    rows: list[_LabelRow] = []
    for path in label_paths:
        rows.extend(_READERS[source](path))
    files = list_input_files(images, exclude=label_paths)
    report = _join(source, images, files, rows, id_from)
    report.label_files = label_paths
    report.fingerprint = _fingerprint(source, id_from, images, files, label_paths)
    return report


def _fingerprint(source: str, id_from: str, root: Path, files: list[Path], label_paths: list[Path]) -> str:
    h = hashlib.sha256(f"{source}\0{id_from}\n".encode())
    for path in files:
        st = path.stat()
        h.update(os.fsencode(path.relative_to(root)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
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


def list_input_files(root: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """Every file under ``root`` but hidden ones and ``exclude`` (recursive, symlinked folders
    not followed), sorted."""
    excluded = {p.resolve() for p in exclude}
    names = {p.name for p in excluded}  # resolve only files that may be excluded: one call less per file
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and not (name in names and path.resolve() in excluded):
                found.append(path)
    return sorted(found)


def is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_EXTENSIONS)


def printable(text: str) -> str:
    """``text`` as valid UTF-8, for Parquet and messages: the bytes of a file name that is not
    UTF-8 (which Python holds as surrogate escapes) shown as ``\\xNN`` (``caf\\xe9.jpg``)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def decode_text(data: bytes) -> tuple[str, str]:
    """``data`` as text and the encoding it was read with, the first of TEXT_ENCODINGS that fits."""
    for encoding in TEXT_ENCODINGS[:-1]:
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    return data.decode(TEXT_ENCODINGS[-1]), TEXT_ENCODINGS[-1]


# ---------------------------------------------------------------------------------------------
# Ids: the same rule for a file and for the name a label row gives it
# ---------------------------------------------------------------------------------------------


def file_id(path: Path, root: Path, id_from: str) -> str:
    """A file's id: its stem, or its path under ``root`` without the extension."""
    name = path.stem if id_from == "stem" else path.relative_to(root).with_suffix("").as_posix()
    return _id_text(name)


def label_id(name: str, id_from: str) -> str:
    """The id of the image a label row names: 'IM000123.JPG' and 'IM000123' name the same image."""
    if id_from == "path":
        # CSVs written on Windows separate folders with backslashes
        name = posixpath.normpath(name.replace("\\", "/")).lstrip("/") if name else name
    else:
        name = os.path.basename(name)
    root, ext = posixpath.splitext(name)
    return _id_text(root if ext.lower() in IMAGE_EXTENSIONS else name)


def _id_text(name: str) -> str:
    """A name as id text: a file name that is not UTF-8 decoded like a label CSV that is not
    (so the two match), composed (macOS writes names decomposed, spreadsheets composed)."""
    return unicodedata.normalize("NFC", decode_text(os.fsencode(name))[0])


# ---------------------------------------------------------------------------------------------
# Label readers: one per source, each yielding _LabelRow
# ---------------------------------------------------------------------------------------------


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    text, encoding = decode_text(path.read_bytes())
    if encoding != TEXT_ENCODINGS[0]:
        log.warning("%s is not UTF-8: read as %s", path, encoding)
    reader = csv.DictReader(io.StringIO(text, newline=""))
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
        _LabelRow(row["image"], row["level"], f"{path.name}:{line}", split)
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
        rows.append(_LabelRow(row["image_id"], row["adjudicated_dr_grade"],
                              f"{path.name}:{line}", "test", skip, "ungradable" if skip else None))
    return rows


def _read_folder(path: Path) -> list[_LabelRow]:
    """Generic CSV: image_id,grade[,split]; an empty split is train."""
    rows = []
    for line, row in _read_csv(path, ("image_id", "grade")):
        where = f"{path.name}:{line}"
        text = row.get("split") or "train"
        split = SPLITS.get(text.lower())
        skip = None if split else (f"split {text!r} is not one of {', '.join(dict.fromkeys(SPLITS.values()))} "
                                   f"(valid and validation mean val) ({where})")
        rows.append(_LabelRow(row["image_id"], row["grade"], where, split or text, skip,
                              "bad_split" if skip else None))
    return rows


_READERS = {"eyepacs": _read_eyepacs, "messidor2": _read_messidor2, "folder": _read_folder}


def parse_grade(text: str) -> tuple[int | None, str | None]:
    """A DR grade 0-4 from CSV text, None for an empty one (unlabeled), or (None, reason)."""
    if not text:
        return None, None
    try:
        value = float(text)
    except ValueError:
        return None, f"grade {text!r} is not a number"
    if not value.is_integer() or not 0 <= value <= 4:
        return None, f"grade {text} is outside 0-4"
    return int(value), None


# ---------------------------------------------------------------------------------------------
# Joining files and labels
# ---------------------------------------------------------------------------------------------


def _join(source: str, root: Path, files: list[Path], rows: list[_LabelRow], id_from: str) -> SourceReport:
    labels, duplicates = _merge_label_rows(rows, id_from)
    items: list[InputItem] = []
    first_file: dict[str, Path] = {}
    for path in files:
        image_id = file_id(path, root, id_from)
        split = _folder_split(path, root)
        if not is_image_file(path):
            # not an image drray reads: never matched to a label row, never an id's first file
            items.append(InputItem(image_id, str(path), None, split, source, unsupported_reason(path),
                                   "unsupported_format"))
        elif image_id in first_file:
            items.append(InputItem(image_id, str(path), None, split, source,
                                   _duplicate(first_file[image_id], id_from), "duplicate_image"))
        else:
            first_file[image_id] = path
            grade, label_split, problem, kind = labels.get(image_id, (None, split, None, None))
            items.append(InputItem(image_id, str(path), grade, label_split, source, problem, kind))
    for image_id, (_, split, problem, _) in sorted(labels.items()):
        if image_id not in first_file:
            where = problem or "label row"
            items.append(InputItem(image_id, None, None, split, source,
                                   f"image missing: no image file for this id under {printable(str(root))} "
                                   f"({where})", "image_missing"))
    return SourceReport(items, label_rows=len(rows), duplicate_label_rows=duplicates)


def unsupported_reason(path: Path) -> str:
    """Why a file that is not an image drray reads is rejected (kind ``unsupported_format``)."""
    what = f"{printable(path.suffix)} files are" if path.suffix else "files without an extension are"
    return f"unsupported format: {what} not images drray reads (it reads {', '.join(IMAGE_EXTENSIONS)})"


def _duplicate(first: Path, id_from: str) -> str:
    if id_from == "stem":
        return (f"duplicate image id: {printable(str(first))} has the same name (ids are file stems; "
                f"--id-from path / id_from: path makes them paths, for files in different folders)")
    return f"duplicate image id: {printable(str(first))} has the same name, in the same folder"


def _merge_label_rows(rows: list[_LabelRow], id_from: str) -> tuple[dict[str, tuple], int]:
    """id -> (grade, split, problem, problem kind); agreeing duplicates merge, conflicting reject.

    An empty grade says nothing: an id whose rows all have one is unlabeled, and one row with a
    grade labels it.
    """
    by_id: dict[str, list[_LabelRow]] = defaultdict(list)
    for row in rows:
        by_id[label_id(row.name, id_from)].append(row)
    merged, duplicates = {}, 0
    for image_id, group in by_id.items():
        duplicates += len(group) - 1
        first = group[0]
        skipped = [r for r in group if r.skip_reason]
        if skipped:
            merged[image_id] = (None, first.split, skipped[0].skip_reason, skipped[0].skip_kind)
            continue
        parsed = [(parse_grade(r.grade_text), r) for r in group]
        bad = [(reason, r) for (g, reason), r in parsed if reason]
        if bad:
            reason, r = bad[0]
            merged[image_id] = (None, first.split, f"{reason} ({r.where})", "bad_grade")
            continue
        grades = sorted({g for (g, _), _ in parsed if g is not None})
        if len(grades) > 1:
            places = ", ".join(r.where for r in group)
            merged[image_id] = (None, first.split,
                                f"conflicting grades {' and '.join(map(str, grades))} for this id ({places})",
                                "conflicting_grades")
            continue
        merged[image_id] = (grades[0] if grades else None, first.split, None, None)
    return merged, duplicates


def _folder_split(path: Path, root: Path) -> str:
    """An unlabeled image's split from the folder it sits in (train/, val/, test/), else train."""
    for part in path.relative_to(root).parts[:-1]:
        if part.lower() in SPLITS:
            return SPLITS[part.lower()]
    return "train"
