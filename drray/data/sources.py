"""Real-data sources: EyePACS (Kaggle), Messidor-2 (Krause grades), the public sets APTOS 2019,
IDRiD (disease grading) and DDR (DR grading), and a generic folder + CSV.

A source turns a folder of files and its label files into a list of :class:`InputItem`, one per
input: every file under the folder, plus every label row without an image file. Two kinds of
file are not inputs: the label files, and hidden files and folders (names starting with a
dot, such as ``.DS_Store`` or ``.git``: the file system's and tools' own, never photographs).
The public sets are read as they unpack (:data:`LAYOUTS`): their label files are found without
``--labels``, and only their image folders are searched.
Items that can already be judged unusable (a file that is not a supported image, a bad grade or
split, conflicting duplicate labels, ungradable, missing image, a second file with the same id)
carry a ``reject`` reason; the others go on to image preparation. Nothing is dropped silently:
the caller writes every reject to ``rejects.parquet``.

Image files of any common format are matched to label rows by id: the file stem, or with
``id_from="path"`` the path under the image folder without its extension (``patientA/left``).
File names and label CSVs that are not UTF-8 are read as cp1252 (else latin-1), alike, so that
the ids of both still match.

Every item names its patient (``patient_id``, never empty): the one a patients file gives
(CSV image_id,patient_id, e.g. Messidor-2's exams), else the folder CSV's ``patient_id`` column,
else the EyePACS rule (``10_left`` -> ``10``), else the image is its own patient
(:func:`drray.data.splits.patient_of`). APTOS, IDRiD and DDR publish no patients: without a
patients file each of their images is its own patient.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from drray.config import IdFrom
from drray.data.fundus import IMAGE_EXTENSIONS
from drray.data.splits import patient_of, read_patients

SOURCES = ("eyepacs", "messidor2", "folder", "aptos", "idrid", "ddr")
ID_FROM = typing.get_args(IdFrom)
# Split names a label CSV or a folder may use, and the split each one means.
SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# The sources whose labels grade the risk of macular oedema (dme), and where: what
# data.positive=referable_dme needs.
DME_SOURCES = {"idrid": "Risk of macular edema 0-2", "messidor2": "adjudicated_dme 0-1",
               "folder": "an optional dme column 0-2"}
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
    dme: int | None = None  # risk of macular oedema (IDRiD 0-2, Messidor-2 0-1); None: not graded
    patient_id: str | None = None  # collect_inputs always sets it (see the module's docstring)


@dataclass(frozen=True)
class _LabelRow:
    name: str  # the image as the CSV names it ('IM000123.JPG', 'patientA/left')
    grade_text: str
    where: str  # "file.csv:line", for messages
    split: str
    skip_reason: str | None = None  # e.g. Messidor-2 ungradable, a split that is none of SPLITS
    skip_kind: str | None = None
    dme_text: str = ""  # the macular-oedema risk, where the source grades it
    patient_text: str = ""  # the patient, where the CSV names it (folder: patient_id column)


class _Label(NamedTuple):
    """What an id's label rows say, merged."""

    grade: int | None
    dme: int | None
    split: str
    problem: str | None = None
    kind: str | None = None
    patient: str | None = None


