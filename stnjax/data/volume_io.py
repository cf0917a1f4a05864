"""CT volume I/O: NIfTI files and DICOM series in, NIfTI predictions out.

Every array that leaves this module is in the model layout its `orientation`
argument names (`data.orientation`; `stnjax.data.orientation`): by default
the canonical orientation **PLS** (see DESIGN.md: axis 0 anterior ->
posterior, axis 1 right -> left, axis 2 inferior -> superior), or with
"official" the official RSTN pipeline's storage order (DICOM rows, DICOM
columns, slices by InstanceNumber; a NIfTI's stored array transposed
(1, 0, 2)). Reorientation permutes and flips axes only (never resamples),
and the affine is kept exactly, so an oblique scan stays oblique.
`Geometry` remembers the file's own voxel order and affine, so that a
prediction is written back in the source layout and overlays the input in
3D Slicer or ITK-SNAP.

Image and label are matched in world coordinates: the label is reoriented
to canonical on its own, its affine is compared with the image's canonical
one, and it is then put into the image's model layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from stnjax import fileio
from stnjax.checks import GeometryError, InputError, VolumeError
from stnjax.data.organs import (  # noqa: F401 - used as volume_io.*
    absent_organ_ids, ids_present, organ_ids, select_organ)
from stnjax.data.orientation import (  # noqa: F401 - Geometry & co. are used as volume_io.*
    CANONICAL_AXCODES, OFFICIAL_NIFTI_ORNT, ORIENTATIONS, Geometry, check_orientation)

# Default world-space tolerance for image/label grids, in mm: the largest
# distance allowed between the same grid corner under the two affines.
DEFAULT_TOLERANCE_MM = 0.1
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """An image in its model layout.

    Attributes:
      data: float32 (X, Y, Z) Hounsfield units, axes of the model layout
        (`geometry.orientation`: canonical PLS by default).
      geometry: its Geometry (data.shape == geometry.shape).
    """
    data: np.ndarray
    geometry: Geometry


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One CT exam with an optional binary organ mask, in its model layout.

    Attributes:
      case_id: a name for the case (defaults to the image file stem).
      image: float32 (X, Y, Z) HU.
      label: bool (X, Y, Z) organ mask, or None when no label was given.
      geometry: the image's Geometry.
      image_path, label_path: where they came from (label_path may be None).
      organ_ids_present: which of the organ's label ids the label holds
        (sorted; () without a label).
    """
    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    image_path: str
    label_path: str | None
    organ_ids_present: tuple[int, ...] = ()


# ----------------------------------------------------------------- reading

def _is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def _open_nifti(path: Path, what: str) -> nib.Nifti1Image:
    """Opens a NIfTI file (header only; data stays on disk)."""
    if not path.exists():
        raise VolumeError(f"{what} {path}: no such file or folder")
    if path.is_dir():
        raise VolumeError(f"{what} {path}: is a folder, expected a NIfTI file")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many kinds for garbage files
        hint = ""
        try:
            import pydicom
            pydicom.dcmread(path, stop_before_pixels=True)
            hint = ("; it is a single DICOM file: pass the folder of the "
                    "series instead")
        except Exception:
            pass
        raise VolumeError(f"{what} {path}: not a readable NIfTI file "
                          f"({type(e).__name__}: {e}){hint}") from e
    if not isinstance(img, nib.nifti1.Nifti1Pair):
        raise VolumeError(f"{what} {path}: {type(img).__name__} files are not "
                          "supported; expected NIfTI (.nii / .nii.gz)")
    if img.header["sform_code"] == 0 and img.header["qform_code"] == 0:
        warnings.warn(f"{what} {path}: sform_code and qform_code are both 0, "
                      "so its position and orientation in the world are "
                      "unknown; using nibabel's fallback affine", stacklevel=3)
    return img


def _shape3(img, path: Path, what: str) -> tuple[int, int, int]:
    """The 3D shape of a NIfTI image; trailing singleton axes are dropped."""
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        kind = ("2D" if len(shape) < 3 else
                f"{len(shape)}D (e.g. a time series or multi-channel image)")
        raise VolumeError(f"{what} {path}: expected a 3D volume, got a {kind} "
                          f"array of shape {tuple(img.shape)}")
    return shape


def _read_array(img, path: Path, what: str, orientation: str = "canonical"
                ) -> tuple[np.ndarray, Geometry]:
    """The voxel array (file order, scaling applied) and its Geometry in the
    `orientation` layout (official: the stored axes 0 and 1 swapped)."""
    shape = _shape3(img, path, what)
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as e:
        raise VolumeError(f"{what} {path}: cannot read voxel data "
                          f"({type(e).__name__}: {e})") from e
    return data, _nifti_geometry(img.affine, shape, path, orientation)


