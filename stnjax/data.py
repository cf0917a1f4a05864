"""Datasets: manifest, fold table, case store.

A dataset folder holds images and labels (NIfTI files or DICOM folders) and a
`dataset.json` manifest::

    {"name": "nih-pancreas", "organ_id": 1, "description": "...",
     "cases": [{"id": "PANCREAS_0001", "image": "images/0001",
                "label": "labels/label0001.nii.gz"}, ...]}

Paths are relative to the folder; "label" may be null for unlabelled cases;
other keys are kept as `extra`. The fold table is written once as
`folds.json` (explicit case-ID lists) and read back thereafter, so a case that
goes missing later never shifts the folds (reference sections 1.4 and 7).

`CaseStore` reads each case once and serves memory-mapped, plane-ordered
arrays from a cache; the training-slice selection and the batch sampler
built on it live in `stnjax.sampler`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from stnjax import fileio, preprocess
from stnjax import io as stio
from stnjax.checks import InputError, check_int

log = logging.getLogger(__name__)

MANIFEST_FILE = "dataset.json"
FOLDS_FILE = "folds.json"
#: NIH Pancreas-CT fold table by case number (reference 1.4: 20/20/21/21 of 82).
NIH_PANCREAS_FOLD_RANGES = ((1, 20), (21, 40), (41, 61), (62, 82))
#: Case numbers removed from the TCIA release as duplicates (80 cases remain).
NIH_PANCREAS_REMOVED = (25, 70)
#: Cached images are the HU window quantised to uint16: x = q / 65535, an
#: error <= 7.7e-6 (0.003 HU for the [-100, 240] window), far below CT noise.
IMAGE_LEVELS = 65535
_CACHE_VERSION = 1


class DatasetError(InputError):
    """A bad manifest, fold table or dataset request; names the file or case."""


# ------------------------------------------------------------------ files

def _write_json(path: Path, obj: Any) -> None:
    fileio.atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)  # a file object: np.save would add ".npy" to a name


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{what} {path}: not valid JSON ({e})") from e


# ------------------------------------------------------------------ manifest

@dataclasses.dataclass(frozen=True)
class CaseEntry:
    """One case of a manifest: absolute paths (label None if unlabelled)."""
    id: str
    image: Path
    label: Path | None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated dataset manifest. `cases` keeps the file's order."""
    path: Path
    name: str
    organ_id: int
    cases: tuple[CaseEntry, ...]
    description: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def case_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.cases)

    def case(self, case_id: str) -> CaseEntry:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise DatasetError(f"manifest {self.path}: no case {case_id!r}")

    def __len__(self) -> int:
        return len(self.cases)


def load_manifest(dataset_dir: str | os.PathLike) -> Manifest:
    """Reads and validates `dataset.json` of a dataset folder (or the file).

    Checks: valid JSON object; name a string; organ_id an int >= 1; a
    non-empty case list; each case with a non-empty unique string id and an
    image path (a label path or null); every path exists. Errors name the
    manifest and the case.
    """
    path = Path(dataset_dir)
    if path.is_dir():
        path = path / MANIFEST_FILE
    obj = _read_json(path, "manifest")
    where = f"manifest {path}"
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    name, organ_id, cases = obj.get("name"), obj.get("organ_id"), obj.get("cases")
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    if isinstance(organ_id, bool) or not isinstance(organ_id, int) or organ_id < 1:
        raise DatasetError(f"{where}: 'organ_id' must be an int >= 1, got {organ_id!r}")
    if not isinstance(cases, list) or not cases:
        raise DatasetError(f"{where}: 'cases' must be a non-empty list")
    entries, seen = [], set()
    for i, c in enumerate(cases):
        if not isinstance(c, dict):
            raise DatasetError(f"{where}: case #{i} is not an object")
        cid = c.get("id")
        if not isinstance(cid, str) or not cid.strip():
            raise DatasetError(f"{where}: case #{i} has no string 'id'")
        if cid in seen:
            raise DatasetError(f"{where}: case id {cid!r} appears more than once")
        seen.add(cid)
        paths = {}
        for key in ("image", "label"):
            rel = c.get(key)
            if rel is None and key == "label":
                paths[key] = None
                continue
            if not isinstance(rel, str) or not rel:
                raise DatasetError(f"{where}: case {cid!r}: '{key}' must be a path string, "
                                   f"got {rel!r}")
            p = (path.parent / rel).resolve() if not os.path.isabs(rel) else Path(rel)
            if not p.exists():
                raise DatasetError(f"{where}: case {cid!r}: {key} {p} does not exist")
            paths[key] = p
        extra = {k: v for k, v in c.items() if k not in ("id", "image", "label")}
        entries.append(CaseEntry(cid, paths["image"], paths["label"], extra))
    description = obj.get("description", "")
    extra = {k: v for k, v in obj.items() if k not in ("name", "organ_id", "cases", "description")}
    return Manifest(path.resolve(), name, organ_id, tuple(entries), str(description), extra)


