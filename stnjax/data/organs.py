"""Organs in label maps: an organ's label ids, its mask, which ids a label holds.

An organ is one label id or several merged into one organ (e.g. MSD Task07's
pancreas 1 and tumour 2). Pure NumPy; errors name the label file or the
config field. `stnjax.data.volume_io` re-exports these names.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from stnjax.checks import InputError, VolumeError


def organ_ids(organ_id: Any, name: str = "organ_id") -> tuple[int, ...]:
    """An organ given as one label id or several (merged into one organ, e.g.
    MSD Task07's pancreas 1 and tumour 2) -> the sorted unique ids, each an
    int >= 1. InputError naming `name` otherwise."""
    vals = [organ_id] if isinstance(organ_id, (int, np.integer)) else organ_id
    try:
        vals = list(vals)
    except TypeError:
        raise InputError(f"{name}: expected a label id or a list of ids, got {organ_id!r}") from None
    if (not vals or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
                        for v in vals)):
        raise InputError(f"{name}: expected label ids >= 1 (one int or a non-empty list), "
                         f"got {organ_id!r}")
    return tuple(sorted({int(v) for v in vals}))


def select_organ(label_map: np.ndarray, organ_id: int | Sequence[int], *, source: str
                 ) -> np.ndarray:
    """The bool mask of the organ: `label_map == organ_id`, or for several
    ids their union.

    Args:
      label_map: integer label array (any shape).
      organ_id: the organ's label id (e.g. 7 for TotalSegmentator's pancreas,
        1 for NIH Pancreas-CT), or a list of ids merged into one organ.
      source: the label file, for messages.

    Raises:
      VolumeError when the label is empty or holds no voxel of any of the
      ids (the message lists the ids present).
    """
    label_map = np.asarray(label_map)
    if label_map.dtype.kind not in "iub":
        raise InputError(f"label_map: expected integer ids, got {label_map.dtype}"
                         f" ({source})")
    ids = organ_ids(organ_id)
    mask = label_map == ids[0] if len(ids) == 1 else np.isin(label_map, ids)
    if mask.any():
        return mask
    present = np.unique(label_map)
    present = present[present != 0]
    if present.size == 0:
        raise VolumeError(f"label {source}: empty label map (all voxels 0)")
    listed = ", ".join(str(int(i)) for i in present[:30])
    more = f" ... ({present.size} ids)" if present.size > 30 else ""
    want = f"organ_id={ids[0]}" if len(ids) == 1 else f"any of organ ids {list(ids)}"
    raise VolumeError(f"label {source}: no voxel with {want}; ids present: {listed}{more}")


def ids_present(label_map: np.ndarray, organ_id: int | Sequence[int]) -> list[int]:
    """Which of the organ's ids occur in `label_map` (sorted)."""
    ids = organ_ids(organ_id)
    return [i for i in ids if np.any(np.asarray(label_map) == i)]


def absent_organ_ids(organ_id: Any, present: Iterable[Iterable[int]]) -> list[int]:
    """The organ's ids that occur in none of the cases' `present` id sets."""
    seen = {int(i) for ids in present for i in ids}
    return [i for i in organ_ids(organ_id) if i not in seen]