def _nifti_geometry(affine: np.ndarray, shape: tuple[int, int, int], path: Path,
                    orientation: str) -> Geometry:
    """The Geometry of a NIfTI grid in the `orientation` layout (official:
    the stored axes 0 and 1 swapped); shared by loading and header reading."""
    ornt = OFFICIAL_NIFTI_ORNT if orientation == "official" else None
    return Geometry.from_affine(affine, shape, str(path), ornt=ornt, orientation=orientation)


def _dicom_geometry(series: Any, shape: tuple[int, int, int], path: Path,
                    orientation: str) -> Geometry:
    """The Geometry of a DICOM series (`dicom.DicomSeries` or `SeriesHeader`:
    affine, files, instance_numbers) in the `orientation` layout (official:
    slices in InstanceNumber order); shared by loading and header reading."""
    from stnjax.data import dicom
    ornt = (dicom.official_ornt(series.instance_numbers, series.files, path)
            if orientation == "official" else None)
    return Geometry.from_affine(series.affine, shape, str(path), ornt=ornt,
                                orientation=orientation)


def _load_nifti(path: Path, orientation: str) -> Volume:
    data, geom = _read_array(_open_nifti(path, "image"), path, "image", orientation)
    data = data.astype(np.float32, copy=False)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise VolumeError(f"image {path}: {bad} NaN or infinite voxels")
    return Volume(geom.from_source(data), geom)


def _load_dicom(path: Path, series_uid: str | None, orientation: str) -> Volume:
    from stnjax.data import dicom  # lazy: pydicom loads only for DICOM input
    series = dicom.read_series(path, series_uid=series_uid)
    geom = _dicom_geometry(series, series.data.shape, path, orientation)
    return Volume(geom.from_source(series.data), geom)


def load_image(path: str | os.PathLike, *, series_uid: str | None = None,
               orientation: str = "canonical") -> Volume:
    """Loads a CT image in HU, in the model layout `orientation` names.

    Args:
      path: a NIfTI file (.nii / .nii.gz; scl_slope/inter applied) or a
        folder holding one DICOM series (rescale slope/intercept applied,
        compressed transfer syntaxes decoded).
      series_uid: for a DICOM folder with several series, the one to load.
      orientation: "canonical" (PLS, from the affine) or "official" (the
        official RSTN pipeline's storage order: a DICOM series as [row,
        column, slice by InstanceNumber], a NIfTI's stored array transposed
        (1, 0, 2)); see `stnjax.data.orientation`.

    Returns:
      Volume with float32 (X, Y, Z) HU data in that layout and its Geometry
      (model-layout affine, and the file's own voxel order for writing).

    Raises:
      VolumeError naming the file: missing, neither NIfTI nor DICOM, not 3D,
      NaN / infinite voxels, an inconsistent DICOM series, or (official) a
      series whose InstanceNumbers do not run along the slice positions.
      InputError for a bad `orientation`.
    """
    path = Path(path)
    orientation = check_orientation(orientation)
    if not path.exists():
        raise VolumeError(f"image {path}: {_missing_reason(path)}")
    if path.is_dir():
        vol = _load_dicom(path, series_uid, orientation)
    elif series_uid is not None:
        raise InputError(f"series_uid: only for DICOM folders, but {path} is "
                         "a file")
    else:
        vol = _load_nifti(path, orientation)
    warn_implausible_hu(vol.data, path)
    return vol


def read_geometry(path: str | os.PathLike, *, series_uid: str | None = None,
                  orientation: str = "canonical") -> Geometry:
    """The Geometry `load_image(path, orientation=...).geometry` has, from
    the headers alone (a NIfTI header; DICOM slice headers without pixel
    data): the shape and spacing of many inputs can be checked before any is
    decoded. Raises the VolumeError of `load_image` for a missing,
    unreadable or non-3D input (and, with "official", a DICOM series whose
    InstanceNumbers give no volume); damaged voxel data is found only when
    it is loaded."""
    orientation = check_orientation(orientation)
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"image {path}: {_missing_reason(path)}")
    if path.is_dir():
        from stnjax.data import dicom
        head = dicom.read_series_geometry(path, series_uid=series_uid)
        return _dicom_geometry(head, head.shape, path, orientation)
    if series_uid is not None:
        raise InputError(f"series_uid: only for DICOM folders, but {path} is a file")
    img = _open_nifti(path, "image")
    return _nifti_geometry(img.affine, _shape3(img, path, "image"), path, orientation)


