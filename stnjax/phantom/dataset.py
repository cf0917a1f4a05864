"""Phantom dataset folders: writing them, and per-case summaries.

`write_phantom_dataset` renders cases with `stnjax.phantom` and writes a
dataset folder that `stnjax.data.manifest` reads: images/<id>.nii.gz (int16 HU),
labels/<id>.nii.gz (uint8 `phantom.LABELS` ids), dataset.json (organ_id 7,
the generator settings, per-case seeds) and folds.json. The folder is built
next to its destination and renamed into place, so it is complete or
absent. `summarize_dataset` / `format_summary` report per-case statistics
(organ size, largest slice fraction, mean HU per tissue group).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from stnjax.data import manifest
from stnjax import fileio
from stnjax.data import volume_io
from stnjax.checks import InputError
from stnjax.phantom.volumes import LABELS, PANCREAS_ID, PhantomConfig, render_phantom

PHANTOM_VERSION = 1  # bump when the anatomy changes: a dataset records it


def canonical_affine(shape: tuple[int, int, int], spacing: Any) -> np.ndarray:
    """(4, 4) affine of a canonical PLS grid centred on the world origin:
    axis 0 -> posterior (-y RAS), axis 1 -> left (-x), axis 2 -> superior (+z)."""
    s = np.asarray(spacing, np.float64)
    aff = np.zeros((4, 4))
    aff[1, 0], aff[0, 1], aff[2, 2], aff[3, 3] = -s[0], -s[1], s[2], 1.0
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def case_seed(seed: int, index: int) -> int:
    """The seed of case `index` of a dataset with `seed` (independent of the
    number of cases, so a larger dataset extends a smaller one)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_phantom_dataset(out_dir: str | os.PathLike, *, num_cases: int = 8, seed: int = 0,
                          config: PhantomConfig = PhantomConfig(), n_folds: int = 4,
                          overwrite: bool = False) -> Path:
    """Writes a phantom dataset folder and returns its path.

    Layout: images/<id>.nii.gz (int16 HU), labels/<id>.nii.gz (uint8 `LABELS`
    ids), dataset.json (organ_id 7, the generator settings, per-case seeds)
    and folds.json (`data.folds_by_position`). The folder is built next to
    `out_dir` and renamed into place, so it is complete or absent.

    An existing folder holding the same dataset (same settings) is kept as
    is. A different dataset is an error unless overwrite=True; a non-empty
    folder that is not a dataset is never replaced.
    """
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise InputError(f"n_folds: expected an int >= 2, got {n_folds!r}")
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < n_folds:
        raise InputError(f"num_cases: expected an int >= n_folds ({n_folds}), got {num_cases!r}")
    out = Path(out_dir).resolve()
    spec = {"generator": "stnjax.phantom", "version": PHANTOM_VERSION, "seed": int(seed),
            "num_cases": num_cases, "n_folds": n_folds, "config": config.to_dict()}
    if out.exists() and any(out.iterdir()):
        manifest_file = out / manifest.MANIFEST_FILE
        if not manifest_file.is_file():
            raise FileExistsError(f"{out}: exists and is not a dataset folder (no "
                                  f"{manifest.MANIFEST_FILE}); refusing to replace it")
        try:
            same = (manifest.load_manifest(out).extra.get("generator") == spec
                    and (out / manifest.FOLDS_FILE).is_file())
        except InputError:
            same = False
        if same:
            return out
        if not overwrite:
            raise FileExistsError(f"{out}: holds a different dataset; pass overwrite=True to "
                                  "replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = fileio.make_temp_dir(out)  # normal permissions, unlike mkdtemp's 0o700
    try:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        cases = []
        for i in range(num_cases):
            cid, cseed = f"phantom_{i:03d}", case_seed(seed, i)
            ph = render_phantom(cseed, config)
            affine = canonical_affine(config.shape, ph.spacing)
            geom = volume_io.Geometry.from_affine(affine, config.shape, cid)
            volume_io.save_volume(ph.hu, geom, tmp / "images" / f"{cid}.nii.gz", dtype=np.int16)
            volume_io.save_volume(ph.labels, geom, tmp / "labels" / f"{cid}.nii.gz", dtype=np.uint8)
            cases.append({"id": cid, "image": f"images/{cid}.nii.gz",
                          "label": f"labels/{cid}.nii.gz", "seed": cseed})
        manifest.write_manifest(tmp, name=f"phantom-seed{seed}", organ_id=PANCREAS_ID, cases=cases,
                              description="Synthetic abdominal CT phantoms (stnjax.phantom); "
                                          "labels use TotalSegmentator v2 ids, pancreas = 7.",
                              extra={"generator": spec,
                                     "labels": {str(k): v for k, v in LABELS.items()}})
        manifest.write_fold_table(tmp, manifest.folds_by_position([c["id"] for c in cases], n_folds),
                                rule="position")
        if out.exists():  # swap: old aside, new in, old removed
            old = fileio.make_temp_dir(out)
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


#: Tissue groups reported by `summarize_dataset`: name -> label ids.
SUMMARY_GROUPS = {"pancreas": (7,), "liver": (5,), "spleen": (1,), "kidney": (2, 3),
                  "duodenum": (19,), "aorta": (52,), "portal_splenic_vein": (64,),
                  "muscle": (86, 87, 88, 89), "vertebrae": tuple(range(27, 36))}


def summarize_dataset(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-case statistics of a dataset with multi-class NIfTI labels.

    Returns one dict per case: id, shape, spacing, organ_voxels (manifest
    organ id), organ_slices and max_organ_fraction (largest fraction of an
    axial slice), and mean_hu_<group> for `SUMMARY_GROUPS` present.
    """
    man = manifest.load_manifest(dataset_dir)
    rows = []
    for case in man.cases:
        if case.label is None or case.image.is_dir():
            raise InputError(f"case {case.id}: summarize_dataset needs NIfTI image and label files")
        img, lab = nib.load(str(case.image)), nib.load(str(case.label))
        hu, labels = np.asarray(img.dataobj, np.float32), np.asarray(lab.dataobj)
        if hu.shape != labels.shape:
            raise InputError(f"case {case.id}: image {hu.shape} and label {labels.shape} differ")
        z = [i for i, code in enumerate(nib.aff2axcodes(img.affine)) if code in "SI"][0]
        organ = labels == man.organ_id
        per_slice = np.count_nonzero(organ, axis=tuple(a for a in range(3) if a != z))
        area = hu.size // hu.shape[z]
        row = {"id": case.id, "shape": list(hu.shape),
               "spacing": [round(float(s), 3) for s in img.header.get_zooms()[:3]],
               "organ_voxels": int(organ.sum()), "organ_slices": int(np.count_nonzero(per_slice)),
               "max_organ_fraction": float(per_slice.max() / area)}
        for name, ids in SUMMARY_GROUPS.items():
            m = np.isin(labels, ids)
            if m.any():
                row[f"mean_hu_{name}"] = round(float(hu[m].mean()), 1)
        rows.append(row)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of `summarize_dataset` rows."""
    groups = [g for g in SUMMARY_GROUPS if any(f"mean_hu_{g}" in r for r in rows)]
    head = ["id", "organ_vox", "slices", "max_frac%"] + [g[:9] for g in groups]
    lines = [" ".join(f"{h:>11}" for h in head)]
    for r in rows:
        cells = [r["id"], str(r["organ_voxels"]), str(r["organ_slices"]),
                 f"{100 * r['max_organ_fraction']:.3f}"]
        cells += [f"{r[f'mean_hu_{g}']:.1f}" if f"mean_hu_{g}" in r else "-" for g in groups]
        lines.append(" ".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)
