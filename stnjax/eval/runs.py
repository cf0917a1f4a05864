"""Evaluation and segmentation runs: trained models in, files out.

The glue between training runs (`<workdir>/fold<f>/<plane>/checkpoints`),
the pure inference (`stnjax.infer` via `stnjax.infer.segmenter.Segmenter`) and the
reporting (`stnjax.eval.records`, `stnjax.eval.summaries`, `stnjax.eval.plots`). Everything
that touches files for evaluation lives here or in those writers;
launch/evaluate.py and launch/segment.py only parse flags.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from stnjax import fileio, metrics
from stnjax.checks import InputError
from stnjax.data import volume_io
from stnjax.data.store import CaseStore
from stnjax.eval import plots, summaries
from stnjax.eval import segment as seg_lib
from stnjax.eval import report as text_report
from stnjax.eval.hosts import Hosts, part_file, part_files
from stnjax.eval.progress import case_progress
from stnjax.eval.records import (CASES_CSV, CASES_JSON, CaseRecord, read_records,
                                 records_json_text, threshold_key, write_records)
from stnjax.eval.spec import EvalSpec
from stnjax.fileio import atomic_write_text
from stnjax.infer import cohort
from stnjax.infer.segmenter import CaseResult, Segmenter
from stnjax.train import inputs, workdir as wd
from stnjax.train.checkpoint import load_trained_params
from stnjax.train.spec import TrainSpec
from stnjax.train.workdir import write_config_files

log = logging.getLogger("stnjax.eval")
SPLITS = ("test", "train")  # which cases of a fold evaluate_fold runs


def load_models(train: TrainSpec, workdir: str | os.PathLike, fold: int,
                planes: Sequence[str]) -> dict[str, Any]:
    """{plane: params} of the finished runs of a fold for `train.model`.

    Raises InputError when a run is missing or incomplete, was trained for
    another plane or fold, or with another config (hash of the fields that
    define the model and its training).
    """
    want = train.config_hash
    params = {}
    for p in planes:
        rd = wd.run_dir(workdir, fold, p)
        tree, meta = load_trained_params(rd)
        if meta.get("plane") != p or int(meta.get("fold", -1)) != int(fold):
            raise InputError(f"{rd}: holds a checkpoint of fold {meta.get('fold')} plane "
                             f"{meta.get('plane')!r}, expected fold {fold} plane {p!r}")
        if meta.get("config_hash") != want:
            raise InputError(f"{rd}: the checkpoint was trained with another config "
                             f"(hash {meta.get('config_hash')}, this config {want}); "
                             "evaluate with the config it was trained with")
        params[p] = tree
    return params


def make_segmenter(spec: EvalSpec, params: dict[str, Any]) -> Segmenter:
    """A Segmenter of the spec's models with its buckets, HU window and timing mode."""
    return Segmenter(spec.train.model, params, spec.inference,
                     volume_buckets=spec.volume_buckets, hu_window=spec.train.data.hu_window,
                     per_round_timing=spec.per_round_timing)