#: HU outside this range (after rescale) is not CT of a body: a wrong
#: rescale slope/intercept, or not a CT image at all.
PLAUSIBLE_HU = (-2000.0, 5000.0)


def warn_implausible_hu(hu: np.ndarray, source: str | os.PathLike) -> float:
    """Logs a warning naming `source` when voxels lie outside PLAUSIBLE_HU;
    returns the fraction of such voxels (the volume is still used: the HU
    window clips them, but the result is likely meaningless)."""
    lo, hi = PLAUSIBLE_HU
    frac = float(np.count_nonzero((hu < lo) | (hu > hi))) / max(hu.size, 1)
    if frac > 0:
        logging.getLogger("stnjax.data").warning(
            "image %s: %.4f %% of the voxels lie outside %g..%g HU (min %g, max %g): check "
            "its rescale slope and intercept", source, 100 * frac, lo, hi,
            float(np.min(hu)), float(np.max(hu)))
    return frac


def _missing_reason(path: Path) -> str:
    """Why `path` cannot be opened: a symlink loop, a broken symlink (and
    its target), or no such file."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return "a symbolic link loop"
        except OSError:
            return f"a broken symbolic link (to {os.readlink(path)}, which does not exist)"
    return "no such file or folder"


def _integer_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Label values as an integer array; integral floats are accepted."""
    if data.dtype.kind in "iu":
        return data
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind != "f":
        raise VolumeError(f"label {path}: unsupported voxel type {data.dtype}")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise VolumeError(f"label {path}: {bad} NaN or infinite voxels")
    frac = np.abs(data - np.round(data))
    if frac.max(initial=0.0) > 1e-3:
        odd = np.unique(data[frac > 1e-3])[:5]
        raise VolumeError(f"label {path}: non-integral label values, e.g. "
                          f"{odd.tolist()}; a label map holds integer ids")
    lo, hi = float(data.min(initial=0)), float(data.max(initial=0))
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.round(data).astype(dtype)
    raise VolumeError(f"label {path}: label values out of integer range")


def _geometry_mismatch(label: Geometry, ref: Geometry,
                       tolerance_mm: float) -> str | None:
    """None if the canonical grids agree within tolerance, else a report."""
    # The 8 corner voxels of the reference grid, placed by both affines.
    idx = np.meshgrid(*[[0, max(n - 1, 0)] for n in ref.shape], indexing="ij")
    corners = np.vstack([np.ravel(i) for i in idx] + [np.ones(8)])
    world_ref = (ref.affine @ corners)[:3]
    world_lab = (label.affine @ corners)[:3]
    corner_mm = float(np.linalg.norm(world_ref - world_lab, axis=0).max())
    if label.shape == ref.shape and corner_mm <= tolerance_mm:
        return None

    def fmt(v):
        return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

    dirs = [m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
            for m in (ref.affine, label.affine)]
    cosines = np.clip(np.sum(dirs[0] * dirs[1], axis=0), -1.0, 1.0)
    angle = float(np.degrees(np.arccos(cosines)).max())
    origin_mm = float(np.linalg.norm(ref.affine[:3, 3] - label.affine[:3, 3]))
    return (f"(image vs label) shape {ref.shape} vs {label.shape} "
            f"(canonical PLS); "
            f"spacing {fmt(ref.spacing)} vs {fmt(label.spacing)} mm; "
            f"origin {fmt(ref.affine[:3, 3])} vs {fmt(label.affine[:3, 3])} "
            f"mm (RAS, {origin_mm:.3g} mm apart); direction differs by up to "
            f"{angle:.3g} degrees; grid corners up to {corner_mm:.3g} mm apart "
            f"(tolerance_mm={tolerance_mm})")


