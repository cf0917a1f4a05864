"""The case store: each case read once, served from a memory-mapped cache.

`CaseStore` loads a case of a dataset manifest (`stnjax.data.manifest`) with
`volume_io.load_case`, windows it and caches the result, so training reads
3-slice windows from plane-ordered arrays and evaluation reads whole
volumes (and their geometry) without touching the source files again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
import re
from typing import Iterable, Sequence

import numpy as np

from stnjax import fileio
from stnjax.data import preprocess
from stnjax.data import resample
from stnjax.data import volume_io
from stnjax.checks import InputError, check_int
from stnjax.data.manifest import CaseEntry, DatasetError, Manifest, _write_json

log = logging.getLogger(__name__)

#: Cached images are the HU window quantised to uint16 (preprocess.encode_window).
IMAGE_LEVELS = preprocess.IMAGE_LEVELS
_CACHE_VERSION = 2  # 2: the record holds the source geometry (spacing: in the key)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)  # a file object: np.save would add ".npy" to a name


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

    The first use of a case reads it with `volume_io.load_case`, windows the
    HU (`preprocess.encode_window`, uint16) and writes, atomically, into
    `cache_dir`: the window levels, the bool organ mask and a JSON record
    (shape, spacing, affine, source geometry). Files are keyed by a hash of
    the manifest entry, the source files' sizes and mtimes, the organ id and
    the window, so a changed input or setting never reuses a stale cache.
    Per-plane copies with the slicing axis first are made on first use, so
    reading a 3-slice window touches only 3 contiguous slices.

    With `spacing` (mm per canonical axis, `data.spacing`) every case is
    served on that grid (`stnjax.data.resample`: the HU image linearly
    before windowing, the label by nearest neighbour), keyed by the spacing;
    the label is also kept on the native grid, and `to_native` maps a
    result back, for scoring and for predictions that overlay the input.

    `orientation` is the voxel order of every served array (`data.orientation`,
    `stnjax.data.orientation`): "canonical" (PLS) or "official" (each case's
    storage order, as the official RSTN pipeline; keyed by it, never with
    `spacing`). Shapes, spacings and affines below are of that layout.
    """

    def __init__(self, manifest: Manifest, cache_dir: str | os.PathLike, *,
                 hu_window: tuple[float, float] = preprocess.HU_WINDOW,
                 spacing: Sequence[float] | None = None, orientation: str = "canonical"):
        if not isinstance(manifest, Manifest):
            raise InputError(f"manifest: expected a Manifest, got {type(manifest).__name__}")
        lo, hi = (float(v) for v in hu_window)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InputError(f"hu_window: expected finite low < high, got {hu_window}")
        self.manifest, self.hu_window = manifest, (lo, hi)
        self.target_spacing = resample.check_spacing(spacing, "spacing")
        self.orientation = volume_io.check_orientation(orientation)
        if self.orientation != "canonical" and self.target_spacing is not None:
            raise InputError(f"orientation: {orientation!r} takes no resampling, but spacing "
                             f"is {list(self.target_spacing)}")
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
        key = [_CACHE_VERSION, e.id, str(e.image), str(e.label), self.manifest.organ_id,
               self.hu_window, _source_stamp(e.image), _source_stamp(e.label)]
        if self.target_spacing is not None:  # native-grid keys stay as they were
            key.append(["spacing", list(self.target_spacing)])
        if self.orientation != "canonical":  # canonical keys stay as they were
            key.append(["orientation", self.orientation])
        key = json.dumps(key)
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
        try:
            self._meta[case_id] = fileio.read_json(meta_path, "case cache record")
        except ValueError as e:  # a damaged cache entry is rebuilt, never trusted
            log.warning("%s; rebuilding the cache entry of %s", e, case_id)
            self._build(case_id, base)
            self._meta[case_id] = fileio.read_json(meta_path, "case cache record")
        return self._meta[case_id]

    def _build(self, case_id: str, base: Path) -> None:
        e = self._entry(case_id)
        case = self.load_case(case_id)
        geo = case.geometry
        image, label = case.image, case.label
        shape, affine = tuple(image.shape), np.asarray(geo.affine)
        if self.target_spacing is not None:
            shape = resample.grid_shape(image.shape, geo.spacing, self.target_spacing)
            affine = resample.grid_affine(geo.affine, image.shape, shape)
            image = resample.resample_linear(image, shape)  # HU, before windowing
            if label is not None:
                # The label on the native grid too: evaluation scores there.
                _save_npy(Path(f"{base}.label.native.npy"), label.astype(bool))
                label = resample.resample_nearest(label, shape)
        _save_npy(Path(f"{base}.image.npy"), preprocess.encode_window(image, *self.hu_window))
        if label is not None:
            _save_npy(Path(f"{base}.label.npy"), label.astype(bool))
        meta = {"case_id": case_id, "shape": list(shape),
                "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
                "affine": np.asarray(affine).tolist(),
                "native_shape": list(case.image.shape),
                "native_spacing": [float(s) for s in geo.spacing],
                "resampled": self.target_spacing is not None,
                "source_affine": np.asarray(geo.source_affine).tolist(),
                "source_shape": list(geo.source_shape),
                "orientation": geo.orientation,
                "source_ornt": np.asarray(geo.source_ornt).tolist(),
                "source": geo.source,
                "has_label": case.label is not None,
                "organ_ids_present": list(case.organ_ids_present),
                "image": str(e.image), "label": None if e.label is None else str(e.label),
                "hu_window": list(self.hu_window), "organ_id": self.manifest.organ_id}
        _write_json(Path(f"{base}.json"), meta)
        self.loads += 1

    def prepare(self, case_ids: Iterable[str] | None = None) -> None:
        """Loads (or finds cached) the given cases, default all."""
        for cid in (self.case_ids if case_ids is None else case_ids):
            self._meta_of(cid)

    def shape(self, case_id: str) -> tuple[int, int, int]:
        """(X, Y, Z) shape of the model grid."""
        return tuple(self._meta_of(case_id)["shape"])

    def spacing(self, case_id: str) -> np.ndarray:
        """(3,) float64 mm per model-grid axis."""
        return np.asarray(self._meta_of(case_id)["spacing"], np.float64)

    def affine(self, case_id: str) -> np.ndarray:
        """(4, 4) float64 model-grid voxel -> RAS mm."""
        return np.asarray(self._meta_of(case_id)["affine"], np.float64)

    def geometry(self, case_id: str) -> volume_io.Geometry:
        """The case's Geometry (native model layout and source layout, for
        writing predictions that overlay the input), without reading the source."""
        m = self._meta_of(case_id)
        orientation = m.get("orientation", "canonical")  # records before the field
        ornt = None if orientation == "canonical" else np.asarray(m["source_ornt"])
        return volume_io.Geometry.from_affine(np.asarray(m["source_affine"], np.float64),
                                              m["source_shape"], m["source"], ornt=ornt,
                                              orientation=orientation)

    def has_label(self, case_id: str) -> bool:
        return bool(self._meta_of(case_id)["has_label"])

    def resampled(self, case_id: str) -> bool:
        """Whether the case is served on a resampled grid (`spacing` given)."""
        return bool(self._meta_of(case_id).get("resampled", False))

    def native_shape(self, case_id: str) -> tuple[int, int, int]:
        """(X, Y, Z) shape of the native grid (= `shape` unless resampled)."""
        m = self._meta_of(case_id)
        return tuple(m.get("native_shape", m["shape"]))

    def native_spacing(self, case_id: str) -> np.ndarray:
        """(3,) float64 mm per axis of the native grid."""
        m = self._meta_of(case_id)
        return np.asarray(m.get("native_spacing", m["spacing"]), np.float64)

    def native_label(self, case_id: str) -> np.ndarray:
        """bool (X, Y, Z) organ mask on the source grid (read-only memory map)."""
        if not self.resampled(case_id):
            return self.label(case_id)
        if not self.has_label(case_id):
            raise DatasetError(f"case {case_id!r}: has no label in manifest {self.manifest.path}")
        return np.load(Path(f"{self._base(case_id)}.label.native.npy"), mmap_mode="r")

    def to_native(self, case_id: str, array: np.ndarray) -> np.ndarray:
        """A result on the case's model grid (X, Y, Z, ...) on its source grid
        (`resample.to_grid`: masks linearly then >= 0.5); unchanged when the
        case is not resampled."""
        if tuple(np.shape(array)[:3]) != self.shape(case_id):
            raise InputError(f"array: expected the model grid {self.shape(case_id)} of case "
                             f"{case_id!r}, got {tuple(np.shape(array))}")
        return resample.to_grid(array, self.native_shape(case_id))

    def organ_ids_present(self, case_id: str) -> tuple[int, ...]:
        """Which of the organ's label ids the case's label holds."""
        return tuple(self._meta_of(case_id).get("organ_ids_present", ()))

    def check_organ_ids(self, case_ids: Iterable[str] | None = None) -> None:
        """InputError naming the ids of a several-id organ that occur in no
        label of `case_ids` (default all labelled cases): a typo in the id
        list would otherwise pass silently as a smaller organ."""
        ids = self.manifest.organ_id
        if isinstance(ids, int):
            return  # a single id absent from a label is already an error there
        cases = [c for c in (self.case_ids if case_ids is None else case_ids)
                 if self.has_label(c)]
        absent = volume_io.absent_organ_ids(ids, (self.organ_ids_present(c) for c in cases))
        if absent:
            raise InputError(f"data.organ_ids: {absent} of {list(ids)} occur in no label of "
                             f"the {len(cases)} labelled cases of {self.manifest.path}")

    def load_case(self, case_id: str) -> volume_io.Case:
        """The case read afresh from its source, in the store's orientation
        (for its Geometry, e.g. to write predictions that overlay the input)."""
        e = self._entry(case_id)
        return volume_io.load_case(e.image, e.label, organ_id=self.manifest.organ_id,
                                   case_id=case_id, orientation=self.orientation)

    def plane(self, case_id: str, plane: str, kind: str = "image") -> np.ndarray:
        """Read-only memory map (S, H, W) of the plane view, slicing axis first
        and contiguous: uint16 quantised window for kind="image" (decode with
        `preprocess.decode_window`), bool for kind="label". The same layout as
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
        return preprocess.decode_window(self.plane(case_id, "X", "image"))

    def label(self, case_id: str) -> np.ndarray:
        """bool (X, Y, Z) organ mask (read-only memory map)."""
        return self.plane(case_id, "X", "label")

    def window(self, case_id: str, plane: str, j: int) -> tuple[np.ndarray, np.ndarray]:
        """One training window: image and label, float32 (H, W, 3) each,
        slices [max(0, j-1), j, min(S-1, j+1)] of the plane view."""
        img = self.plane(case_id, plane, "image")
        check_int(j, "j", 0, img.shape[0] - 1)
        lab = self.plane(case_id, plane, "label")
        return (preprocess.decode_window(preprocess.gather_windows(img, j)),
                preprocess.gather_windows(lab, j).astype(np.float32))

