"""How much of an organ an output stride can draw, per resampled spacing.

  python -m bench.stride_bound --labels=../shared/data/btcv9/labels --organ_id=6 \\
      --spacings=3,2,1.5 --strides=8,4

FCN-8s scores at stride 8 (its finest skip, pool3) and upsamples the scores
8x linearly. This asks what that grid can hold, independently of any
training: each label (canonical axes, a NIfTI file per case) is resampled
in-plane (linear, > 0.5) to the spacing, every axial slice is averaged over
stride x stride cells (the best a cell's "fraction of organ" could be),
upsampled back linearly and thresholded at 0.5, and the volume's DSC against
the resampled label is printed per case and as a mean. It is not a bound
on a network (logits, not fractions, are interpolated, and a sharp logit
field draws finer shapes); it is the scale at which a structure 15-25 mm
across stops being drawable by linear interpolation of a coarse grid.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from absl import app, flags
from scipy import ndimage

_LABELS = flags.DEFINE_string("labels", "../shared/data/btcv9/labels", "Folder of label NIfTI files.")
_ORGAN = flags.DEFINE_integer("organ_id", 6, "The organ's label id.")
_SPACINGS = flags.DEFINE_string("spacings", "3,2,1.5", "In-plane spacings (mm), comma-separated.")
_STRIDES = flags.DEFINE_string("strides", "8,4", "Output strides, comma-separated.")


def cell_dsc(mask: np.ndarray, stride: int) -> float:
    """DSC of `mask` (X, Y, Z) bool against its stride x stride in-plane cell
    means upsampled linearly and thresholded at 0.5 (the sides cropped to a
    multiple of the stride)."""
    h, w = (mask.shape[0] // stride) * stride, (mask.shape[1] // stride) * stride
    m = mask[:h, :w].astype(np.float32)
    cells = m.reshape(h // stride, stride, w // stride, stride, -1).mean(axis=(1, 3))
    up = ndimage.zoom(cells, (stride, stride, 1), order=1)[:h, :w] > 0.5
    denom = up.sum() + m.sum()
    return float(2.0 * np.logical_and(up, m > 0).sum() / denom) if denom else 1.0


def main(argv):
    del argv
    files = sorted(p for p in Path(_LABELS.value).iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise SystemExit(f"--labels: no .nii / .nii.gz file in {_LABELS.value}")
    spacings = [float(s) for s in _SPACINGS.value.split(",")]
    strides = [int(s) for s in _STRIDES.value.split(",")]
    table = {(sp, st): [] for sp in spacings for st in strides}
    for path in files:
        img = nib.as_closest_canonical(nib.load(path))
        organ = np.asarray(img.dataobj) == _ORGAN.value
        if not organ.any():
            print(f"{path.name}: no voxel of organ {_ORGAN.value}, skipped")
            continue
        zooms = img.header.get_zooms()[:3]
        row = []
        for sp in spacings:
            grid = ndimage.zoom(organ.astype(np.float32), (zooms[0] / sp, zooms[1] / sp, 1),
                                order=1) > 0.5
            for st in strides:
                d = cell_dsc(grid, st)
                table[(sp, st)].append(d)
                row.append(f"{sp:g} mm s{st} {100 * d:5.1f}")
        print(f"{path.name}: " + ", ".join(row))
    for (sp, st), ds in table.items():
        print(f"mean over {len(ds)} cases: {sp:g} mm, stride {st} ({sp * st:g} mm cells): "
              f"DSC {100 * np.mean(ds):.1f} % (min {100 * np.min(ds):.1f})")


if __name__ == "__main__":
    app.run(main)