def check_writable(folder: str | os.PathLike) -> Path:
    """Creates `folder` if needed and checks that files can be written there,
    before any work is done; raises InputError naming it otherwise."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output folder {out} cannot be written: {e}") from None
    return out


def case_record(res: CaseResult, case_id: str, label: np.ndarray,
                spacing: Sequence[float], *, fold: int, method: str, t: float,
                native: tuple[np.ndarray, np.ndarray, Sequence[float]] | None = None
                ) -> CaseRecord:
    """The per-case record of one evaluated volume (label (X, Y, Z) bool,
    spacing (3,) mm: the grid the model ran on).

    native: for a resampled case (data.spacing), (mask, label, spacing) on
    the source grid: the full metrics at t are computed there and the
    record's spacing is the source's; the per-round DSC and diagnostics
    stay on the model grid, where the rounds' masks are.

    Rounds not run (an early stop) keep the last mask: their DSC repeats the
    last value and their inter-iteration DSC is 1. Full metrics (Jaccard,
    HD95, surface Dice) are computed for the mask reported at t.
    """
    n = len(res.inter) - 1
    dsc = [float(v) for v in res.dsc[:res.rounds + 1]]
    inter = [None] + [float(v) for v in res.inter[1:res.rounds + 1]]
    dsc += [dsc[-1]] * (n - res.rounds)
    inter += [1.0] * (n - res.rounds)
    spacing = tuple(float(s) for s in spacing)
    main, ref, sp = res.mask, label, spacing
    if native is not None:
        main, ref, sp = native[0], native[1], tuple(float(s) for s in native[2])
    full = {"dsc": metrics.dsc(main, ref), "jaccard": metrics.jaccard(main, ref),
            "hd95_mm": metrics.hd95(main, ref, sp),
            "surface_dice": metrics.surface_dice(main, ref, sp),
            "round": int(res.main_round)}
    return CaseRecord(
        case_id=case_id, fold=int(fold), method=method, gt_voxels=int(np.count_nonzero(ref)),
        spacing=sp, dsc_rounds=dsc, inter_dsc=inter, rounds_run=int(res.rounds),
        time_coarse_s=res.time_coarse_s, time_rounds_s=list(res.time_rounds_s),
        time_loop_s=res.time_loop_s,
        metrics_at={threshold_key(t): full}, oracle=res.oracles or None,
        extra={"plane_dsc": res.plane_dsc, "bucket": list(res.bucket),
               "overflow": res.overflow, "rounds": round_diagnostics(res, label, spacing)})


def round_diagnostics(res: CaseResult, label: np.ndarray, spacing: Sequence[float]
                      ) -> dict[str, Any]:
    """Per round 0..T: mask volume (mL), precision and recall against the
    label (None for an empty mask / label), and per plane the mean crop-box
    (height, width) in pixels the round cut (None at round 0 or without a
    box). Rounds not run repeat the last round's mask (their box: None)."""
    n = len(res.inter) - 1
    ran = int(res.rounds)
    vox = [int(v) for v in res.voxels[:ran + 1]] + [int(res.voxels[ran])] * (n - ran)
    hits = [int(v) for v in res.hits[:ran + 1]] + [int(res.hits[ran])] * (n - ran)
    ml = float(np.prod(spacing)) / 1000.0
    gt = int(np.count_nonzero(label))
    boxes = {p: [None if r > ran or not np.all(np.isfinite(res.boxes[r, i]))
                 else [round(float(v), 2) for v in res.boxes[r, i]] for r in range(n + 1)]
             for i, p in enumerate(res.planes)}
    return {"volume_ml": [round(v * ml, 4) for v in vox],
            "precision": [h / v if v else None for v, h in zip(vox, hits)],
            "recall": [h / gt if gt else None for h in hits],
            "box_hw": boxes}