def load_label_map(path: str | os.PathLike, reference: Geometry, *,
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> np.ndarray:
    """Loads an integer label map onto the reference image's grid, in its model layout.

    The label is reoriented to canonical from its own affine (so a label
    stored in another voxel order, e.g. LAS against a PLS image, comes out
    aligned), its grid must then match the reference's canonical grid in
    world space, and it is put into the reference's model layout (for
    "official": the image's storage order; for a label stored as the
    image is, as the official nii2npy's transpose (1, 0, 2) gives it).

    Args:
      path: a NIfTI label file (integer ids, or floats with integral values).
      reference: the image's Geometry.
      tolerance_mm: the largest allowed distance between the same grid
        corner under the two affines.

    Returns:
      An integer array of shape reference.shape (the reference's model layout).

    Raises:
      VolumeError for a bad file, GeometryError (naming both files and the
      difference) when the grids do not match.
    """
    path = Path(path)
    data, geom = _read_array(_open_nifti(path, "label"), path, "label")
    data = _integer_labels(data, path)
    problem = _geometry_mismatch(geom, reference.canonical, float(tolerance_mm))
    if problem is not None:
        raise GeometryError(f"label {path} does not match image "
                            f"{reference.source} in world space: {problem}")
    return reference.from_canonical(geom.from_source(data))


def _case_id_from(path: Path) -> str:
    name = path.name
    for suffix in _NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_case(image_path: str | os.PathLike,
              label_path: str | os.PathLike | None = None, *,
              organ_id: int | Sequence[int] = 1, case_id: str | None = None,
              tolerance_mm: float = DEFAULT_TOLERANCE_MM,
              orientation: str = "canonical") -> Case:
    """Loads an image and (optionally) its organ mask, aligned in world space.

    `orientation` is the model layout (`load_image`): "canonical" (PLS) or
    "official" (the official RSTN pipeline's storage order).

    Returns:
      Case with float32 HU image and bool label (None without label_path),
      both in that layout, of the same shape.
    """
    image_path = Path(image_path)
    volume = load_image(image_path, orientation=orientation)
    label, present = None, ()
    if label_path is not None:
        label_map = load_label_map(label_path, volume.geometry,
                                   tolerance_mm=tolerance_mm)
        label = select_organ(label_map, organ_id, source=str(label_path))
        ids = organ_ids(organ_id)
        # One id: select_organ raised unless it is present; no second pass.
        present = ids if len(ids) == 1 else tuple(ids_present(label_map, ids))
    return Case(case_id=case_id or _case_id_from(image_path),
                image=volume.data, label=label, geometry=volume.geometry,
                image_path=str(image_path),
                label_path=None if label_path is None else str(label_path),
                organ_ids_present=present)


# ----------------------------------------------------------------- writing

def _check_out_path(path: Path) -> Path:
    """Checks the output name and folder before anything is written."""
    if not _is_nifti_name(path):
        raise VolumeError(f"output {path}: the name must end in .nii or "
                          ".nii.gz")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist"
        raise VolumeError(f"output {path}: the folder {folder} {why}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VolumeError(f"output {path}: the folder {folder} is not writable")
    if path.is_dir():
        raise VolumeError(f"output {path}: is a folder")
    return folder


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path,
                 folder: Path) -> None:
    """Writes atomically (`fileio.atomic_path`): a temp file in the same
    folder, then os.replace; the file gets the umask's normal permissions."""
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)   # scanner coordinates, both forms set so
    img.set_qform(affine, code=1)   # every viewer places it the same way
    img.header.set_xyzt_units("mm")
    # nibabel picks compression from the name, so the temp keeps the suffix
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    started = False
    try:
        with fileio.atomic_path(path, suffix=suffix) as tmp:
            started = True
            nib.save(img, tmp)
    except OSError as e:
        if not started:
            raise VolumeError(f"output {path}: cannot write in {folder} ({e})") \
                from e
        raise VolumeError(f"output {path}: write failed ({e})") from e


def save_volume(array: Any, geometry: Geometry, path: str | os.PathLike, *,
                dtype: Any = np.float32) -> None:
    """Writes a model-layout array as NIfTI in the source voxel order and affine.

    Args:
      array: (X, Y, Z) array of shape geometry.shape (the model layout:
        canonical PLS, or the official storage order).
      geometry: the Geometry of the image it belongs to.
      path: output .nii or .nii.gz; its folder must exist and be writable.
      dtype: the voxel type on disk.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.shape != geometry.shape:
        raise InputError(f"array: expected shape {geometry.shape} of "
                         f"{geometry.source}, got {array.shape}")
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(f"array: {bad} NaN or infinite values")
    folder = _check_out_path(path)
    _write_nifti(geometry.to_source(array.astype(dtype, copy=False)),
                 geometry.source_affine, path, folder)


def save_mask(mask: Any, geometry: Geometry, path: str | os.PathLike) -> None:
    """Writes a bool (or 0/1) model-layout mask (shape geometry.shape) as a
    uint8 NIfTI label that overlays the source image (source voxel order and
    affine)."""
    mask = np.asarray(mask)
    if mask.dtype.kind not in "biu":
        raise InputError(f"mask: expected bool or integer values, got "
                         f"{mask.dtype}")
    if mask.dtype.kind != "b" and mask.size and (
            mask.min() < 0 or mask.max() > 1):
        raise InputError("mask: expected values 0 and 1")
    save_volume(mask, geometry, path, dtype=np.uint8)