@dataclass(frozen=True)
class Layout:
    """A public data set as it unpacks under ``--images`` (paths relative to it).

    Only the image folders are searched: the downloads keep other files beside them (Kaggle's
    sample_submission.csv, whose grades are all 0; IDRiD's and DDR's segmentation and
    localisation parts, which hold some of the same photographs again, and would then be
    prepared twice, once as unlabeled training images).
    """

    unpacks: str  # what --images must hold, for messages
    images: tuple[str, ...]  # image folders, searched recursively; each must exist
    labels: tuple[str, ...]  # label files read when --labels is not given; each must exist
    optional_images: tuple[str, ...] = ()  # searched when present
    optional_labels: tuple[str, ...] = ()  # read when present
    # folder -> split, for sets that reuse file names: an id then names its set (train/IDRiD_001)
    sets: dict[str, str] = field(default_factory=dict)

    def image_folders(self, root: Path, source: str) -> list[Path]:
        self._expect(root, self.images, Path.is_dir, "image folder", source)
        return [root / p for p in self.images + self.optional_images if (root / p).is_dir()]

    def label_files(self, root: Path, source: str) -> list[Path]:
        self._expect(root, self.labels, Path.is_file, "label file", source)
        return [root / p for p in self.labels + self.optional_labels if (root / p).is_file()]

    def _expect(self, root: Path, paths: tuple[str, ...], exists: Callable[[Path], bool], what: str,
                source: str) -> None:
        for path in paths:
            if not exists(root / path):
                raise SourceError(f"{source}: {what} {printable(str(root / path))} not found; --images must be "
                                  f"the folder the data set unpacks to ({self.unpacks})")


_IDRID = "B. Disease Grading"
_IDRID_LABELS = f"{_IDRID}/2. Groundtruths/{{}}. IDRiD_Disease Grading_{{}} Labels.csv"
LAYOUTS = {
    "aptos": Layout("the folder holding train.csv and train_images/", images=("train_images",),
                    labels=("train.csv",), optional_images=("test_images",), optional_labels=("test.csv",)),
    "idrid": Layout(f"the folder holding {_IDRID}/", images=(f"{_IDRID}/1. Original Images",),
                    labels=(_IDRID_LABELS.format("a", "Training"), _IDRID_LABELS.format("b", "Testing")),
                    sets={"a. Training Set": "train", "b. Testing Set": "test"}),
    "ddr": Layout("the folder holding DR_grading/", images=("DR_grading",),
                  labels=tuple(f"DR_grading/{name}.txt" for name in ("train", "valid", "test"))),
}


@dataclass
class SourceReport:
    items: list[InputItem]
    label_files: list[Path] = field(default_factory=list)
    fingerprint: str = ""  # of file names, sizes, mtimes, label contents and id rule: "same inputs?"
    label_rows: int = 0
    duplicate_label_rows: int = 0  # same id, same grade: merged (counted here)
    notes: dict[str, int] = field(default_factory=dict)


def collect_inputs(source: str, images: str | Path, labels: list[str | Path],
                   id_from: str = "stem", patients: str | Path | None = None) -> SourceReport:
    """List the inputs of a data set: the files under ``images`` joined with label rows.

    For a public set (:data:`LAYOUTS`) ``labels`` may be empty: its own label files are read.
    ``patients``: a CSV image_id,patient_id naming the images as label rows do; like a label
    file it is no input, and its contents are part of the fingerprint.
    """
    if source not in SOURCES:
        raise SourceError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    if id_from not in ID_FROM:
        raise SourceError(f"unknown id_from {id_from!r}: choose one of {', '.join(ID_FROM)}")
    layout = LAYOUTS.get(source)
    if layout and id_from != "stem":
        raise SourceError(f"id_from {id_from!r}: the {source} layout fixes its ids (file stems"
                          f"{', with their set' if layout.sets else ''}); leave it at stem")
    images = Path(images)
    if not images.is_dir():
        raise SourceError(f"image folder {printable(str(images))} does not exist or is not a folder")
    folders = layout.image_folders(images, source) if layout else [images]
    if labels or not layout:
        label_paths = [_resolve_label_path(images, p) for p in labels]
    else:
        label_paths = layout.label_files(images, source)
    rows: list[_LabelRow] = []
    for path in label_paths:
        rows.extend(_READERS[source](path))
    sets = layout.sets if layout else {}
    given = {}
    if patients is not None:
        patients_path = _resolve_label_path(images, patients, "patients file")
        # ids of a layout with sets name their set (train/IDRiD_001): read as paths, they keep it
        given = {label_id(name, "path" if sets else id_from): patient
                 for name, patient in read_patients(patients_path).items()}
        label_paths = label_paths + [patients_path]
    files = sorted(f for folder in folders for f in list_input_files(folder, exclude=label_paths))
    report = _join(source, images, files, rows, id_from, sets, given)
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


