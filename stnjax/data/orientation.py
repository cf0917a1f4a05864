"""Voxel orders of a volume (`data.orientation`) and its `Geometry`.

The models see every volume in one of two orders (the *model layout*):

  "canonical" (the default): **PLS**, axis 0 anterior -> posterior, axis 1
    right -> left, axis 2 inferior -> superior, found from the file's affine
    (DESIGN.md, "Orientation and planes"), whatever order the file stores.
  "official": the storage order the official RSTN pipeline fed its networks
    (reference 1.1 - 1.2), taken from how the file stores its voxels, not
    from its affine: a DICOM series as `[DICOM row, DICOM column, slice]`
    with the slices in InstanceNumber order (dicom2npy's `InstanceNumber - 1`
    index); a NIfTI file as its stored array transposed (1, 0, 2) (nii2npy's
    `get_data().transpose(1, 0, 2)`), nothing flipped.

Both are permutations and flips of the stored voxels (never a resampling),
so `Geometry` keeps the affine of the model layout exactly and writes an
array back in the file's own voxel order and affine. `Geometry.to_canonical`
gives any model-layout array in PLS (for pictures, and for comparing
spacings across files stored in different orders).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from nibabel import orientations as ornt_lib

from stnjax.checks import InputError, VolumeError

#: The model layouts `data.orientation` names (see the module doc).
ORIENTATIONS = ("canonical", "official")
CANONICAL_AXCODES = ("P", "L", "S")
_CANONICAL_ORNT = ornt_lib.axcodes2ornt(CANONICAL_AXCODES)
#: Stored NIfTI axes -> the official layout: axes 0 and 1 swapped, no flip.
OFFICIAL_NIFTI_ORNT = np.array([[1.0, 1.0], [0.0, 1.0], [2.0, 1.0]])


def check_orientation(value: Any, name: str = "orientation") -> str:
    """`value` when it is one of ORIENTATIONS; InputError naming `name` otherwise."""
    if not isinstance(value, str) or value not in ORIENTATIONS:
        raise InputError(f"{name}: expected one of {ORIENTATIONS}, got {value!r}")
    return value


def _readonly(a: Any) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


def inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """The orientation transform that undoes `ornt` (nibabel's convention:
    row i = (the axis input axis i goes to, its flip))."""
    ornt = np.asarray(ornt)
    inv = np.zeros_like(ornt)
    for src_axis, (dst_axis, flip) in enumerate(ornt):
        inv[int(dst_axis)] = (src_axis, flip)
    return inv


def compose_ornt(first: np.ndarray, then: np.ndarray) -> np.ndarray:
    """The transform of `apply_orientation(apply_orientation(a, first), then)`."""
    first, then = np.asarray(first), np.asarray(then)
    out = np.zeros_like(first)
    for i, (mid, flip) in enumerate(first):
        out[i] = (then[int(mid), 0], flip * then[int(mid), 1])
    return out


def canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """(3, 2) transform from the voxel axes of a grid with this affine
    (voxel -> RAS mm) to canonical PLS (nearest axes for an oblique grid)."""
    return ornt_lib.ornt_transform(ornt_lib.io_orientation(np.asarray(affine, np.float64)),
                                   _CANONICAL_ORNT)


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
    """Where a model-layout voxel grid lies in the world, and its source layout.

    Attributes:
      affine: (4, 4) float64, model-layout voxel index -> RAS mm.
      shape: the model-layout grid shape (3 ints).
      source_affine: (4, 4) float64 affine of the file's own voxel order.
      source_shape: the grid shape in the file's own voxel order.
      source_ornt: (3, 2) nibabel orientation transform, source axes ->
        model axes (for `apply_orientation`).
      source: the file or DICOM folder this grid came from.
      orientation: the model layout, one of ORIENTATIONS.
    """
    affine: np.ndarray
    shape: tuple[int, int, int]
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    source_ornt: np.ndarray
    source: str
    orientation: str = "canonical"

    @classmethod
    def from_affine(cls, source_affine: np.ndarray, source_shape: Sequence[int], source: str,
                    *, ornt: np.ndarray | None = None, orientation: str = "canonical"
                    ) -> "Geometry":
        """The geometry of a file whose voxel grid (`source_shape`) has this
        affine. `ornt`: source axes -> model axes, default canonical PLS
        (from the affine); `orientation` names the layout it makes."""
        source_affine = np.asarray(source_affine, np.float64)
        source_shape = tuple(int(n) for n in source_shape)
        orientation = check_orientation(orientation)
        if (source_affine.shape != (4, 4)
                or not np.all(np.isfinite(source_affine))
                or abs(np.linalg.det(source_affine[:3, :3])) < 1e-12):
            raise VolumeError(f"{source}: invalid (singular or non-finite) "
                              f"affine:\n{source_affine}")
        if ornt is None:
            if orientation != "canonical":
                raise InputError(f"Geometry.from_affine: orientation={orientation!r} needs "
                                 "its ornt (the file's storage order decides it)")
            ornt = canonical_ornt(source_affine)
        ornt = np.asarray(ornt, np.float64)
        if ornt.shape != (3, 2) or sorted(ornt[:, 0].astype(int)) != [0, 1, 2]:
            raise InputError(f"ornt: expected a (3, 2) axis permutation with flips, got {ornt}")
        affine = source_affine @ ornt_lib.inv_ornt_aff(ornt, source_shape)
        shape = tuple(int(source_shape[int(a)]) for a in inverse_ornt(ornt)[:, 0])
        return cls(_readonly(affine), shape, _readonly(source_affine),
                   source_shape, _readonly(ornt), str(source), orientation)

    @property
    def spacing(self) -> np.ndarray:
        """(3,) float64 voxel size in mm along each model-layout axis."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def canonical(self) -> "Geometry":
        """The canonical PLS geometry of the same file (self when canonical)."""
        if self.orientation == "canonical":
            return self
        return Geometry.from_affine(self.source_affine, self.source_shape, self.source)

    @property
    def model_to_canonical(self) -> np.ndarray:
        """(3, 2) transform, model-layout axes -> canonical PLS axes."""
        return compose_ornt(inverse_ornt(self.source_ornt), self.canonical.source_ornt)

    def from_source(self, array: Any) -> np.ndarray:
        """Source voxel order -> model layout (first 3 axes; any dtype)."""
        array = np.asarray(array)
        if tuple(array.shape[:3]) != self.source_shape:
            raise InputError(f"array: expected source shape {self.source_shape}"
                             f" of {self.source}, got {tuple(array.shape)}")
        return np.ascontiguousarray(ornt_lib.apply_orientation(array, self.source_ornt))

    def to_source(self, array: Any) -> np.ndarray:
        """Model layout -> the source file's voxel order (first 3 axes)."""
        array = np.asarray(array)
        if tuple(array.shape[:3]) != self.shape:
            raise InputError(f"array: expected shape {self.shape} of {self.source}, "
                             f"got {tuple(array.shape)}")
        return np.ascontiguousarray(ornt_lib.apply_orientation(
            array, inverse_ornt(self.source_ornt)))

    def to_canonical(self, array: Any) -> np.ndarray:
        """A model-layout array (first 3 axes; on this grid or one resampled
        from it, which keeps its axes) in canonical PLS order; unchanged when
        the layout is canonical."""
        array = np.asarray(array)
        if array.ndim < 3:
            raise InputError(f"array: expected 3 or more axes, got shape {array.shape}")
        if self.orientation == "canonical":
            return array
        return np.ascontiguousarray(ornt_lib.apply_orientation(array, self.model_to_canonical))

    def from_canonical(self, array: Any) -> np.ndarray:
        """A canonical PLS array of this file's grid (shape `canonical.shape`)
        in the model layout; unchanged when the layout is canonical."""
        array = np.asarray(array)
        canonical = self.canonical
        if tuple(array.shape[:3]) != canonical.shape:
            raise InputError(f"array: expected canonical shape {canonical.shape} of "
                             f"{self.source}, got {tuple(array.shape)}")
        if self.orientation == "canonical":
            return array
        return self.from_source(canonical.to_source(array))

    def spacing_to_canonical(self, spacing: Sequence[float]) -> np.ndarray:
        """(3,) mm per model-layout axis -> mm per canonical axis."""
        out = np.empty(3, np.float64)
        for axis, (dst, _) in enumerate(self.model_to_canonical):
            out[int(dst)] = float(spacing[axis])
        return out