def evaluate_fold(spec: EvalSpec, workdir: str | os.PathLike, fold: int, *,
                  out_dir: str | os.PathLike | None = None,
                  write_predictions: bool = True, resume: bool = True,
                  devices: int = 0, split: str = "test") -> list[CaseRecord]:
    """Evaluates the test cases of one fold (`split="train"`: its training
    cases, to measure how well the models fit what they were trained on);
    writes predictions and records.

    Cases are read through the training's case store (`inputs.open_store`:
    the same windowed volumes the models were trained on) and run one per
    local device at a time (`devices`: how many, 0 = all;
    `stnjax.infer.cohort`), over every process of `jax.distributed` when
    there are several (`stnjax.eval.hosts`: a deterministic share each, the
    records merged by process 0). Returns the per-case records in test-case
    order (on process 0 all of them; on the others the resumed ones and their
    own), also written to `<out>/cases.{json,csv}`, rewritten atomically
    after every case; predictions to `<out>/predictions/<case>.nii.gz` in the
    source geometry, by the process that ran the case, each with a picture of
    three slices through the organ, `<out>/overlays/<case>.png`. With `resume`, cases
    already recorded in `<out>` by an interrupted run with the same models
    and inference settings (its config.json) are taken from there, not run
    again; other settings mean a fresh evaluation.
    """
    if split not in SPLITS:
        raise InputError(f"split: expected one of {SPLITS}, got {split!r}")
    out = check_writable(out_dir or Path(workdir) / "eval" / f"fold{int(fold)}")
    data, inf = spec.train.data, spec.inference
    ds_dir = inputs.dataset_dir(data, workdir)
    store = inputs.open_store(data, ds_dir, workdir)
    train_ids, case_ids = inputs.fold_split(data, ds_dir, store, fold)
    if split == "train":  # the labelled ones: an unlabelled case has nothing to score
        case_ids = [c for c in train_ids if store.has_label(c)]
    segs = device_segmenters(make_segmenter(spec, load_models(spec.train, workdir, fold,
                                                              inf.planes)), devices)
    hosts = Hosts.current()
    done = _finished_cases(spec, out, case_ids, write_predictions) if resume else {}
    hosts.agree(f"fold {fold}", case_ids, {"done": sorted(done), "predictions": write_predictions,
                                           "settings": _result_fields(spec.record)})
    _start_records(hosts, out, spec.record, case_ids, done)
    preds = check_writable(out / "predictions") if write_predictions else None
    log.info("fold %d: %d %s cases on %d device(s) x %d process(es); inference: planes %s, "
             "margin %d, up to %d rounds, saliency input %r, fusion %r, t = %.2f", fold,
             len(case_ids), "training" if split == "train" else "test", len(segs), hosts.count,
             "".join(inf.planes), spec.train.model.margin,
             inf.max_rounds, inf.saliency_input, inf.fusion, spec.threshold)
    if done:
        log.info("fold %d: resuming, %d of %d cases already evaluated in %s", fold,
                 len(done), len(case_ids), out)
    job = _FoldJob(spec, store, fold, case_ids, out, preds, hosts, done)
    todo = hosts.share([c for c in case_ids if c not in done])
    job.progress = case_progress(f"fold {fold}", len(todo), segs)
    run = cohort.run_cases(todo, segs, load=job.load, infer=job.infer, finish=job.finish,
                           stop=hosts.stopped)
    records = _end_records(job, run)
    log.info("fold %d: %s %s; %d cases in %.1f s, idle per device %s", fold,
             segs[0].compile_summary(), segs[0].compiled_buckets(), len(run.finished),
             run.wall_s, {d: round(f, 2) for d, f in run.idle_fraction().items()})
    return records


def device_segmenters(seg: Segmenter, devices: int = 0) -> list[Segmenter]:
    """`seg` on each of the first `devices` local devices (0: all), sharing
    its compilations; InputError naming `devices` when there are fewer."""
    import jax
    local = jax.local_devices()
    if isinstance(devices, bool) or not 0 <= int(devices) <= len(local):
        raise InputError(f"devices: expected 0 (all) to {len(local)} local devices, "
                         f"got {devices!r}")
    return [seg.on_device(d) for d in local[:int(devices) or len(local)]]


def _start_records(hosts: Hosts, out: Path, record: Mapping[str, Any],
                   test_ids: Sequence[str], done: Mapping[str, CaseRecord]) -> None:
    """Process 0, before any case runs: no temporary file of a killed run,
    the config, the resumed records alone
    in cases.json (none: no cases file, so that no record of other settings
    stays beside this config), no part file of an earlier run; the other
    processes wait for it (their part files start empty)."""
    if hosts.primary:
        for f in fileio.remove_stale_temps(out):  # a killed run's half-written files
            log.info("removed %s, a temporary file an interrupted run left", f)
        write_config_files(out, record)
        if done:
            write_records([done[c] for c in test_ids if c in done], out)
        else:
            for name in (CASES_JSON, CASES_CSV):
                (out / name).unlink(missing_ok=True)
        for p in part_files(out, "cases"):
            p.unlink()
    hosts.sync(f"{out}: the start")  # nothing above is read after this


