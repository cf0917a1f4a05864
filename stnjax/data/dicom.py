"""Reading one DICOM CT series (a folder of single-frame slices) into HU.

`stnjax.data.volume_io.load_image` calls `read_series` for a folder; most users never
import this module directly. Every header is read and checked before any
pixel data is decoded, so a bad series fails fast and names the files.

The array comes back in the series' own voxel order, `[row, column, slice]`
(the DICOM `pixel_array` layout, slices sorted by position along the slice
normal), with a NIfTI-style affine (voxel index -> RAS mm). DICOM patient
coordinates are LPS, so x and y change sign on the way to RAS. Each
slice's InstanceNumber is kept: `official_ornt` turns the position order
into the official RSTN pipeline's (slices by InstanceNumber, reference 1.1).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from stnjax.checks import VolumeError

# Relative tolerance on the slice step, as a fraction of the median step.
STEP_TOLERANCE = 0.01
# Direction cosines and pixel spacings that differ by less are "the same".
_COSINE_TOL = 1e-4
_SPACING_RTOL = 1e-4
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class DicomSeries:
    """A decoded series.

    Attributes:
      data: float32 (rows, columns, slices) Hounsfield units, slices ordered
        by increasing position along the slice normal.
      affine: (4, 4) float64, voxel index -> RAS mm.
      series_uid: the SeriesInstanceUID ('' when the files carry none).
      files: the slice files in the order of the slice axis.
      instance_numbers: each slice's InstanceNumber in that order (None
        where a file carries none or an unreadable one).
    """
    data: np.ndarray
    affine: np.ndarray
    series_uid: str
    files: tuple[str, ...]
    instance_numbers: tuple[int | None, ...]


def _short(files: list[str], limit: int = 4) -> str:
    """A short, readable list of file names."""
    names = [os.path.basename(f) for f in files[:limit]]
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(names) + more


def _dcmread(p: Path, pixels: bool = True) -> pydicom.Dataset:
    """pydicom.dcmread (`pixels` False: up to the pixel data only), but a
    file pydicom stops reading early (it returns what it parsed, empty when
    the cut is inside a sequence, and only warns) is a VolumeError naming
    the file; other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(p, stop_before_pixels=not pixels)
    ended = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if ended or (len(ds) == 0 and p.stat().st_size > 132):
        why = ended[0] if ended else "no data elements"
        raise VolumeError(f"DICOM file {p}: truncated or corrupt ({p.stat().st_size} bytes; "
                          f"pydicom: {why}); copy it again")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ds


def _read_headers(folder: Path, pixels: bool = True) -> list[tuple[str, pydicom.Dataset]]:
    """Reads every DICOM file in `folder` (pixel data kept, not decoded;
    `pixels` False: not read at all).

    Non-DICOM files and DICOMDIR index files are skipped with one warning.
    Raises VolumeError when nothing readable is left.
    """
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file()]
    if not files:
        subdirs = [p.name for p in entries if p.is_dir()]
        hint = (f" (it holds only folders: {', '.join(subdirs[:4])}; pass the "
                "folder that holds the slice files)") if subdirs else ""
        raise VolumeError(f"DICOM folder {folder}: no files{hint}")
    out, skipped = [], []
    for p in files:
        try:
            ds = _dcmread(p, pixels)
        except InvalidDicomError:
            skipped.append(str(p))
            continue
        except VolumeError:
            raise
        except Exception as e:  # truncated or corrupt DICOM
            raise VolumeError(f"DICOM file {p}: cannot be read ({e})") from e
        sop_class = str(getattr(ds.get("file_meta", None),
                                "MediaStorageSOPClassUID", ""))
        if sop_class == _DICOMDIR_SOP_CLASS:
            skipped.append(str(p))
            continue
        out.append((str(p), ds))
    if skipped:
        warnings.warn(f"DICOM folder {folder}: skipped {len(skipped)} file(s) "
                      f"that are not DICOM images: {_short(skipped)}",
                      stacklevel=3)
    if not out:
        raise VolumeError(f"{folder}: neither a NIfTI file nor a folder with "
                          f"DICOM files ({len(files)} file(s), none is DICOM)")
    return out