def _resolve_label_path(images: Path, path: str | Path, what: str = "label file") -> Path:
    path = Path(path)
    candidates = [path] if path.is_absolute() else [path, images / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SourceError(f"{what} {path} not found (looked in: {', '.join(map(str, candidates))})")


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


def _read_text(path: Path) -> str:
    text, encoding = decode_text(path.read_bytes())
    if encoding != TEXT_ENCODINGS[0]:
        log.warning("%s is not UTF-8: read as %s", path, encoding)
    return text


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """The rows of a label CSV, headers and cells stripped (IDRiD's header ends in a space).

    Rows whose every cell is empty are skipped like empty lines: spreadsheets pad a sheet with
    them (``,,,``), and they name no image.
    """
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'} "
            f"(expected {', '.join(required)})"
        )
    reader.fieldnames = header
    rows = []
    for raw in reader:
        row = {k: (v or "").strip() for k, v in raw.items() if k}
        if any(row.values()):
            rows.append((reader.line_num, row))  # the line as a person counts it (header: 1)
    return rows


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
                              f"{path.name}:{line}", "test", skip, "ungradable" if skip else None,
                              row.get("adjudicated_dme", "")))
    return rows


def _read_folder(path: Path) -> list[_LabelRow]:
    """Generic CSV: image_id,grade[,split][,patient_id][,dme]; an empty split is train, an empty
    patient_id the image's own (or the EyePACS rule's), an empty dme not graded."""
    rows = []
    for line, row in _read_csv(path, ("image_id", "grade")):
        where = f"{path.name}:{line}"
        text = row.get("split") or "train"
        split = SPLITS.get(text.lower())
        skip = None if split else (f"split {text!r} is not one of {', '.join(dict.fromkeys(SPLITS.values()))} "
                                   f"(valid and validation mean val) ({where})")
        rows.append(_LabelRow(row["image_id"], row["grade"], where, split or text, skip,
                              "bad_split" if skip else None, row.get("dme", ""), row.get("patient_id", "")))
    return rows


def _read_aptos(path: Path) -> list[_LabelRow]:
    """APTOS 2019: train.csv (id_code,diagnosis); test.csv (id_code only) lists the unlabeled pool.

    The test images' grades were never published (Kaggle scored submissions with them), so
    they can test nothing; they are fundus photographs without labels, which is what the
    semi-supervised stages learn from: split train, grade null. A model is tested on labeled
    images (a --test-fraction of train.csv's, or another data set).
    """
    if "test" in path.name.lower():
        return [_LabelRow(row["id_code"], "", f"{path.name}:{line}", "train")
                for line, row in _read_csv(path, ("id_code",))]
    return [_LabelRow(row["id_code"], row["diagnosis"], f"{path.name}:{line}", "train")
            for line, row in _read_csv(path, ("id_code", "diagnosis"))]


def _read_idrid(path: Path) -> list[_LabelRow]:
    """IDRiD disease grading: 'Image name,Retinopathy grade,Risk of macular edema ' (a trailing
    space, then empty columns; CRLF), names without extension. The file's set is the split:
    the Testing Labels name the testing set's images, whose names repeat the training set's.
    """
    split = "test" if "test" in path.name.lower() else "train"
    return [
        _LabelRow(row["Image name"], row["Retinopathy grade"], f"{path.name}:{line}", split,
                  dme_text=row["Risk of macular edema"])
        for line, row in _read_csv(path, ("Image name", "Retinopathy grade", "Risk of macular edema"))
    ]


DDR_UNGRADABLE = "5"


