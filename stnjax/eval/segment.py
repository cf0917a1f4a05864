"""Segmentation of unlabelled volumes (`launch.segment`): masks, probabilities, segment.json.

Every input is checked from its headers (readable, a 3D volume, thick
enough for 3-slice windows, a mask name of its own, no existing output
unless `overwrite`) before anything is written; the voxels are decoded
later, a few inputs ahead of the devices, so that a cohort of thousands
never sits in memory at once (voxel data damaged past a valid header is
found when its turn comes, and the inputs finished by then are kept).
Per input, `<out>/<name>_mask.nii.gz` (and with `probabilities`
`<name>_prob.nii.gz`, the fused probability map of the round the mask
comes from, float32) are written on the input's own grid, so they overlay
it, and `<out>/segment.json` is rewritten after every input (what
each input gave: paths, shape, spacing, organ volume in mL, mean HU inside
the mask, rounds, seconds with the compiling or loading of programs apart,
the device and process that ran it, warnings), so an interrupted call keeps
the record of the finished ones. With `preview`, `<out>/<name>_preview.png`
too: three slices through the mask over the image ("empty mask" written on
it when there is none). Inputs run one per device at a time
(`stnjax.infer.cohort`), and over several processes with `--multihost`
(`stnjax.eval.hosts`: each process segments its share and writes its
outputs; process 0 writes segment.json).

Warnings (logged and in segment.json): an empty mask, and a voxel spacing
the models did not see in training: an axis more than 1.5 times coarser or
finer than the training cases' range (with `data.spacing` the models see
the target grid; the warning then compares the input's own spacing with
that target, since an input much coarser than it is upsampled). Spacings
are compared per canonical PLS axis whatever `data.orientation` is (files
stored in different orders have different model axes); `shape` and
`spacing_mm` in segment.json are those of the model layout.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stnjax import fileio
from stnjax.checks import InputError
from stnjax.data import resample, volume_io
from stnjax.data.preprocess import PLANE_AXIS, window_hu
from stnjax.eval import plots
from stnjax.eval.hosts import Hosts, part_file, part_files
from stnjax.eval.progress import case_progress
from stnjax.fileio import atomic_write_text
from stnjax.infer import cohort

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


def _canonical_native_spacing(record: dict) -> Sequence[float] | None:
    """A case-cache record's native spacing per canonical PLS axis (records
    of another orientation hold it per axis of their model layout)."""
    if record.get("orientation", "canonical") != "canonical" and "source_affine" in record:
        return volume_io.Geometry.from_affine(np.asarray(record["source_affine"], np.float64),
                                              record["source_shape"], "").spacing
    return record.get("native_spacing", record.get("spacing"))


def training_spacing_range(store_records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """(min, max) (3,) mm per canonical axis over case-cache records (their
    native spacing), or None without records."""
    sp = [_canonical_native_spacing(r) for r in store_records]
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


def check_inputs(inputs_: Sequence[tuple[Path, Any]], planes: Sequence[str],
                 target: Sequence[float] | None) -> list[tuple[int, int, int]]:
    """The model grid of each input, given as (path, its `volume_io.Geometry`,
    read from the headers): its own grid, or on `target` mm; InputError
    naming an input with a single slice along one of `planes` there."""
    grids = []
    for path, geom in inputs_:
        grid = (tuple(geom.shape) if target is None else
                resample.grid_shape(geom.shape, geom.spacing, target))
        thin = [p for p in planes if grid[PLANE_AXIS[p]] < 2]
        if thin:
            on = "" if target is None else f" (resampled to {list(target)} mm: {grid})"
            raise InputError(f"image {path}: shape {tuple(geom.shape)}{on} has a single slice "
                             f"along plane(s) {thin}; the 3-slice windows need at least 2")
        grids.append(grid)
    return grids


def write_summary(out: Path, entries: Sequence[dict], settings: dict) -> Path:
    """`<out>/segment.json`, atomically: the settings and one entry per input."""
    path = out / "segment.json"
    atomic_write_text(path, json.dumps({"settings": settings, "inputs": list(entries)},
                                       indent=1) + "\n")
    return path


def model_image(vol: Any, grid: tuple[int, int, int], target) -> np.ndarray:
    """The HU volume the models run on: its own grid, or resampled to `grid`
    (the target spacing's)."""
    return vol.data if target is None else resample.resample_linear(vol.data, grid)


def on_input_grid(res: Any, vol: Any, target) -> tuple[np.ndarray, np.ndarray]:
    """(mask bool, probability float32) of a CaseResult on the input's own grid."""
    shape = vol.data.shape
    mask = res.mask if target is None else resample.to_grid(res.mask, shape)
    prob = np.asarray(res.score, np.float32)
    if target is not None:
        prob = np.clip(resample.resample_linear(prob, shape), 0.0, 1.0)
    return mask, prob


def run_all(segs: Sequence[Any], inputs_: Sequence[Path], grids, outs, *, out: Path, target,
            t: float, reference, reference_what: str, settings: dict, orientation: str,
            hosts: Hosts | None = None, preview: bool = False, prefetch: int = 0
            ) -> list[Path]:
    """Segments every checked input (`inputs_`, with their model `grids`
    from `check_inputs`, read in the `orientation` layout), one per device
    of `segs` at a time (`stnjax.infer.cohort`; with several `hosts` each process its share).
    Inputs are decoded while the devices work, at most `prefetch` (0: one
    per device) ahead of them, so a cohort of any size holds only a few
    volumes in memory. Writes each input's outputs (with `preview` a picture
    of three slices through the mask, `preview_name`) and segment.json
    after each (process 0; the others their part files, merged at the end);
    returns the mask, probability and picture paths this process wrote. A
    failure raises after the finished inputs are recorded."""
    hosts = hosts or Hosts()
    job = _SegmentJob(inputs_, grids, outs, out, target, t, reference, reference_what,
                      settings, hosts, preview, orientation)
    if hosts.primary:  # nothing of an earlier failed run; the others wait in `agree`
        for p in part_files(out, "segment"):
            p.unlink()
        # Outputs go straight into `out`, which may hold other files: only its own level.
        for f in fileio.remove_stale_temps(out, recursive=False):
            log.info("removed %s, a temporary file an interrupted run left", f)
    hosts.agree("segment", [str(p) for p in inputs_], settings)
    keys = hosts.share([str(i) for i in range(len(inputs_))])
    job.progress = case_progress("segment", len(keys), segs)
    run = cohort.run_cases(keys, segs, load=job.load, infer=job.infer, finish=job.finish,
                           prefetch=prefetch, stop=hosts.stopped)
    log.info("%s", segs[0].compile_summary())
    failure = run.failed and (f"input {inputs_[int(run.failed[0])]}", *run.failed[1:])
    outcome = hosts.outcome(failure)

    def read(part: Path) -> None:
        job.entries.update({int(k): v for k, v in json.loads(part.read_text()).items()})
    hosts.merge_parts(out, "segment", read, lambda: write_summary(out, job.ordered(), settings))
    if run.failed is not None and hosts.count == 1:
        raise run.failed[2]
    kept = f"kept the outputs of {len(job.entries)} finished inputs in {out} (segment.json)"
    if outcome.error is not None:
        raise InputError(f"{outcome.error}; {kept}")
    outcome.raise_for_others(hosts.name(), kept)
    return job.written()


class _SegmentJob:
    """The inputs of one `run_all` on this process: load (decoding and
    resampling, host), infer (a device thread), finish (files, segment.json).
    A decoded volume lives from its `load` to the end of its `finish`."""

    def __init__(self, inputs_, grids, outs, out, target, t, reference, reference_what,
                 settings, hosts, preview, orientation):
        self.inputs, self.grids, self.outs, self.out = inputs_, grids, outs, out
        self.preview, self.progress = preview, None
        self.orientation = orientation  # the models' voxel order (data.orientation)
        self.target, self.t, self.settings, self.hosts = target, t, settings, hosts
        self.reference, self.reference_what = reference, reference_what
        self.entries: dict[int, dict] = {}
        self.files: dict[int, list[Path]] = {}

    def load(self, key: str) -> tuple[int, Any, np.ndarray]:
        """(index, decoded volume, the image the models run on)."""
        i = int(key)
        vol = volume_io.load_image(self.inputs[i], orientation=self.orientation)
        grid = (tuple(vol.data.shape) if self.target is None else
                resample.grid_shape(vol.data.shape, vol.geometry.spacing, self.target))
        if grid != tuple(self.grids[i]):  # changed since its header was checked
            raise InputError(f"image {self.inputs[i]}: its voxels give the model grid {grid}, "
                             f"its header gave {tuple(self.grids[i])}; was it replaced "
                             "during the run?")
        return i, vol, model_image(vol, self.grids[i], self.target)

    def infer(self, seg: Any, loaded) -> Any:
        name = str(self.inputs[loaded[0]])
        self.progress.start(name)
        self.progress.hook(seg, name)
        return seg.segment(loaded[2], t=self.t, run_all_rounds=False)

    def finish(self, key: str, loaded, res: Any, device: str) -> None:
        i, vol, _ = loaded
        path, (mask_path, prob_path) = self.inputs[i], self.outs[i]
        mask, prob = on_input_grid(res, vol, self.target)
        volume_io.save_mask(mask, vol.geometry, mask_path)
        self.files[i] = [mask_path]
        if prob_path is not None:
            volume_io.save_volume(prob, vol.geometry, prob_path)
            self.files[i].append(prob_path)
        spacing = [float(s) for s in vol.geometry.spacing]
        warnings = [w for w in (
            "empty mask: no organ found" if not mask.any() else None,
            spacing_warning(vol.geometry.canonical.spacing, self.reference,
                            self.reference_what)) if w]
        for w in warnings:
            log.warning("%s: %s", path, w)
        seconds, compiling = self.progress.done(str(path))  # compilation apart
        stats = case_summary(mask, vol.data, spacing)
        if self.preview:
            picture = preview_name(mask_path)
            _preview(vol, mask, stats, picture, path, warnings)
            self.files[i].append(picture)
        self.entries[i] = {
            "input": str(path), "mask": str(mask_path),
            "probabilities": None if prob_path is None else str(prob_path),
            "shape": list(vol.data.shape), "spacing_mm": spacing,
            "model_grid": list(self.grids[i]), **stats,
            "rounds": int(res.rounds), "seconds": round(seconds, 3),
            "seconds_compiling": round(compiling, 3),
            "seconds_coarse": round(float(res.time_coarse_s), 3),
            "device": device, "process": self.hosts.index, "warnings": warnings}
        self._write_entries()
        e = self.entries[i]
        log.info("%d/%d %s on %s: %d voxels (%.1f mL), %d rounds, %.1f s (coarse %.1f s; "
                 "compiling %.1f s apart)", len(self.entries), len(self.inputs), path, device,
                 e["voxels"], e["volume_ml"], res.rounds, seconds, res.time_coarse_s, compiling)

    def _write_entries(self) -> None:
        """segment.json (process 0) or this process's part file, after every input."""
        if self.hosts.primary:
            write_summary(self.out, self.ordered(), self.settings)
        else:
            atomic_write_text(part_file(self.out, "segment", self.hosts.index),
                              json.dumps({str(k): v for k, v in self.entries.items()}))

    def ordered(self) -> list[dict]:
        return [self.entries[k] for k in sorted(self.entries)]

    def written(self) -> list[Path]:
        """The files this process wrote, in input order."""
        return [f for k in sorted(self.files) for f in self.files[k]]


def _preview(vol: Any, mask: np.ndarray, stats: dict, picture: Path, path: Path,
             warnings: Sequence[str]) -> Path:
    """The input (HU window) with the mask's outline, three slices through
    it, drawn in canonical PLS whatever the model layout; `stats`: its
    `case_summary`."""
    title = f"{path.name}: {stats['voxels']} voxels, {stats['volume_ml']:.1f} mL"
    if warnings:
        title += "\nwarning: " + "; ".join(warnings)
    geo = vol.geometry
    return plots.plot_overlay(window_hu(geo.to_canonical(vol.data)),
                              {"prediction": geo.to_canonical(mask)}, geo.canonical.spacing,
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


__all__ = ["output_names", "preview_name", "model_image", "on_input_grid", "run_all",
           "check_inputs", "reference_spacing",
           "spacing_warning", "case_summary", "training_spacing_range", "cached_case_records",
           "write_summary", "SPACING_FACTOR"]
