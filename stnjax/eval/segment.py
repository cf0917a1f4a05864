"""Segmentation of unlabelled volumes (`launch.segment`): masks, probabilities, segment.json.

Every input is checked (readable, a 3D volume, thick enough for 3-slice
windows, a mask name of its own, no existing output unless `overwrite`)
before anything is written. Per input, `<out>/<name>_mask.nii.gz` (and with
`probabilities` `<name>_prob.nii.gz`, the fused probability map of the round
the mask comes from, float32) are written on the input's own grid, so they
overlay it, and `<out>/segment.json` is rewritten after every input (what
each input gave: paths, shape, spacing, organ volume in mL, mean HU inside
the mask, rounds, seconds with the compiling or loading of programs apart,
warnings), so an interrupted call keeps the record of the finished ones.
With `preview`, `<out>/<name>_preview.png` too: three slices through the
mask over the image ("empty mask" written on it when there is none).

Warnings (logged and in segment.json): an empty mask, and a voxel spacing
the models did not see in training: an axis more than 1.5 times coarser or
finer than the training cases' range (with `data.spacing` the models see
the target grid; the warning then compares the input's own spacing with
that target, since an input much coarser than it is upsampled).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stnjax.checks import InputError
from stnjax.data import resample, volume_io
from stnjax.data.preprocess import PLANE_AXIS, window_hu
from stnjax.eval import plots
from stnjax.eval.progress import case_progress
from stnjax.fileio import atomic_write_text

log = logging.getLogger("stnjax.eval")

#: An axis this many times outside the training spacing range is warned about.
SPACING_FACTOR = 1.5


def preview_name(mask_path: Path) -> Path:
    """The preview picture beside a mask: `<out>/<name>_preview.png`."""
    return mask_path.with_name(mask_path.name.removesuffix("_mask.nii.gz") + "_preview.png")


def output_names(inputs_: Sequence[str], out: Path, *, overwrite: bool = False,
                 probabilities: bool = False, preview: bool = False
                 ) -> list[tuple[Path, Path | None]]:
    """(mask, probability map or None) files of each input: `<out>/<name>_mask
    .nii.gz` and `<out>/<name>_prob.nii.gz` (name: the file without .nii /
    .nii.gz, or the DICOM folder's name; with `preview` the `preview_name`
    picture is checked too). InputError, before anything runs,
    when two inputs would write the same file or an output exists and
    `overwrite` is False."""
    outs, seen = [], {}
    for p in inputs_:
        name = Path(p).name.removesuffix(".gz").removesuffix(".nii") or "volume"
        pair = (out / f"{name}_mask.nii.gz",
                out / f"{name}_prob.nii.gz" if probabilities else None)
        pictures = (preview_name(pair[0]),) if preview else ()
        for dest in (d for d in pair + pictures if d is not None):
            if dest in seen:
                raise InputError(f"inputs: {seen[dest]} and {p} would both write {dest}; "
                                 "segment them into separate --out folders (or rename one)")
            if dest.exists() and not overwrite:
                raise InputError(f"output {dest} exists (for input {p}); pass --overwrite to "
                                 "replace it, or choose another --out")
            seen[dest] = p
        outs.append(pair)
    return outs


def training_spacing_range(store_records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """(min, max) (3,) mm per canonical axis over case-cache records (their
    native spacing), or None without records."""
    sp = [r.get("native_spacing", r.get("spacing")) for r in store_records]
    sp = np.asarray([s for s in sp if s is not None], np.float64)
    if sp.size == 0:
        return None
    return sp.min(axis=0), sp.max(axis=0)


def cached_case_records(cache_dir: Path) -> list[dict]:
    """The case-cache records (`CaseStore` JSON files) already in `cache_dir`;
    reading them loads no volume."""
    recs = []
    for p in sorted(Path(cache_dir).glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and "case_id" in r and "spacing" in r:
            recs.append(r)
    return recs


def spacing_warning(spacing: Sequence[float], reference: tuple[np.ndarray, np.ndarray] | None,
                    what: str) -> str | None:
    """A warning when an axis of `spacing` lies more than SPACING_FACTOR
    outside [min, max] of `reference` (None: nothing to compare with)."""
    if reference is None:
        return None
    sp = np.asarray(spacing, np.float64)
    lo, hi = reference
    off = [k for k in range(3) if sp[k] > hi[k] * SPACING_FACTOR or sp[k] < lo[k] / SPACING_FACTOR]
    if not off:
        return None
    rng = ", ".join(f"{a:.2f}-{b:.2f}" for a, b in zip(lo, hi))
    return (f"voxel spacing {[round(float(v), 3) for v in sp]} mm is far from {what} "
            f"({rng} mm per axis) along axis {off}: the result may be poor")


def case_summary(mask: np.ndarray, hu: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Organ statistics of a mask on its volume's grid: voxels, volume (mL)
    and mean HU inside (None when empty)."""
    n = int(np.count_nonzero(mask))
    ml = n * float(np.prod(np.asarray(spacing, np.float64))) / 1000.0
    mean_hu = float(np.asarray(hu, np.float64)[mask].mean()) if n else None
    return {"voxels": n, "volume_ml": round(ml, 4),
            "mean_hu": None if mean_hu is None else round(mean_hu, 2)}