class _FoldJob:
    """One fold's cases on this process: load (host), infer (a device
    thread), finish (record, prediction, records file after every case)."""

    def __init__(self, spec, store, fold, test_ids, out, preds, hosts, done):
        self.spec, self.store, self.fold, self.test_ids = spec, store, fold, test_ids
        self.out, self.preds, self.hosts, self.done = out, preds, hosts, done
        self.new: dict[str, CaseRecord] = {}
        self.progress = None  # a CaseProgress, set before the cases run

    def load(self, cid: str):
        if not self.store.has_label(cid):
            raise InputError(f"case {cid!r}: has no label in {self.store.manifest.path}; "
                             "evaluation needs one (use launch.segment for unlabelled volumes)")
        return np.asarray(self.store.image(cid)), np.asarray(self.store.label(cid)), cid

    def infer(self, seg: Segmenter, loaded) -> CaseResult:
        image, label, cid = loaded
        self.progress.start(cid)
        self.progress.hook(seg, cid)
        s = self.spec
        return seg.segment_image(image, label=label, t=s.threshold,
                                 run_all_rounds=s.run_all_rounds, oracles=s.oracles)

    def finish(self, cid: str, loaded, res: CaseResult, device: str) -> None:
        rec = _case_outputs(self.spec, self.store, cid, loaded[1], res, self.fold, self.preds)
        self.progress.done(cid)
        rec = dataclasses.replace(rec, device=device, process=self.hosts.index)
        self.new[cid] = rec
        # After every case: an interrupted run resumes here.
        if self.hosts.primary:
            write_records(self.records(), self.out)
        else:
            atomic_write_text(part_file(self.out, "cases", self.hosts.index),
                              records_json_text(list(self.new.values())))
        t = threshold_key(self.spec.threshold)
        log.info("fold %d case %d/%d %s on %s: DSC round 0 %.2f %%, at t=%s %.2f %% "
                 "(round %d), %.1f s", self.fold, len(self.done) + len(self.new),
                 len(self.test_ids), cid, device, 100 * rec.dsc_rounds[0], t,
                 100 * rec.metrics_at[t]["dsc"], rec.metrics_at[t]["round"], rec.time_total_s)

    def records(self) -> list[CaseRecord]:
        """The resumed and new records known here, in test-case order."""
        known = {**self.done, **self.new}
        return [known[c] for c in self.test_ids if c in known]


def _end_records(job: _FoldJob, run: cohort.CohortRun) -> list[CaseRecord]:
    """Every process's outcome; process 0 merges the part files into
    cases.json; a failure or a lost process anywhere raises on every
    (remaining) process, after the merge, naming the case and host and what
    was kept."""
    hosts, out = job.hosts, job.out
    failure = run.failed and (f"case {run.failed[0]!r}", *run.failed[1:])
    outcome = hosts.outcome(failure)

    def read(part: Path) -> None:
        job.new.update({r.case_id: r for r in read_records(part) if r.case_id in job.test_ids})

    def write() -> None:
        if job.records():
            write_records(job.records(), out)
    hosts.merge_parts(out, "cases", read, write)
    records = job.records()
    kept = (f"kept the records (and predictions) of {len(records)} finished cases in {out}, "
            "from which a rerun resumes" if hosts.primary else
            f"kept the records (and predictions) of the finished cases in {out} (process 0 "
            "merges them), from which a rerun resumes")
    if run.failed is not None:
        cid, stage, e = run.failed
        if isinstance(e, OSError):
            raise _with_note(e, f"case {cid!r} failed on {hosts.name()} ({stage}); {kept}") from e
        if isinstance(e, InputError) or hosts.count > 1:
            raise InputError(f"{outcome.error}; {kept}") from e
        raise e
    outcome.raise_for_others(hosts.name(), kept)
    return records


def _case_outputs(spec: EvalSpec, store: CaseStore, cid: str, label: np.ndarray,
                  res: CaseResult, fold: int, preds: Path | None) -> CaseRecord:
    """The record of one segmented stored case (its prediction into `preds`
    when given)."""
    mask, native = res.mask, None
    if store.resampled(cid):
        # data.spacing: the reported mask is scored against the label on
        # the source grid and written there.
        mask = store.to_native(cid, res.mask)
        native = (mask, np.asarray(store.native_label(cid)), store.native_spacing(cid))
    rec = case_record(res, cid, label, store.spacing(cid), fold=fold, method=spec.method,
                      t=spec.threshold, native=native)
    if preds is not None:
        geo = store.geometry(cid)
        volume_io.save_mask(mask, geo, preds / f"{cid}.nii.gz")
        # The picture beside the predictions: <out>/overlays/<case>.png (model
        # grid, drawn in canonical PLS whatever data.orientation is).
        view = geo.to_canonical
        plots.plot_case_overlay(rec, view(store.image(cid)), view(label), view(res.mask),
                                geo.spacing_to_canonical(store.spacing(cid)),
                                preds.parent / "overlays" / f"{cid}.png", t=spec.threshold)
    return rec