def _pick_series(folder: Path, items: list[tuple[str, pydicom.Dataset]],
                 series_uid: str | None) -> tuple[str, list]:
    """Groups the files by SeriesInstanceUID and returns the one to load."""
    groups: dict[str, list] = {}
    for f, ds in items:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(
            (f, ds))

    def listing() -> str:
        rows = []
        for uid, members in groups.items():
            ds = members[0][1]
            note = "" if uid else " (the files carry no SeriesInstanceUID)"
            rows.append(f"  series_uid={uid!r}: {len(members)} file(s), "
                        f"{ds.get('Modality', '?')}, "
                        f"'{ds.get('SeriesDescription', '')}'{note}")
        return "\n".join(rows)

    if series_uid is not None:
        if series_uid not in groups:
            raise VolumeError(f"DICOM folder {folder}: no series with "
                              f"series_uid={series_uid!r}; it holds:\n{listing()}")
        return series_uid, groups[series_uid]
    if len(groups) > 1:
        raise VolumeError(f"DICOM folder {folder} holds {len(groups)} series; "
                          f"pick one with series_uid=...:\n{listing()}")
    uid = next(iter(groups))
    return uid, groups[uid]


def _float_list(ds: pydicom.Dataset, keyword: str, n: int, f: str) -> np.ndarray:
    """A multi-valued numeric header as float64 (n,), or VolumeError."""
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"DICOM file {f}: {keyword} is missing or invalid "
                          f"({value!r}); cannot place the slice in space")
    return arr


def _no_pixels_reason(f: str, ds: pydicom.Dataset) -> str:
    """Why a slice has no PixelData, with the file size: a file cut short
    between two elements (an interrupted copy) reads as a shorter valid
    file, so truncation is named as the likely cause."""
    size = os.path.getsize(f)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows and cols:
        need = int(rows) * int(cols) * int(ds.get("BitsAllocated", 16) or 16) // 8
        return (f"DICOM file {f}: no pixel data: the file ({size} bytes) ends without the "
                f"PixelData element a {int(rows)} x {int(cols)} slice needs ({need} bytes); "
                "truncated by an interrupted copy or download? Copy it again")
    return (f"DICOM file {f}: no pixel data and no image size: the file ({size} bytes) ends "
            "after its first header elements, probably truncated (an interrupted copy or "
            "download); copy it again")


def _check_pixels(folder: Path, members: list, pixels: bool = True) -> None:
    """Every file one single-sample frame, all of one size (`pixels` False:
    read without pixel data, so only its size is checked)."""
    for f, ds in members:
        if "PixelData" not in ds if pixels else not (ds.get("Rows") and ds.get("Columns")):
            raise VolumeError(_no_pixels_reason(f, ds))
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"DICOM file {f}: multi-frame images are not "
                              "supported (one slice per file expected)")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(f"DICOM file {f}: {ds.SamplesPerPixel} samples "
                              "per pixel; a CT slice has 1")
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in members}
    if len(sizes) > 1:
        by_size = {}
        for f, ds in members:
            by_size.setdefault((int(ds.Rows), int(ds.Columns)), []).append(f)
        parts = "; ".join(f"{r}x{c} in {_short(fs)}"
                          for (r, c), fs in by_size.items())
        raise VolumeError(f"DICOM folder {folder}: slices have mixed sizes "
                          f"(rows x columns): {parts}")