def _read_ddr(path: Path) -> list[_LabelRow]:
    """DDR grading lists (train.txt, valid.txt, test.txt): '<name>.jpg <grade>' per line, the
    list's name the split (valid: val). Grade 5 is DDR's 'ungradable': rejected, counted. DDR
    grades every image it lists, so a line without a grade is a bad_grade, not an unlabeled image."""
    split = SPLITS.get(path.stem.lower(), "train")
    rows = []
    for line, entry in enumerate(_read_text(path).splitlines(), start=1):
        fields = entry.rsplit(None, 1)  # a name with spaces keeps them: the grade is the last field
        if not fields:
            continue
        where = f"{path.name}:{line}"
        if len(fields) == 1:
            rows.append(_LabelRow(fields[0], "", where, split, f"no grade on the line ({where})", "bad_grade"))
            continue
        name, grade = fields
        skip = f"ungradable (grade {DDR_UNGRADABLE} in {where})" if grade == DDR_UNGRADABLE else None
        rows.append(_LabelRow(name, grade, where, split, skip, "ungradable" if skip else None))
    return rows


_READERS = {"eyepacs": _read_eyepacs, "messidor2": _read_messidor2, "folder": _read_folder,
            "aptos": _read_aptos, "idrid": _read_idrid, "ddr": _read_ddr}


def parse_grade(text: str) -> tuple[int | None, str | None]:
    """A DR grade 0-4 from CSV text, None for an empty one (unlabeled), or (None, reason)."""
    return _parse_level(text, 4, "grade")


def parse_dme(text: str) -> tuple[int | None, str | None]:
    """A risk of macular oedema 0-2 (IDRiD's scale; Messidor-2's 0-1 fits it), None for an
    empty one (not graded), or (None, reason)."""
    return _parse_level(text, 2, "macular-oedema risk")


def _parse_patient(text: str) -> tuple[str | None, None]:
    """A patient id as the CSV gives it; None for an empty one (then the image's own)."""
    return (text or None), None


def _parse_level(text: str, top: int, what: str) -> tuple[int | None, str | None]:
    if not text:
        return None, None
    try:
        value = float(text)
    except ValueError:
        return None, f"{what} {text!r} is not a number"
    if not value.is_integer() or not 0 <= value <= top:
        return None, f"{what} {text} is outside 0-{top}"
    return int(value), None


# ---------------------------------------------------------------------------------------------
# Joining files and labels
# ---------------------------------------------------------------------------------------------


def _join(source: str, root: Path, files: list[Path], rows: list[_LabelRow], id_from: str,
          sets: dict[str, str], given: dict[str, str]) -> SourceReport:
    """The items: one per file, one per label row without a file; ``given``: id -> patient."""
    labels, duplicates = _merge_label_rows(rows, id_from, sets)
    items: list[InputItem] = []
    first_file: dict[str, Path] = {}
    for path in files:
        split = _folder_split(path, root, sets)
        image_id = _in_set(file_id(path, root, id_from), split, sets)
        if not is_image_file(path):
            # not an image drray reads: never matched to a label row, never an id's first file
            items.append(InputItem(image_id, str(path), None, split, source, unsupported_reason(path),
                                   "unsupported_format", patient_id=_patient(image_id, None, given)))
        elif image_id in first_file:
            items.append(InputItem(image_id, str(path), None, split, source,
                                   _duplicate(first_file[image_id], id_from), "duplicate_image",
                                   patient_id=_patient(image_id, None, given)))
        else:
            first_file[image_id] = path
            label = labels.get(image_id, _Label(None, None, split))
            items.append(InputItem(image_id, str(path), label.grade, label.split, source, label.problem,
                                   label.kind, label.dme, _patient(image_id, label.patient, given)))
    for image_id, label in sorted(labels.items()):
        if image_id not in first_file:
            where = label.problem or "label row"
            items.append(InputItem(image_id, None, None, label.split, source,
                                   f"image missing: no image file for this id under {printable(str(root))} "
                                   f"({where})", "image_missing", patient_id=_patient(image_id, label.patient, given)))
    return SourceReport(items, label_rows=len(rows), duplicate_label_rows=duplicates)