def _result_fields(config_dict: dict) -> dict[str, Any]:
    """The fields that decide an evaluation's results: the models' identity
    and every inference setting (from a config as a JSON dict)."""
    infer_fields = {f"infer.{k}": list(v) if isinstance(v, (list, tuple)) else v
                    for k, v in config_dict.get("infer", {}).items()}
    return {**wd.identity_fields(config_dict), **infer_fields,
            "data.planes": config_dict.get("data", {}).get("planes")}


def _finished_cases(spec: EvalSpec, out: Path, test_ids: Sequence[str],
                    write_predictions: bool) -> dict[str, CaseRecord]:
    """{case id: record} of the cases an earlier run in `out` finished with
    the same models and inference settings (cases.json and the part files of
    other processes, `stnjax.eval.hosts`; and whose prediction file exists,
    when predictions are written); {} otherwise."""
    cfg_file = out / "config.json"
    files = [f for f in (out / CASES_JSON,) if f.is_file()] + part_files(out, "cases")
    if not (cfg_file.is_file() and files):
        return {}
    try:
        old = json.loads(cfg_file.read_text())
        recs = [r for f in files for r in read_records(f)]
    except (OSError, ValueError, InputError) as e:
        log.warning("%s: earlier records unreadable (%s); evaluating every case", out, e)
        return {}
    if _result_fields(old) != _result_fields(spec.record):
        log.info("%s: earlier records were made with other settings; evaluating every case",
                 out)
        return {}
    method = spec.method
    return {r.case_id: r for r in recs
            if r.case_id in test_ids and r.method == method
            and (not write_predictions or (out / "predictions" / f"{r.case_id}.nii.gz").is_file())}


def report(records: Sequence[CaseRecord], out_dir: str | os.PathLike, *,
           thresholds: Sequence[float], main_threshold: float,
           record: Mapping[str, Any] | None = None) -> str:
    """Writes summary.{json,txt}, sweep.csv and the PNG plots (and, given
    the resolved config `record`, config.json, config.txt and
    versions.json); returns the printed summary text."""
    out = check_writable(out_dir)
    summary = summaries.summarize(records, thresholds=tuple(thresholds),
                                 main_threshold=main_threshold)
    sweep_ts = sorted(set(np.round(np.arange(0.80, 1.0, 0.01), 2).tolist())
                      | set(float(t) for t in thresholds) | {0.995})
    rows = summaries.sweep(records, sweep_ts)
    try:
        # All files or none: a full disk fails inside the stage.
        with fileio.staged_files(out) as stage:
            if record is not None:
                write_config_files(stage, record)
            text_report.write_summary(summary, stage)
            summaries.write_sweep_csv(rows, stage / "sweep.csv")
            plots.write_plots(records, rows, stage, main_threshold)
    except OSError as e:
        raise _with_note(e, f"no summary file in {out} was written or changed") from e
    return text_report.format_summary(summary)


def _with_note(e: OSError, note: str) -> OSError:
    """The same OS error with `note` (what was kept) after its reason."""
    return type(e)(e.errno, f"{e.strerror or e}; {note}", e.filename)


def saliency_variants(spec: EvalSpec, names: Sequence[str]) -> list[EvalSpec]:
    """The same models with each other infer.saliency_input in `names` (the
    spec's own is skipped); bad names raise InputError."""
    return [spec.with_inference(saliency_input=v) for v in names if v != spec.saliency_input]