def _check_planes(folder: Path, members: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One orientation and pixel spacing for all slices; returns
    (orientation (6,), pixel spacing (2,), positions (n, 3)) float64."""
    first_f, first = members[0]
    iop0 = _float_list(first, "ImageOrientationPatient", 6, first_f)
    ps0 = _float_list(first, "PixelSpacing", 2, first_f)
    positions = []
    for f, ds in members:
        iop = _float_list(ds, "ImageOrientationPatient", 6, f)
        if np.max(np.abs(iop - iop0)) > _COSINE_TOL:
            raise VolumeError(
                f"DICOM folder {folder}: mixed slice orientations: "
                f"{os.path.basename(first_f)} has {iop0.tolist()}, "
                f"{os.path.basename(f)} has {iop.tolist()}")
        ps = _float_list(ds, "PixelSpacing", 2, f)
        if not np.allclose(ps, ps0, rtol=_SPACING_RTOL, atol=0):
            raise VolumeError(
                f"DICOM folder {folder}: mixed pixel spacings: "
                f"{os.path.basename(first_f)} has {ps0.tolist()}, "
                f"{os.path.basename(f)} has {ps.tolist()}")
        positions.append(_float_list(ds, "ImagePositionPatient", 3, f))
    return iop0, ps0, np.asarray(positions)


def _check_steps(folder: Path, names: list[str], depth: np.ndarray) -> float:
    """Slice depths (sorted, mm) without duplicates or uneven steps; returns
    the median step."""
    steps = np.diff(depth)
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        pairs = "; ".join(f"{names[i]} and {names[i + 1]} at {depth[i]:.3f} mm"
                          for i in dup[:4])
        raise VolumeError(f"DICOM folder {folder}: {dup.size} duplicate slice "
                          f"position(s): {pairs}")
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > STEP_TOLERANCE * median)
    if bad.size:
        pairs = "; ".join(f"{steps[i]:.3f} mm between {names[i]} and "
                          f"{names[i + 1]}" for i in bad[:4])
        raise VolumeError(
            f"DICOM folder {folder}: uneven slice spacing (a gap or missing "
            f"slice?): median step {median:.3f} mm, but {pairs}")
    return median


def _check_slices(folder: Path, members: list, pixels: bool = True
                  ) -> tuple[list, np.ndarray]:
    """Checks one series' headers, sorts its slices and builds the affine.

    Returns the (file, dataset) pairs in slice order and the RAS affine.
    """
    _check_pixels(folder, members, pixels)
    iop0, ps0, positions = _check_planes(folder, members)
    first_f = members[0][0]
    row_cos, col_cos = iop0[:3], iop0[3:]   # along a row / along a column
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise VolumeError(f"DICOM file {first_f}: ImageOrientationPatient "
                          f"{iop0.tolist()} is not two orthogonal unit vectors")
    n = len(members)
    if n < 2:
        raise VolumeError(f"DICOM folder {folder}: the series has 1 slice; a "
                          "volume needs at least 2 (slice spacing is undefined)")
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    depth, positions = depth[order], positions[order]
    members = [members[i] for i in order]
    names = [os.path.basename(f) for f, _ in members]
    median = _check_steps(folder, names, depth)
    # The slice vector comes from the positions themselves, so a gantry tilt
    # gives a sheared affine instead of a silently wrong one.
    slice_vec = (positions[-1] - positions[0]) / (n - 1)
    expected = positions[0] + np.arange(n)[:, None] * slice_vec
    off = np.linalg.norm(positions - expected, axis=1)
    if off.max() > STEP_TOLERANCE * median + 1e-3:
        i = int(off.argmax())
        raise VolumeError(f"DICOM folder {folder}: slice positions are not on "
                          f"a line: {names[i]} is {off[i]:.3f} mm off")
    lps = np.eye(4)
    lps[:3, 0] = col_cos * ps0[0]   # next row: along the column cosines
    lps[:3, 1] = row_cos * ps0[1]   # next column: along the row cosines
    lps[:3, 2] = slice_vec
    lps[:3, 3] = positions[0]
    return members, _LPS_TO_RAS @ lps


def _decode(f: str, ds: pydicom.Dataset) -> np.ndarray:
    """One slice in HU (float64 rows x columns), rescale applied."""
    try:
        pixels = ds.pixel_array
    except Exception as e:
        ts = UID(str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "")))
        raise VolumeError(
            f"DICOM file {f}: cannot decode pixel data with transfer syntax "
            f"'{ts.name or ts}' ({e}); JPEG 2000 needs pylibjpeg-openjpeg") from e
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float64) * slope + intercept


class SeriesHeader(NamedTuple):
    """What the slice headers of a series say, without its pixel data."""
    affine: np.ndarray                  # (4, 4) RAS affine of [row, column, slice]
    shape: tuple[int, int, int]         # (rows, columns, slices)
    files: tuple[str, ...]              # slice files, in position order
    instance_numbers: tuple[int | None, ...]  # their InstanceNumbers (None: absent)


def read_series_geometry(folder: str | os.PathLike, *, series_uid: str | None = None
                         ) -> SeriesHeader:
    """The affine, shape, files and InstanceNumbers of the series
    `read_series` would read, from the slice headers alone (no pixel data is
    read): the same checks and VolumeErrors, except that pixel data that is
    missing or cannot be decoded is found only by `read_series`."""
    folder = Path(folder)
    items = _read_headers(folder, pixels=False)
    _, members = _pick_series(folder, items, series_uid)
    members, affine = _check_slices(folder, members, pixels=False)
    first = members[0][1]
    return SeriesHeader(affine, (int(first.Rows), int(first.Columns), len(members)),
                        tuple(f for f, _ in members),
                        tuple(_instance_number(ds) for _, ds in members))


def read_series(folder: str | os.PathLike, *,
                series_uid: str | None = None) -> DicomSeries:
    """Reads one CT series from a folder of DICOM slice files.

    Args:
      folder: the folder that holds the slice files (non-DICOM files and a
        DICOMDIR are skipped with a warning).
      series_uid: which SeriesInstanceUID to load when the folder holds
        several; required then.

    Returns:
      A DicomSeries: float32 (rows, columns, slices) HU and the RAS affine.

    Raises:
      VolumeError naming the folder or file: no DICOM files, several series,
      missing pixel data or geometry, mixed sizes / orientations / spacings,
      duplicate positions, a gap or uneven slice spacing, undecodable pixels.
    """
    folder = Path(folder)
    items = _read_headers(folder)
    uid, members = _pick_series(folder, items, series_uid)
    members, affine = _check_slices(folder, members)
    rows, cols = int(members[0][1].Rows), int(members[0][1].Columns)
    data = np.empty((rows, cols, len(members)), np.float32)
    for k, (f, ds) in enumerate(members):
        data[:, :, k] = _decode(f, ds)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise VolumeError(f"DICOM folder {folder}: {bad} NaN or infinite "
                          "voxels after rescale")
    return DicomSeries(data=data, affine=affine, series_uid=uid,
                       files=tuple(f for f, _ in members),
                       instance_numbers=tuple(_instance_number(ds) for _, ds in members))


def _instance_number(ds: pydicom.Dataset) -> int | None:
    """A slice's InstanceNumber, or None when absent or not an integer."""
    value = ds.get("InstanceNumber")
    try:
        return None if value is None or str(value).strip() == "" else int(value)
    except (TypeError, ValueError):
        return None


def official_ornt(nums: Sequence[int | None], files: Sequence[str],
                  folder: str | os.PathLike) -> np.ndarray:
    """(3, 2) orientation transform from a series' array (`read_series`:
    [row, column, slice by position]; `nums` and `files`: its slices'
    InstanceNumbers and files in that order, from a `DicomSeries` or a
    `SeriesHeader`) to the official RSTN pipeline's
    layout (dicom2npy: [row, column, InstanceNumber - 1]): the identity when
    InstanceNumber rises with the slice position, the slice axis flipped
    when it falls.

    Raises:
      VolumeError naming the folder (and `data.orientation`) when a slice has
      no InstanceNumber, or the numbers do not rise or fall strictly along
      the positions (duplicates, or an order that is no flip of the spatial
      one: the official array would not be a volume).
    """
    missing = [f for f, n in zip(files, nums) if n is None]
    if missing:
        raise VolumeError(
            f"DICOM folder {folder}: data.orientation='official' orders the slices by "
            f"InstanceNumber, but {len(missing)} file(s) carry none (or no integer): "
            f"{_short(missing)}; use data.orientation='canonical'")
    steps = np.diff(np.asarray(nums, np.int64))
    if np.all(steps > 0):
        return np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    if np.all(steps < 0):
        return np.array([[0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    # The first step against the direction of the first one (or a repeat).
    i = int(np.flatnonzero(steps <= 0 if steps[0] > 0 else steps >= 0)[0])
    names = [os.path.basename(f) for f in files[i:i + 2]]
    raise VolumeError(
        f"DICOM folder {folder}: data.orientation='official' orders the slices by "
        f"InstanceNumber, but the numbers do not run strictly one way along the slice "
        f"positions ({names[0]}: {nums[i]}, next in position {names[1]}: {nums[i + 1]}), "
        "so that order is not a volume; use data.orientation='canonical'")
