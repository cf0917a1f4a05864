"""Datasets: manifest and fold table.

A dataset folder holds images and labels (NIfTI files or DICOM folders) and a
`dataset.json` manifest::

    {"name": "nih-pancreas", "organ_id": 1, "description": "...",
     "cases": [{"id": "PANCREAS_0001", "image": "images/0001",
                "label": "labels/label0001.nii.gz"}, ...]}

Paths are relative to the folder and must stay inside it (no ".."
escape, no absolute path) unless the manifest sets `"external_paths":
true`, the switch for a dataset that points at images kept elsewhere on
purpose (`write_manifest` sets it when it is given files outside the
folder, as `launch.make_dataset --images=/shared/ct` does): a path that
leaves the folder by accident (an edited or copied manifest) is then an
error naming the case instead of a file read from anywhere. The check is
on the path as written (symlinks inside the folder may point anywhere).
"label" may be null for unlabelled cases; other keys are kept as `extra`. The fold table is written once as
`folds.json` (explicit case-ID lists) and read back thereafter, so a case that
goes missing later never shifts the folds (reference sections 1.4 and 7).

The cached, memory-mapped arrays of the cases are served by
`stnjax.data.store.CaseStore`; the training-slice selection and the batch
sampler built on it live in `stnjax.data.sampler`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from stnjax import fileio
from stnjax.checks import DatasetError, InputError, check_int

log = logging.getLogger(__name__)

MANIFEST_FILE = "dataset.json"
FOLDS_FILE = "folds.json"
#: NIH Pancreas-CT fold table by case number (reference 1.4: 20/20/21/21 of 82).
NIH_PANCREAS_FOLD_RANGES = ((1, 20), (21, 40), (41, 61), (62, 82))
#: Case numbers removed from the TCIA release as duplicates (80 cases remain).
NIH_PANCREAS_REMOVED = (25, 70)


# ------------------------------------------------------------------ files

def _write_json(path: Path, obj: Any) -> None:
    fileio.atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{what} {path}: no such file")
    try:
        return fileio.read_json(path, what)
    except ValueError as e:
        raise DatasetError(str(e)) from None


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
    organ_id: int | tuple[int, ...]   # several ids: merged into one organ
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

    Checks: valid JSON object; name a string; organ_id an int >= 1 (or a
    list of them: several label ids merged into one organ); a
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
    if isinstance(organ_id, list) and organ_id and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in organ_id):
        organ_id = organ_id[0] if len(set(organ_id)) == 1 else tuple(sorted(set(organ_id)))
    elif isinstance(organ_id, bool) or not isinstance(organ_id, int) or organ_id < 1:
        raise DatasetError(f"{where}: 'organ_id' must be an int >= 1 or a non-empty list of "
                           f"them (ids merged into one organ), got {organ_id!r}")
    if not isinstance(cases, list) or not cases:
        raise DatasetError(f"{where}: 'cases' must be a non-empty list")
    external = obj.get("external_paths", False)
    if not isinstance(external, bool):
        raise DatasetError(f"{where}: 'external_paths' must be true or false, got {external!r}")
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
            if not external and not _inside(rel):
                raise DatasetError(
                    f"{where}: case {cid!r}: {key} {rel!r} is outside the dataset folder; "
                    "write paths relative to it, or set \"external_paths\": true in the "
                    "manifest if the images are kept elsewhere on purpose")
            p = (path.parent / rel).resolve() if not os.path.isabs(rel) else Path(rel)
            if not p.exists():
                raise DatasetError(f"{where}: case {cid!r}: {key} {p} does not exist")
            paths[key] = p
        extra = {k: v for k, v in c.items() if k not in ("id", "image", "label")}
        entries.append(CaseEntry(cid, paths["image"], paths["label"], extra))
    description = obj.get("description", "")
    extra = {k: v for k, v in obj.items()
             if k not in ("name", "organ_id", "cases", "description", "external_paths")}
    return Manifest(path.resolve(), name, organ_id, tuple(entries), str(description), extra)


def write_manifest(dataset_dir: str | os.PathLike, *, name: str,
                   organ_id: int | Sequence[int],
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

    bases = (root, Path(os.path.abspath(dataset_dir)))

    def rel(p):
        # As written, not resolved: a symlink inside the folder stays a
        # relative path to the link (it may point anywhere, see the top).
        if p is None:
            return None
        p = Path(os.path.abspath(p if os.path.isabs(p) else root / p))
        for base in bases:
            try:
                return p.relative_to(base).as_posix()
            except ValueError:
                continue
        return str(p)

    out = []
    for c in cases:
        if isinstance(c, CaseEntry):
            c = {"id": c.id, "image": c.image, "label": c.label, **dict(c.extra)}
        c = dict(c)
        c["image"], c["label"] = rel(c.get("image")), rel(c.get("label"))
        out.append(c)
    if not isinstance(organ_id, int):
        organ_id = [int(v) for v in organ_id]
    obj = {"name": name, "organ_id": organ_id, "description": description, "cases": out,
           **{k: v for k, v in dict(extra or {}).items() if k != "external_paths"}}
    # Files outside the folder were given on purpose here: say so in the file.
    if any(c[k] is not None and os.path.isabs(c[k]) for c in out for k in ("image", "label")):
        obj["external_paths"] = True
    path = root / MANIFEST_FILE
    with fileio.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
        load_manifest(tmp)  # validate before replacing a good manifest
    return path


def _inside(rel: str) -> bool:
    """Whether the manifest path `rel`, as written, stays inside its folder."""
    if os.path.isabs(rel):
        return False
    norm = os.path.normpath(rel)
    return norm != ".." and not norm.startswith(".." + os.sep)


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


def _pair_key(name: str, pair_by: str) -> str:
    """The pairing key of a volume name: itself, or its last run of digits
    (pair_by="number": BTCV's img0001 / label0001)."""
    if pair_by == "name":
        return name
    digits = re.findall(r"\d+", name)
    return str(int(digits[-1])) if digits else name


def _absolute(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(p))


def paired_cases(image_dir: str | os.PathLike, label_dir: str | os.PathLike, *,
                 pair_by: str = "name") -> list[dict[str, str]]:
    """Manifest entries pairing images and labels by name.

    Images are `image_dir/<id>.nii[.gz]` files or `image_dir/<id>/` DICOM
    folders; labels are `label_dir/<id>.nii[.gz]`. pair_by="number" pairs
    by the last number in the names instead (btcv_img0001 with
    btcv_label0001). An image without a label is an error naming it (a
    dataset for training needs every label); so is a number two files share.
    Hidden files (".", macOS "._" forks) are skipped.
    """
    if pair_by not in ("name", "number"):
        raise InputError(f"pair_by: expected 'name' or 'number', got {pair_by!r}")
    # Absolute from the caller's working directory: write_manifest reads a
    # relative path as relative to the dataset folder. abspath, not resolve:
    # a symlinked file keeps its own name (the case id).
    image_dir, label_dir = _absolute(image_dir), _absolute(label_dir)
    for p, what in ((image_dir, "images"), (label_dir, "labels")):
        if not p.is_dir():
            raise DatasetError(f"{what} {p}: not a folder")
    labels: dict[str, Path] = {}
    for p in sorted(label_dir.iterdir()):
        if p.name.startswith(".") or not p.name.endswith((".nii", ".nii.gz")):
            continue
        key = _pair_key(_volume_name(p), pair_by)
        if key in labels:
            raise DatasetError(f"labels {label_dir}: {labels[key].name} and {p.name} pair "
                               f"with the same image (key {key!r})")
        labels[key] = p
    cases, missing, used = [], [], set()
    for img in sorted(image_dir.iterdir()):
        if img.name.startswith(".") or not (img.is_dir() or img.name.endswith((".nii", ".nii.gz"))):
            continue
        cid = _volume_name(img)
        key = _pair_key(cid, pair_by)
        if key not in labels:
            missing.append(img.name)
            continue
        if key in used:
            raise DatasetError(f"images {image_dir}: two images pair with label "
                               f"{labels[key].name} (key {key!r})")
        used.add(key)
        cases.append({"id": cid, "image": str(img), "label": str(labels[key])})
    if missing:
        raise DatasetError(f"images {image_dir}: no label in {label_dir} for {missing}")
    if not cases:
        raise DatasetError(f"images {image_dir}: no NIfTI file or DICOM folder found")
    return cases


def msd_cases(msd_dir: str | os.PathLike) -> tuple[list[dict[str, str]], tuple[int, ...], str]:
    """(cases, organ ids, name) of a Medical Segmentation Decathlon task folder.

    The folder holds `dataset.json` (its "training" list of {"image",
    "label"} paths relative to the folder, its "labels" names, its "name"),
    `imagesTr/` and `labelsTr/`. Cases are the training list's pairs, in
    its order; the organ is every label id but background (MSD Task07:
    pancreas 1 and tumour 2, one organ as in the paper's evaluation).
    Errors name the folder or the file: no imagesTr, no dataset.json, a
    listed file that does not exist, an image or label file without its
    partner.
    """
    root = Path(msd_dir)
    for sub in ("imagesTr", "labelsTr"):
        if not (root / sub).is_dir():
            raise DatasetError(f"MSD folder {root}: no {sub}/ folder (expected the Decathlon "
                               "layout: dataset.json, imagesTr/, labelsTr/)")
    meta = _read_json(root / "dataset.json", "MSD dataset.json")
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, list) or not training:
        raise DatasetError(f"{root / 'dataset.json'}: 'training' must be a non-empty list of "
                           "{\"image\", \"label\"} entries")
    cases, listed = [], set()
    for i, t in enumerate(training):
        if not (isinstance(t, dict) and isinstance(t.get("image"), str)
                and isinstance(t.get("label"), str)):
            raise DatasetError(f"{root / 'dataset.json'}: training[{i}] must hold 'image' and "
                               f"'label' paths, got {t!r}")
        # abspath, not resolve: a symlinked file keeps its own name (the case id)
        img, lab = (Path(os.path.abspath(root / t[k])) for k in ("image", "label"))
        for p, what in ((img, "image"), (lab, "label")):
            if not p.is_file():
                raise DatasetError(f"{root / 'dataset.json'}: training[{i}] {what} {p} does "
                                   "not exist")
        listed.update({img, lab})
        cases.append({"id": _volume_name(img), "image": str(img), "label": str(lab)})
    base = Path(os.path.abspath(root))
    on_disk = {base / sub / p.name for sub in ("imagesTr", "labelsTr") for p in (root / sub).iterdir()
               if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".")}
    unpaired = sorted(str(p.relative_to(base)) for p in on_disk - listed)
    if unpaired:
        raise DatasetError(f"MSD folder {root}: files without a partner in dataset.json's "
                           f"training list: {unpaired[:10]}"
                           + (f" ... ({len(unpaired)})" if len(unpaired) > 10 else ""))
    names = meta.get("labels", {})
    ids = tuple(sorted(int(k) for k in names if str(k).isdigit() and int(k) > 0)) \
        if isinstance(names, dict) else ()
    if not ids:
        raise DatasetError(f"{root / 'dataset.json'}: 'labels' names no foreground id")
    return cases, ids, str(meta.get("name") or root.name)


def nih_pancreas_cases(image_root: str | os.PathLike, label_root: str | os.PathLike
                       ) -> list[dict[str, str]]:
    """Manifest entries for a TCIA NIH Pancreas-CT download.

    Images: image_root/PANCREAS_XXXX/<study>/<series>/*.dcm (the folder that
    holds the .dcm files is the image); labels: label_root/labelXXXX.nii.gz
    (TCIA_pancreas_labels-02-05-2017, pancreas = 1). Ids are "PANCREAS_XXXX".
    A case without a label, or without exactly one DICOM series folder, is
    left out with a warning (the fold table by ID keeps the others in place).
    """
    image_root, label_root = _absolute(image_root), _absolute(label_root)
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