def _patient(image_id: str, named: str | None, given: dict[str, str]) -> str:
    """An image's patient: the patients file's, else its label row's, else :func:`patient_of`'s
    rule (EyePACS 10_left -> 10, else the image itself)."""
    return given.get(image_id) or named or patient_of(image_id)


def unsupported_reason(path: Path) -> str:
    """Why a file that is not an image drray reads is rejected (kind ``unsupported_format``)."""
    what = f"{printable(path.suffix)} files are" if path.suffix else "files without an extension are"
    return f"unsupported format: {what} not images drray reads (it reads {', '.join(IMAGE_EXTENSIONS)})"


def _duplicate(first: Path, id_from: str) -> str:
    if id_from == "stem":
        return (f"duplicate image id: {printable(str(first))} has the same name (ids are file stems; "
                f"--id-from path / id_from: path makes them paths, for files in different folders)")
    return f"duplicate image id: {printable(str(first))} has the same name, in the same folder"


def _merge_label_rows(rows: list[_LabelRow], id_from: str,
                      sets: dict[str, str]) -> tuple[dict[str, _Label], int]:
    """id -> its merged label; agreeing duplicates merge, conflicting ones reject."""
    by_id: dict[str, list[_LabelRow]] = defaultdict(list)
    for row in rows:
        by_id[_in_set(label_id(row.name, id_from), row.split, sets)].append(row)
    merged = {image_id: _merge_group(group) for image_id, group in by_id.items()}
    return merged, sum(len(group) - 1 for group in by_id.values())


def _merge_group(group: list[_LabelRow]) -> _Label:
    split = group[0].split
    skipped = [r for r in group if r.skip_reason]
    if skipped:
        return _Label(None, None, split, skipped[0].skip_reason, skipped[0].skip_kind)
    grade, problem = _agreed(group, [r.grade_text for r in group], parse_grade, "grades")
    dme, dme_problem = _agreed(group, [r.dme_text for r in group], parse_dme, "macular-oedema risks")
    patient, patient_problem = _agreed(group, [r.patient_text for r in group], _parse_patient, "patients")
    if problem or dme_problem or patient_problem:
        return _Label(None, None, split, *(problem or dme_problem or patient_problem))
    return _Label(grade, dme, split, patient=patient)


def _agreed(group: list[_LabelRow], texts: list[str], parse: Callable,
            what: str) -> tuple[int | None, tuple[str, str] | None]:
    """The value an id's rows agree on, and None or (problem, kind): a bad value, or two values.

    An empty value says nothing: an id whose rows all have one has none, and one row with a
    value gives it.
    """
    parsed = [parse(text) for text in texts]
    for (_, reason), row in zip(parsed, group, strict=True):
        if reason:
            return None, (f"{reason} ({row.where})", "bad_grade")
    values = sorted({v for v, _ in parsed if v is not None})
    if len(values) > 1:
        places = ", ".join(r.where for r in group)
        return None, (f"conflicting {what} {' and '.join(map(str, values))} for this id ({places})",
                      "conflicting_grades")
    return (values[0] if values else None), None


def _in_set(image_id: str, split: str, sets: dict[str, str]) -> str:
    """In a layout whose sets reuse file names (IDRiD), an id names its set: train/IDRiD_001,
    test/IDRiD_001. Files and label rows get the same rule, so they still match."""
    return f"{split}/{image_id}" if sets else image_id


def _folder_split(path: Path, root: Path, sets: dict[str, str]) -> str:
    """An unlabeled image's split from the folder it sits in (a layout's set folder, or train/,
    val/, test/), else train."""
    for part in path.relative_to(root).parts[:-1]:
        if part in sets:
            return sets[part]
        if part.lower() in SPLITS:
            return SPLITS[part.lower()]
    return "train"