def check_inputs(volumes: Sequence[tuple[Path, Any]], planes: Sequence[str],
                 target: Sequence[float] | None) -> list[tuple[int, int, int]]:
    """The model grid of each volume (its own, or on `target` mm); InputError
    naming a volume with a single slice along one of `planes` there."""
    grids = []
    for path, vol in volumes:
        grid = (tuple(vol.data.shape) if target is None else
                resample.grid_shape(vol.data.shape, vol.geometry.spacing, target))
        thin = [p for p in planes if grid[PLANE_AXIS[p]] < 2]
        if thin:
            on = "" if target is None else f" (resampled to {list(target)} mm: {grid})"
            raise InputError(f"image {path}: shape {vol.data.shape}{on} has a single slice "
                             f"along plane(s) {thin}; the 3-slice windows need at least 2")
        grids.append(grid)
    return grids


def write_summary(out: Path, entries: Sequence[dict], settings: dict) -> Path:
    """`<out>/segment.json`, atomically: the settings and one entry per input."""
    path = out / "segment.json"
    atomic_write_text(path, json.dumps({"settings": settings, "inputs": list(entries)},
                                       indent=1) + "\n")
    return path


def segment_one(seg: Any, vol: Any, grid: tuple[int, int, int], target, t: float
                ) -> tuple[np.ndarray, np.ndarray, Any]:
    """(mask bool, probability float32, CaseResult) of one volume on its own
    grid: the models run on `grid` (the target spacing's when `target`)."""
    image = vol.data if target is None else resample.resample_linear(vol.data, grid)
    res = seg.segment(image, t=t, run_all_rounds=False)
    shape = vol.data.shape
    mask = res.mask if target is None else resample.to_grid(res.mask, shape)
    prob = np.asarray(res.score, np.float32)
    if target is not None:
        prob = np.clip(resample.resample_linear(prob, shape), 0.0, 1.0)
    return mask, prob, res


def run_all(seg: Any, volumes, grids, outs, *, out: Path, target, t: float,
            reference, reference_what: str, settings: dict, preview: bool = False
            ) -> list[Path]:
    """Segments every checked volume, writes its outputs (with `preview` a
    picture of three slices through the mask, `preview_name`) and
    segment.json after each; returns the written mask, probability and
    picture paths."""
    written, entries = [], []
    progress = case_progress("segment", len(volumes), seg)
    for i, ((path, vol), grid, (mask_path, prob_path)) in enumerate(zip(volumes, grids, outs)):
        progress.start(path.name)
        mask, prob, res = segment_one(seg, vol, grid, target, t)
        volume_io.save_mask(mask, vol.geometry, mask_path)
        written.append(mask_path)
        if prob_path is not None:
            volume_io.save_volume(prob, vol.geometry, prob_path)
            written.append(prob_path)
        spacing = [float(s) for s in vol.geometry.spacing]
        warnings = [w for w in (
            "empty mask: no organ found" if not mask.any() else None,
            spacing_warning(spacing, reference, reference_what)) if w]
        for w in warnings:
            log.warning("%s: %s", path, w)
        seconds, compiling = progress.elapsed()  # compilation apart
        stats = case_summary(mask, vol.data, spacing)
        if preview:
            written.append(_preview(vol, mask, stats, preview_name(mask_path), path, warnings))
        entries.append({"input": str(path), "mask": str(mask_path),
                        "probabilities": None if prob_path is None else str(prob_path),
                        "shape": list(vol.data.shape), "spacing_mm": spacing,
                        "model_grid": list(grid), **stats,
                        "rounds": int(res.rounds), "seconds": round(seconds, 3),
                        "seconds_compiling": round(compiling, 3),
                        "seconds_coarse": round(float(res.time_coarse_s), 3),
                        "warnings": warnings})
        write_summary(out, entries, settings)
        progress.done()
        log.info("%d/%d %s: %d voxels (%.1f mL), %d rounds, %.1f s (coarse %.1f s; "
                 "compiling %.1f s apart)", i + 1, len(volumes), path, entries[-1]["voxels"],
                 entries[-1]["volume_ml"], res.rounds, seconds, res.time_coarse_s, compiling)
    log.info("%s", seg.compile_summary())
    return written


def _preview(vol: Any, mask: np.ndarray, stats: dict, picture: Path, path: Path,
             warnings: Sequence[str]) -> Path:
    """The input (HU window) with the mask's outline, three slices through
    it; `stats`: its `case_summary`."""
    title = f"{path.name}: {stats['voxels']} voxels, {stats['volume_ml']:.1f} mL"
    if warnings:
        title += "\nwarning: " + "; ".join(warnings)
    return plots.plot_overlay(window_hu(vol.data), {"prediction": mask}, vol.geometry.spacing,
                              picture, title=title)


def reference_spacing(train_data: Any, workdir: str | os.PathLike
                      ) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """What an input's spacing is compared with: the target of data.spacing,
    else the range over the training run's cached cases (None if none)."""
    if train_data.spacing is not None:
        sp = np.asarray(train_data.spacing, np.float64)
        return (sp, sp), "the training grid"
    cache = Path(train_data.cache_dir) if train_data.cache_dir else Path(workdir) / "cache"
    return training_spacing_range(cached_case_records(cache)), "the training cases' spacing"


__all__ = ["output_names", "preview_name", "segment_one",
           "run_all", "check_inputs", "reference_spacing",
           "spacing_warning", "case_summary", "training_spacing_range", "cached_case_records",
           "write_summary", "SPACING_FACTOR"]
