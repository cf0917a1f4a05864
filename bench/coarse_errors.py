"""Where the coarse stage's errors lie, per held-out case.

  python -m bench.coarse_errors --workdir=/tmp/ct --folds=0,1,2

For every test case of the listed folds of a trained workdir, runs round 0
(the fused coarse mask, reference inference) and splits its false-positive
voxels by where they lie: on axial slices that hold no organ voxel at all
("off-slice": what organ-free training slices, `data.negatives`, are meant
to suppress), within `--near_mm` of the organ on its own slices ("near":
the organ's neighbours, a boundary or discrimination error) and the rest
("far": another structure on an organ slice). Also the share of the false
positives in the largest false component (one big wrong structure, or
scattered specks) and the recall. Printed per case and as the mean over
cases. The voxels are those of the model grid (`data.spacing`), which is
where the first round's boxes are drawn from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags
from scipy import ndimage

from stnjax import metrics

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined only when it runs: importing
    `error_breakdown` (tests) must not clash with launch.train's --workdir."""
    flags.DEFINE_string("workdir", None, "A trained workdir (launch.train).")
    flags.DEFINE_string("folds", "0", "Comma-separated folds.")
    flags.DEFINE_float("near_mm", 20.0, "Distance from the organ that counts as near.")
    flags.mark_flag_as_required("workdir")


FIELDS = ("pred_ml", "dsc", "recall", "fp_off_slice", "fp_off_near", "fp_off_above", "fp_near",
          "fp_far", "fp_largest")


def error_breakdown(pred: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float],
                    near_mm: float = 20.0) -> dict[str, float]:
    """Splits the false positives of a mask by where they lie.

    Args:
      pred, label: (X, Y, Z) bool, Z the axial axis, increasing towards the
        head (the canonical PLS layout).
      spacing: (3,) mm per voxel along X, Y, Z.
      near_mm: the distance from the label within which a false positive on
        an organ slice counts as near, and an organ-free slice as near the
        organ's slices.

    Returns:
      {pred_ml, dsc, recall (fractions, NaN when undefined), fp_off_slice,
      fp_near, fp_far (fractions of the false positives, summing to 1; NaN
      without any), fp_off_near (the part of fp_off_slice on slices within
      near_mm of an organ slice), fp_off_above (the part above the organ's
      highest slice, towards the head; NaN without organ), fp_largest (the
      largest 26-connected false component's share of them)}.
    """
    pred, label = np.asarray(pred, bool), np.asarray(label, bool)
    if pred.shape != label.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and label {label.shape}: expected equal 3-D shapes")
    tp = np.logical_and(pred, label).sum()
    fp_mask = pred & ~label
    fp = int(fp_mask.sum())
    out = {"pred_ml": float(pred.sum() * np.prod(spacing) / 1000.0),
           "dsc": metrics.dsc(pred, label, empty=np.nan),
           "recall": tp / label.sum() if label.any() else np.nan}
    if fp == 0:
        return out | {k: np.nan for k in FIELDS[3:]}
    organ_slice = label.any(axis=(0, 1))  # (Z,)
    off = fp_mask & ~organ_slice[None, None, :]
    if organ_slice.any():
        # Distance (mm) of each axial slice from the nearest organ slice.
        z_mm = ndimage.distance_transform_edt(~organ_slice) * spacing[2]
        dist = ndimage.distance_transform_edt(~label, sampling=spacing)
        off_near = (off & (z_mm <= near_mm)[None, None, :]).sum()
        above = off[..., np.nonzero(organ_slice)[0].max() + 1:].sum() / fp
        near = (fp_mask & ~off & (dist <= near_mm)).sum()
    else:  # every false positive is off-slice
        off_near, above, near = 0, np.nan, 0
    comps, n = ndimage.label(fp_mask, structure=np.ones((3, 3, 3), bool))
    largest = np.bincount(comps.ravel())[1:].max() if n else 0
    out["fp_off_slice"] = off.sum() / fp
    out["fp_off_near"] = off_near / fp
    out["fp_off_above"] = above
    out["fp_near"] = near / fp
    out["fp_far"] = 1.0 - out["fp_off_slice"] - out["fp_near"]
    out["fp_largest"] = largest / fp
    return out


def fold_breakdown(workdir: Path, fold: int, near_mm: float) -> list[tuple[str, dict[str, Any]]]:
    """(case id, `error_breakdown` of its round-0 mask) for a fold's test cases."""
    from stnjax.eval import runs
    from stnjax.eval.spec import EvalSpec
    from stnjax.train import inputs

    spec = EvalSpec.from_config(json.loads((workdir / "config.json").read_text()))
    spec = spec.with_inference(max_rounds=1)  # round 0 is all this needs
    data = spec.train.data
    ds_dir = inputs.dataset_dir(data, workdir)
    store = inputs.open_store(data, ds_dir, workdir)
    _, test_ids = inputs.fold_split(data, ds_dir, store, fold)
    seg = runs.make_segmenter(spec, runs.load_models(spec.train, workdir, fold,
                                                     spec.inference.planes))
    rows = []
    for cid in test_ids:
        label = np.asarray(store.label(cid)) > 0
        res = seg.segment_image(np.asarray(store.image(cid)), label=label,
                                t=spec.threshold)
        row = error_breakdown(res.coarse_mask, label, tuple(store.spacing(cid)), near_mm)
        row.update({f"plane_{p}": d for p, d in res.plane_dsc.items()})
        rows.append((cid, row))
    return rows


def main(argv):
    del argv
    workdir = Path(FLAGS.workdir)
    rows = []
    for fold in (int(f) for f in FLAGS.folds.split(",")):
        rows += fold_breakdown(workdir, fold, FLAGS.near_mm)
    keys = list(FIELDS) + sorted(k for k in rows[0][1] if k.startswith("plane_"))
    print("case          " + " ".join(f"{k:>12}" for k in keys))
    for cid, r in rows:
        print(f"{cid:<14}" + " ".join(f"{r[k]:>12.3f}" for k in keys))
    mean = {k: np.nanmean([r[k] for _, r in rows]) for k in keys}
    print(f"{'mean':<14}" + " ".join(f"{mean[k]:>12.3f}" for k in keys))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