def write_manifest(dataset_dir: str | os.PathLike, *, name: str, organ_id: int,
                   cases: Sequence[CaseEntry | Mapping[str, Any]], description: str = "",
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Writes `dataset.json` atomically and returns its path.

    `cases` are CaseEntry objects or dicts {"id", "image", "label", ...};
    paths inside the folder are stored relative to it. The result is read
    back with `load_manifest`, so a bad case is an error before returning.
    """
    root = Path(dataset_dir).resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root}: does not exist")

    def rel(p):
        if p is None:
            return None
        p = Path(p) if os.path.isabs(p) else root / p
        try:
            return p.resolve().relative_to(root).as_posix()
        except ValueError:
            return str(p.resolve())

    out = []
    for c in cases:
        if isinstance(c, CaseEntry):
            c = {"id": c.id, "image": c.image, "label": c.label, **dict(c.extra)}
        c = dict(c)
        c["image"], c["label"] = rel(c.get("image")), rel(c.get("label"))
        out.append(c)
    obj = {"name": name, "organ_id": organ_id, "description": description, "cases": out,
           **dict(extra or {})}
    path = root / MANIFEST_FILE
    with fileio.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
        load_manifest(tmp)  # validate before replacing a good manifest
    return path


# ------------------------------------------------------------------ folds

def folds_by_position(case_ids: Iterable[str], n_folds: int = 4) -> dict[int, list[str]]:
    """The reference split by position in the sorted case list (section 1.4).

    With n cases, rem = n_folds - n % n_folds and size = n // n_folds, fold f
    tests sorted positions [size*f + max(0, f-rem), size*(f+1) + max(0, f+1-rem)).
    n = 82 gives 20/20/21/21.

    Returns {fold: [case ids]} (each list sorted).
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise DatasetError("case_ids: duplicate ids")
    check_int(n_folds, "n_folds", 2)
    n = len(ids)
    if n < n_folds:
        raise DatasetError(f"case_ids: {n} cases cannot fill {n_folds} folds")
    rem, size = n_folds - n % n_folds, n // n_folds
    return {f: ids[size * f + max(0, f - rem): size * (f + 1) + max(0, f + 1 - rem)]
            for f in range(n_folds)}


def nih_pancreas_fold_table(case_ids: Iterable[str] | None = None) -> dict[int, list[str]]:
    """The NIH Pancreas-CT table by case number: 1-20 / 21-40 / 41-61 / 62-82.

    Args:
      case_ids: the ids present; each must end in its case number (e.g.
        "PANCREAS_0001", "0001", "label0001"). Default: "PANCREAS_%04d" for
        the 80 cases of the current TCIA release (25 and 70 were removed).
        Missing numbers simply stay absent: nothing shifts.
    """
    if case_ids is None:
        case_ids = [f"PANCREAS_{i:04d}" for i in range(1, 83) if i not in NIH_PANCREAS_REMOVED]
    table: dict[int, list[str]] = {f: [] for f in range(len(NIH_PANCREAS_FOLD_RANGES))}
    numbers: dict[int, str] = {}
    for cid in case_ids:
        m = re.search(r"(\d+)\D*$", cid)
        number = int(m.group(1)) if m else -1
        fold = [f for f, (lo, hi) in enumerate(NIH_PANCREAS_FOLD_RANGES) if lo <= number <= hi]
        if not fold:
            raise DatasetError(f"case_ids: {cid!r} does not end in an NIH case number 1..82")
        if number in numbers:
            raise DatasetError(f"case_ids: {cid!r} and {numbers[number]!r} are both case {number}")
        numbers[number] = cid
        table[fold[0]].append(cid)
    number = {cid: n for n, cid in numbers.items()}
    return {f: sorted(v, key=number.__getitem__) for f, v in table.items()}


def _volume_name(p: Path) -> str:
    return p.name[:-7] if p.name.endswith(".nii.gz") else p.name.removesuffix(".nii")


def paired_cases(image_dir: str | os.PathLike, label_dir: str | os.PathLike
                 ) -> list[dict[str, str]]:
    """Manifest entries pairing images and labels by name.

    Images are `image_dir/<id>.nii[.gz]` files or `image_dir/<id>/` DICOM
    folders; labels are `label_dir/<id>.nii[.gz]`. An image without a label
    is an error naming it (a dataset for training needs every label).
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for p, what in ((image_dir, "images"), (label_dir, "labels")):
        if not p.is_dir():
            raise DatasetError(f"{what} {p}: not a folder")
    labels = {_volume_name(p): p for p in label_dir.iterdir()
              if p.name.endswith((".nii", ".nii.gz"))}
    cases, missing = [], []
    for img in sorted(image_dir.iterdir()):
        if not (img.is_dir() or img.name.endswith((".nii", ".nii.gz"))):
            continue
        cid = _volume_name(img)
        if cid not in labels:
            missing.append(cid)
            continue
        cases.append({"id": cid, "image": str(img), "label": str(labels[cid])})
    if missing:
        raise DatasetError(f"images {image_dir}: no label in {label_dir} for {missing}")
    if not cases:
        raise DatasetError(f"images {image_dir}: no NIfTI file or DICOM folder found")
    return cases


def nih_pancreas_cases(image_root: str | os.PathLike, label_root: str | os.PathLike
                       ) -> list[dict[str, str]]:
    """Manifest entries for a TCIA NIH Pancreas-CT download.

    Images: image_root/PANCREAS_XXXX/<study>/<series>/*.dcm (the folder that
    holds the .dcm files is the image); labels: label_root/labelXXXX.nii.gz
    (TCIA_pancreas_labels-02-05-2017, pancreas = 1). Ids are "PANCREAS_XXXX".
    A case without a label, or without exactly one DICOM series folder, is
    left out with a warning (the fold table by ID keeps the others in place).
    """
    image_root, label_root = Path(image_root), Path(label_root)
    for p, what in ((image_root, "image_root"), (label_root, "label_root")):
        if not p.is_dir():
            raise DatasetError(f"{what} {p}: not a folder")
    cases = []
    for case_dir in sorted(image_root.glob("PANCREAS_*")):
        m = re.fullmatch(r"PANCREAS_(\d{4})", case_dir.name)
        if not m or not case_dir.is_dir():
            continue
        series = sorted({p.parent for p in case_dir.rglob("*.dcm")})
        label = label_root / f"label{m.group(1)}.nii.gz"
        if len(series) != 1 or not label.is_file():
            why = "no label file" if not label.is_file() else f"{len(series)} DICOM series folders"
            log.warning("NIH case %s left out: %s", case_dir.name, why)
            continue
        cases.append({"id": case_dir.name, "image": str(series[0]), "label": str(label)})
    if not cases:
        raise DatasetError(f"image_root {image_root}: no PANCREAS_XXXX case with a label "
                           f"in {label_root}")
    return cases


def _check_table(table: Mapping[Any, Sequence[str]], where: str) -> dict[int, list[str]]:
    try:
        out = {int(k): list(v) for k, v in table.items()}
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{where}: fold keys must be integers ({e})") from e
    if sorted(out) != list(range(len(out))) or len(out) < 2:
        raise DatasetError(f"{where}: folds must be numbered 0..k-1 with k >= 2, got {sorted(out)}")
    seen: dict[str, int] = {}
    for f, ids in out.items():
        for cid in ids:
            if not isinstance(cid, str) or not cid:
                raise DatasetError(f"{where}: fold {f} holds a non-string id {cid!r}")
            if cid in seen:
                raise DatasetError(f"{where}: case {cid!r} is in folds {seen[cid]} and {f}")
            seen[cid] = f
    return out


def write_fold_table(path: str | os.PathLike, table: Mapping[int, Sequence[str]], *,
                     rule: str = "explicit") -> Path:
    """Writes the fold table (explicit case-ID lists) as JSON, atomically.
    `path` is the file or a dataset folder (then `folds.json` in it)."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDS_FILE
    table = _check_table(table, f"fold table for {path}")
    _write_json(path, {"rule": rule, "n_folds": len(table),
                       "folds": {str(f): list(ids) for f, ids in sorted(table.items())}})
    return path


def read_fold_table(path: str | os.PathLike) -> dict[int, list[str]]:
    """Reads a fold table written by `write_fold_table` (file or folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / FOLDS_FILE
    obj = _read_json(path, "fold table")
    if not isinstance(obj, dict) or not isinstance(obj.get("folds"), dict):
        raise DatasetError(f"fold table {path}: expected an object with a 'folds' mapping")
    table = _check_table(obj["folds"], f"fold table {path}")
    if obj.get("n_folds", len(table)) != len(table):
        raise DatasetError(f"fold table {path}: n_folds={obj['n_folds']} but {len(table)} "
                           "folds listed")
    return table


@dataclasses.dataclass(frozen=True)
class FoldCheck:
    """How a fold table matches a case list: `missing` are listed in the
    folds but absent from the cases; `unplaced` are cases in no fold."""
    missing: tuple[str, ...]
    unplaced: tuple[str, ...]


def check_fold_table(table: Mapping[int, Sequence[str]], case_ids: Iterable[str]) -> FoldCheck:
    listed = {c for ids in table.values() for c in ids}
    present = set(case_ids)
    return FoldCheck(tuple(sorted(listed - present)), tuple(sorted(present - listed)))


def load_or_create_fold_table(dataset_dir: str | os.PathLike,
                              case_ids: Iterable[str] | None = None, *, n_folds: int = 4,
                              rule: str = "position") -> dict[int, list[str]]:
    """Reads `folds.json` of a dataset folder, or creates and writes it once.

    Args:
      dataset_dir: the dataset folder.
      case_ids: the cases to split when creating; default: the manifest's.
      n_folds: folds when creating (an existing table must agree).
      rule: "position" (`folds_by_position`) or "nih_pancreas"
        (`nih_pancreas_fold_table`), used only when creating.

    Cases listed in the table but absent from the manifest are logged as a
    warning (see `check_fold_table`); they never shift the other folds.
    """
    root = Path(dataset_dir)
    path = root / FOLDS_FILE
    manifest_ids = list(case_ids) if case_ids is not None else list(load_manifest(root).case_ids)
    if path.exists():
        table = read_fold_table(path)
        if len(table) != n_folds:
            raise DatasetError(f"fold table {path}: has {len(table)} folds, asked for {n_folds}")
    else:
        if rule == "position":
            table = folds_by_position(manifest_ids, n_folds)
        elif rule == "nih_pancreas":
            table = nih_pancreas_fold_table(manifest_ids)
            if n_folds != len(table):
                raise DatasetError(f"n_folds: the NIH table has {len(table)} folds, got {n_folds}")
        else:
            raise DatasetError(f"rule: expected 'position' or 'nih_pancreas', got {rule!r}")
        write_fold_table(path, table, rule=rule)
    check = check_fold_table(table, manifest_ids)
    if check.missing:
        log.warning("fold table %s lists %d cases absent from the dataset: %s",
                    path, len(check.missing), ", ".join(check.missing))
    return table


def split(fold_table: Mapping[int, Sequence[str]], fold: int,
          case_ids: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """(train_ids, test_ids) of one fold, each sorted.

    With `case_ids` (the cases present), listed cases absent from it are
    dropped with a warning, and a present case that no fold lists is an error
    (it would silently never be tested).
    """
    table = _check_table(fold_table, "fold_table")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or int(fold) not in table:
        raise DatasetError(f"fold: expected one of {sorted(table)}, got {fold!r}")
    if case_ids is not None:
        check = check_fold_table(table, case_ids)
        if check.unplaced:
            raise DatasetError(f"case_ids: {len(check.unplaced)} cases are in no fold: "
                               f"{', '.join(check.unplaced[:10])}")
        if check.missing:
            log.warning("fold %d: %d listed cases are absent and skipped: %s",
                        fold, len(check.missing), ", ".join(check.missing))
        drop = set(check.missing)
        table = {f: [c for c in ids if c not in drop] for f, ids in table.items()}
    test = sorted(table[int(fold)])
    train = sorted(c for f, ids in table.items() if f != int(fold) for c in ids)
    if not test:
        raise DatasetError(f"fold {fold}: no test case")
    return train, test


# ------------------------------------------------------------------ case store

def _source_stamp(path: Path | None) -> list:
    """Size and mtime of a file, or of every file under a DICOM folder."""
    if path is None:
        return []
    if path.is_dir():
        return [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(path.rglob("*")) if p.is_file()]
    st = path.stat()
    return [(path.name, st.st_size, st.st_mtime_ns)]


class CaseStore:
    """Loads each case once and serves memory-mapped arrays from a cache.

    The first use of a case reads it with `io.load_case`, windows the HU
    (`preprocess.window_hu`) and writes, atomically, into `cache_dir`:
    the window quantised to uint16 (see IMAGE_LEVELS), the bool organ mask
    and a JSON record (shape, spacing, affine). Files are keyed by a hash of
    the manifest entry, the source files' sizes and mtimes, the organ id and
    the window, so a changed input or setting never reuses a stale cache.
    Per-plane copies with the slicing axis first are made on first use, so
    reading a 3-slice window touches only 3 contiguous slices.
    """

    def __init__(self, manifest: Manifest, cache_dir: str | os.PathLike, *,
                 hu_window: tuple[float, float] = preprocess.HU_WINDOW):
        if not isinstance(manifest, Manifest):
            raise InputError(f"manifest: expected a Manifest, got {type(manifest).__name__}")
        lo, hi = (float(v) for v in hu_window)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InputError(f"hu_window: expected finite low < high, got {hu_window}")
        self.manifest, self.hu_window = manifest, (lo, hi)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._entries = {c.id: c for c in manifest.cases}
        self._meta: dict[str, dict] = {}
        self._bases: dict[str, Path] = {}
        self._arrays: dict[tuple[str, str, str], np.ndarray] = {}
        self.loads = 0  # cases read from source (not from the cache) so far

    @property
    def case_ids(self) -> tuple[str, ...]:
        return self.manifest.case_ids

    def _entry(self, case_id: str) -> CaseEntry:
        if case_id not in self._entries:
            raise DatasetError(f"case {case_id!r}: not in manifest {self.manifest.path}")
        return self._entries[case_id]

    def _base(self, case_id: str) -> Path:
        if case_id in self._bases:  # sources are stamped once per store
            return self._bases[case_id]
        e = self._entry(case_id)
        key = json.dumps([_CACHE_VERSION, e.id, str(e.image), str(e.label), self.manifest.organ_id,
                          self.hu_window, _source_stamp(e.image), _source_stamp(e.label)])
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case_id)[:60]
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self._bases[case_id] = self.cache_dir / f"{safe}-{digest}"
        return self._bases[case_id]

    def _meta_of(self, case_id: str) -> dict:
        if case_id in self._meta:
            return self._meta[case_id]
        base = self._base(case_id)
        meta_path = Path(f"{base}.json")
        # The record is written last: it marks a complete entry.
        if not (meta_path.exists() and Path(f"{base}.image.npy").exists()):
            self._build(case_id, base)
        self._meta[case_id] = json.loads(meta_path.read_text())
        return self._meta[case_id]

    def _build(self, case_id: str, base: Path) -> None:
        e = self._entry(case_id)
        case = stio.load_case(e.image, e.label, organ_id=self.manifest.organ_id, case_id=case_id)
        x = preprocess.window_hu(case.image, *self.hu_window)
        _save_npy(Path(f"{base}.image.npy"), np.round(x * IMAGE_LEVELS).astype(np.uint16))
        if case.label is not None:
            _save_npy(Path(f"{base}.label.npy"), case.label.astype(bool))
        meta = {"case_id": case_id, "shape": list(case.image.shape),
                "spacing": [float(s) for s in case.geometry.spacing],
                "affine": np.asarray(case.geometry.affine).tolist(),
                "has_label": case.label is not None,
                "image": str(e.image), "label": None if e.label is None else str(e.label),
                "hu_window": list(self.hu_window), "organ_id": self.manifest.organ_id}
        _write_json(Path(f"{base}.json"), meta)
        self.loads += 1

    def prepare(self, case_ids: Iterable[str] | None = None) -> None:
        """Loads (or finds cached) the given cases, default all."""
        for cid in (self.case_ids if case_ids is None else case_ids):
            self._meta_of(cid)

    def shape(self, case_id: str) -> tuple[int, int, int]:
        """Canonical (X, Y, Z) shape."""
        return tuple(self._meta_of(case_id)["shape"])

    def spacing(self, case_id: str) -> np.ndarray:
        """(3,) float64 mm per canonical axis."""
        return np.asarray(self._meta_of(case_id)["spacing"], np.float64)

    def affine(self, case_id: str) -> np.ndarray:
        """(4, 4) float64 canonical voxel -> RAS mm."""
        return np.asarray(self._meta_of(case_id)["affine"], np.float64)

    def has_label(self, case_id: str) -> bool:
        return bool(self._meta_of(case_id)["has_label"])

    def load_case(self, case_id: str) -> stio.Case:
        """The case read afresh from its source (for its Geometry, e.g. to
        write predictions that overlay the input)."""
        e = self._entry(case_id)
        return stio.load_case(e.image, e.label, organ_id=self.manifest.organ_id, case_id=case_id)

    def plane(self, case_id: str, plane: str, kind: str = "image") -> np.ndarray:
        """Read-only memory map (S, H, W) of the plane view, slicing axis first
        and contiguous: uint16 quantised window for kind="image" (decode with
        `decode_image`), bool for kind="label". The same layout as
        `preprocess.plane_view`."""
        preprocess.check_plane(plane)
        if kind not in ("image", "label"):
            raise InputError(f"kind: expected 'image' or 'label', got {kind!r}")
        key = (case_id, plane, kind)
        if key in self._arrays:
            return self._arrays[key]
        if kind == "label" and not self.has_label(case_id):
            raise DatasetError(f"case {case_id!r}: has no label in manifest {self.manifest.path}")
        self._meta_of(case_id)
        base = self._base(case_id)
        canon = Path(f"{base}.{kind}.npy")
        path = canon if plane == "X" else Path(f"{base}.{kind}.{plane}.npy")
        if not path.exists():
            src = np.load(canon, mmap_mode="r")
            _save_npy(path, np.ascontiguousarray(preprocess.plane_view(src, plane)))
        self._arrays[key] = np.load(path, mmap_mode="r")
        return self._arrays[key]

    def image(self, case_id: str) -> np.ndarray:
        """float32 (X, Y, Z) windowed image in [0, 1] (a decoded copy)."""
        return decode_image(self.plane(case_id, "X", "image"))

    def label(self, case_id: str) -> np.ndarray:
        """bool (X, Y, Z) organ mask (read-only memory map)."""
        return self.plane(case_id, "X", "label")

    def window(self, case_id: str, plane: str, j: int) -> tuple[np.ndarray, np.ndarray]:
        """One training window: image and label, float32 (H, W, 3) each,
        slices [max(0, j-1), j, min(S-1, j+1)] of the plane view."""
        img = self.plane(case_id, plane, "image")
        idx = _window_index(j, img.shape[0])
        lab = self.plane(case_id, plane, "label")
        return (decode_image(img[idx]).transpose(1, 2, 0),
                lab[idx].transpose(1, 2, 0).astype(np.float32))


def decode_image(q: np.ndarray) -> np.ndarray:
    """uint16 quantised window -> float32 in [0, 1]."""
    return np.multiply(q, np.float32(1.0 / IMAGE_LEVELS), dtype=np.float32)


def _window_index(j: int, s: int) -> list[int]:
    if not 0 <= j < s:
        raise InputError(f"j: slice {j} out of range [0, {s})")
    return [max(j - 1, 0), j, min(j + 1, s - 1)]