def evaluate_and_report(spec: EvalSpec, workdir: str | os.PathLike, *,
                        out_dir: str | os.PathLike | None = None,
                        variants: Sequence[EvalSpec] = (),
                        baselines: Sequence[tuple[EvalSpec, str | os.PathLike]] = (),
                        write_predictions: bool = True, resume: bool = True,
                        devices: int = 0, split: str = "test") -> str:
    """Evaluates every fold of spec.train.data.folds and reports over them
    (on its test cases; `split="train"`: on its training cases).

    Per fold, the records go to `<out>/fold<f>` and, for each spec in
    `variants` (other inference settings of the same models, e.g. from
    `saliency_variants`) and each (spec, workdir) in `baselines` (other
    models on the same data, e.g. the stage-wise baseline), to
    `<out>/fold<f>-<method>` without predictions; then `report` writes the
    summary of all of them, with paired comparisons, to `<out>` (default
    `<workdir>/eval`) and its text is returned. Every case runs on one of
    `devices` local devices (0: all) of every process (`evaluate_fold`);
    process 0 alone writes the summary (the others return "").
    """
    out = Path(out_dir) if out_dir else Path(workdir) / "eval"
    others = [(v, workdir) for v in variants] + list(baselines)
    methods = [spec.method] + [o.method for o, _ in others]
    if len(set(methods)) != len(methods):
        raise InputError(f"evaluate_and_report: two evaluations share a method label {methods}")
    records = []
    for fold in spec.train.data.folds:
        records += evaluate_fold(spec, workdir, fold, out_dir=out / f"fold{int(fold)}",
                                 write_predictions=write_predictions, resume=resume,
                                 devices=devices, split=split)
        for o, o_work in others:
            records += evaluate_fold(o, o_work, fold, out_dir=out / f"fold{int(fold)}-{o.method}",
                                     write_predictions=False, resume=resume, devices=devices,
                                     split=split)
    if not Hosts.current().primary:
        return ""
    return report(records, out, thresholds=spec.report_thresholds,
                  main_threshold=spec.threshold, record=spec.record)


def mask_names(inputs_: Sequence[str], out: Path, *, overwrite: bool = False) -> list[Path]:
    """The mask file of each input (`segment.output_names`, masks only)."""
    return [m for m, _ in seg_lib.output_names(inputs_, out, overwrite=overwrite)]


def segment_files(spec: EvalSpec, workdir: str | os.PathLike, inputs_: Sequence[str], *,
                  out_dir: str | os.PathLike, fold: int = 0, overwrite: bool = False,
                  probabilities: bool = False, preview: bool = False, devices: int = 0
                  ) -> list[Path]:
    """Segments NIfTI files or DICOM folders without labels (`stnjax.eval.segment`).

    Every input is checked from its headers (readable, a 3D volume, a mask
    name of its own, no existing output unless `overwrite`) before anything
    is written, and decoded only when its turn comes (a few ahead of the
    devices, `seg_lib.run_all`), in the models' voxel order
    (`data.orientation`);
    masks (and with `probabilities` the fused probability maps) are
    written to `<out>/<name>_mask.nii.gz` (`_prob.nii.gz`) in the source
    geometry, with `preview` a picture `<out>/<name>_preview.png`, and
    `<out>/segment.json` after every input. Inputs run one per local device
    at a time (`devices`: how many, 0 = all), over every process of
    `jax.distributed` when there are several (a share each). Returns the
    mask, probability and picture paths this process wrote.
    """
    if not inputs_:
        raise InputError("inputs: give at least one NIfTI file or DICOM folder")
    out = check_writable(out_dir)
    outs = seg_lib.output_names(inputs_, out, overwrite=overwrite, probabilities=probabilities,
                                preview=preview)
    orientation = spec.train.data.orientation  # the models' voxel order (data.orientation)
    paths = [Path(p) for p in inputs_]
    # Headers only, every input before anything is written; the voxels stream later.
    target = spec.train.data.spacing
    grids = seg_lib.check_inputs(
        [(p, volume_io.read_geometry(p, orientation=orientation)) for p in paths],
        spec.inference.planes, target)
    reference, what = seg_lib.reference_spacing(spec.train.data, workdir)
    segs = device_segmenters(make_segmenter(spec, load_models(
        spec.train, workdir, fold, spec.inference.planes)), devices)
    hosts = Hosts.current()
    if hosts.primary:
        write_config_files(out, spec.record)
    settings = {"workdir": str(workdir), "fold": int(fold), "threshold": spec.threshold,
                "planes": "".join(spec.inference.planes),
                "max_rounds": spec.inference.max_rounds,
                "saliency_input": spec.inference.saliency_input,
                "spacing_mm": None if target is None else list(target),
                "orientation": orientation}
    return seg_lib.run_all(segs, paths, grids, outs, out=out, target=target,
                           t=spec.threshold, reference=reference, reference_what=what,
                           settings=settings, hosts=hosts, preview=preview,
                           orientation=orientation)
