"""Evaluation and segmentation runs: trained models in, files out.

The glue between training runs (`<workdir>/fold<f>/<plane>/checkpoints`),
the pure inference (`stnjax.infer` via `stnjax.infer.segmenter.Segmenter`) and the
reporting (`stnjax.eval.records`, `stnjax.eval.summaries`, `stnjax.eval.plots`). Everything
that touches files for evaluation lives here or in those writers;
launch/evaluate.py and launch/segment.py only parse flags.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stnjax.data import manifest as stdata
from stnjax.eval import summaries
from stnjax.infer import rounds as infer
from stnjax.data import volume_io
from stnjax import metrics
from stnjax.eval import plots
from stnjax.eval import report as text_report
from stnjax.checks import InputError
from stnjax.fileio import atomic_write_text
from stnjax.models.rstn import RSTN
from stnjax.eval.records import CaseRecord, read_records, threshold_key, write_records
from stnjax.infer.segmenter import CaseResult, Segmenter
from stnjax.train import inputs, workdir as wd
from stnjax.train.checkpoint import load_trained_params

log = logging.getLogger("stnjax.eval")


def inference_spec(config: Any) -> infer.InferenceSpec:
    """The static inference settings of a config (the stage-wise baseline
    fuses round 0 by majority vote and crops the raw image, as C2F)."""
    baseline = config.train.method == "stagewise"
    return infer.InferenceSpec(
        planes=tuple(inputs.resolve_planes(config.data.planes)),
        batch_size=int(config.infer.batch_size), max_rounds=int(config.infer.max_rounds),
        lcc_threshold=float(config.infer.lcc_threshold),
        report_thresholds=tuple(float(t) for t in config.infer.report_thresholds),
        fusion="majority" if baseline else "mean", use_saliency=not baseline,
        quantize_coarse=bool(config.infer.quantize_coarse),
        saliency_input=str(config.infer.saliency_input))


def method_label(config: Any) -> str:
    """The `method` of evaluation records: the training method, plus the
    saliency input when it is not the reference's ("rstn-sal-mask",
    "rstn-sal-coarse"), so that a sweep over several evaluation folders of
    the same models tells the variants apart."""
    spec = inference_spec(config)
    if spec.use_saliency and spec.saliency_input != "score":
        return f"{config.train.method}-sal-{spec.saliency_input}"
    return str(config.train.method)


def with_inference(config: Any, **fields: Any) -> Any:
    """A copy of `config` with config.infer fields replaced (checked: an
    unknown field or a bad value raises InputError)."""
    out = config.copy_and_resolve_references()
    for k, v in fields.items():
        if k not in out.infer:
            raise InputError(f"infer.{k}: no such inference setting")
        out.infer[k] = v
    inference_spec(out)
    return out


def load_models(config: Any, workdir: str | os.PathLike, fold: int,
                planes: Sequence[str]) -> tuple[RSTN, dict[str, Any]]:
    """The RSTN structure and {plane: params} of the finished runs of a fold.

    Raises InputError when a run is missing or incomplete, was trained for
    another plane or fold, or with another config (hash of the fields that
    define the model and its training).
    """
    rstn = RSTN.from_config(config.model)
    want = wd.config_hash(config)
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
    return rstn, params


def make_segmenter(config: Any, rstn: RSTN, params: dict[str, Any]) -> Segmenter:
    """A Segmenter with the config's buckets, HU window and timing mode."""
    return Segmenter(rstn, params, inference_spec(config),
                     volume_buckets=tuple(int(b) for b in config.infer.volume_buckets),
                     hu_window=tuple(config.data.hu_window),
                     per_round_timing=bool(config.infer.per_round_timing))


def check_writable(folder: str | os.PathLike) -> Path:
    """Creates `folder` if needed and checks that files can be written there,
    before any work is done; raises InputError naming it otherwise."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output folder {out} cannot be written: {e}") from None
    return out


def case_record(res: CaseResult, case: volume_io.Case, *, fold: int, method: str,
                t: float) -> CaseRecord:
    """The per-case record of one evaluated volume.

    Rounds not run (an early stop) keep the last mask: their DSC repeats the
    last value and their inter-iteration DSC is 1. Full metrics (Jaccard,
    HD95, surface Dice) are computed for the mask reported at t.
    """
    n = len(res.inter) - 1
    dsc = [float(v) for v in res.dsc[:res.rounds + 1]]
    inter = [None] + [float(v) for v in res.inter[1:res.rounds + 1]]
    dsc += [dsc[-1]] * (n - res.rounds)
    inter += [1.0] * (n - res.rounds)
    label, spacing = case.label, tuple(float(s) for s in case.geometry.spacing)
    main = res.mask
    full = {"dsc": metrics.dsc(main, label), "jaccard": metrics.jaccard(main, label),
            "hd95_mm": metrics.hd95(main, label, spacing),
            "surface_dice": metrics.surface_dice(main, label, spacing),
            "round": int(res.round_at[min(res.round_at, key=lambda k: abs(k - t))])}
    return CaseRecord(
        case_id=case.case_id, fold=int(fold), method=method, gt_voxels=int(label.sum()),
        spacing=spacing, dsc_rounds=dsc, inter_dsc=inter, rounds_run=int(res.rounds),
        time_coarse_s=res.time_coarse_s, time_rounds_s=list(res.time_rounds_s),
        metrics_at={threshold_key(t): full}, oracle=res.oracles or None,
        extra={"plane_dsc": res.plane_dsc, "bucket": list(res.bucket),
               "overflow": res.overflow})


def evaluate_fold(config: Any, workdir: str | os.PathLike, fold: int, *,
                  out_dir: str | os.PathLike | None = None,
                  write_predictions: bool = True, resume: bool = True) -> list[CaseRecord]:
    """Evaluates the test cases of one fold; writes predictions and records.

    Returns the per-case records (also written to `<out>/cases.{json,csv}`,
    rewritten atomically after every case; predictions to
    `<out>/predictions/<case>.nii.gz` in the source geometry). With
    `resume`, cases already recorded in `<out>` by an interrupted run with
    the same models and inference settings (its config.json) are taken from
    there, not run again; other settings mean a fresh evaluation.
    """
    spec = inference_spec(config)  # bad settings fail before any folder is made
    out = check_writable(out_dir or Path(workdir) / "eval" / f"fold{int(fold)}")
    ds_dir = inputs.dataset_dir(config, workdir)
    manifest = stdata.load_manifest(ds_dir)
    table = stdata.load_or_create_fold_table(ds_dir, manifest.case_ids,
                                             n_folds=int(config.data.n_folds))
    _, test_ids = stdata.split(table, fold, manifest.case_ids)
    rstn, params = load_models(config, workdir, fold, spec.planes)
    seg = make_segmenter(config, rstn, params)
    done = _finished_cases(config, out, test_ids, write_predictions) if resume else {}
    write_provenance(config, out)
    organ = manifest.organ_id if int(config.data.organ_id) < 0 else int(config.data.organ_id)
    t = float(config.infer.threshold)
    preds = check_writable(out / "predictions") if write_predictions else None
    log.info("fold %d: %d test cases; inference: planes %s, margin %d, up to %d rounds, "
             "saliency input %r, fusion %r, t = %.2f", fold, len(test_ids),
             "".join(spec.planes), rstn.margin, spec.max_rounds, spec.saliency_input,
             spec.fusion, t)
    if done:
        log.info("fold %d: resuming, %d of %d cases already evaluated in %s", fold,
                 len(done), len(test_ids), out)
    records = []
    for i, cid in enumerate(test_ids):
        if cid in done:
            records.append(done[cid])
            continue
        entry = manifest.case(cid)
        case = volume_io.load_case(manifest.root / entry.image, manifest.root / entry.label,
                            organ_id=organ, case_id=cid)
        t0 = time.perf_counter()
        res = seg.segment(case.image, label=case.label, t=t,
                          run_all_rounds=bool(config.infer.run_all_rounds),
                          oracles=bool(config.infer.oracles))
        rec = case_record(res, case, fold=fold, method=method_label(config), t=t)
        records.append(rec)
        if preds is not None:
            volume_io.save_mask(res.mask, case.geometry, preds / f"{cid}.nii.gz")
        log.info("fold %d case %d/%d %s: DSC round 0 %.2f %%, at t=%.2f %.2f %% "
                 "(round %d), %.1f s", fold, i + 1, len(test_ids), cid,
                 100 * rec.dsc_rounds[0], t, 100 * rec.metrics_at[threshold_key(t)]["dsc"],
                 rec.metrics_at[threshold_key(t)]["round"], time.perf_counter() - t0)
        write_records(records, out)  # after every case: an interrupted run resumes here
    log.info("fold %d: %d compilations %s", fold, seg.compile_count, seg.compiled_buckets())
    write_records(records, out)
    return records


def _result_fields(config_dict: dict) -> dict[str, Any]:
    """The fields that decide an evaluation's results: the models' identity
    and every inference setting (from a config as a JSON dict)."""
    infer_fields = {f"infer.{k}": list(v) if isinstance(v, (list, tuple)) else v
                    for k, v in config_dict.get("infer", {}).items()}
    return {**wd.identity_fields(config_dict), **infer_fields,
            "data.planes": config_dict.get("data", {}).get("planes")}


def _finished_cases(config: Any, out: Path, test_ids: Sequence[str],
                    write_predictions: bool) -> dict[str, CaseRecord]:
    """{case id: record} of the cases an earlier run in `out` finished with
    the same models and inference settings (and whose prediction file
    exists, when predictions are written); {} otherwise."""
    cfg_file, cases = out / "config.json", out / "cases.json"
    if not (cfg_file.is_file() and cases.is_file()):
        return {}
    try:
        old = json.loads(cfg_file.read_text())
        recs = read_records(cases)
    except (OSError, ValueError, InputError) as e:
        log.warning("%s: earlier records unreadable (%s); evaluating every case", out, e)
        return {}
    if _result_fields(old) != _result_fields(json.loads(config.to_json_best_effort())):
        log.info("%s: earlier records were made with other settings; evaluating every case",
                 out)
        return {}
    method = method_label(config)
    return {r.case_id: r for r in recs
            if r.case_id in test_ids and r.method == method
            and (not write_predictions or (out / "predictions" / f"{r.case_id}.nii.gz").is_file())}


def report(records: Sequence[CaseRecord], out_dir: str | os.PathLike, *,
           thresholds: Sequence[float], main_threshold: float,
           config: Any | None = None) -> str:
    """Writes summary.{json,txt}, sweep.csv and the PNG plots (and, given
    the config, the provenance files of `write_provenance`); returns the
    printed summary text."""
    out = check_writable(out_dir)
    if config is not None:
        write_provenance(config, out)
    summary = summaries.summarize(records, thresholds=tuple(thresholds),
                                 main_threshold=main_threshold)
    text_report.write_summary(summary, out)
    sweep_ts = sorted(set(np.round(np.arange(0.80, 1.0, 0.01), 2).tolist())
                      | set(float(t) for t in thresholds) | {0.995})
    rows = summaries.sweep(records, sweep_ts)
    summaries.write_sweep_csv(rows, out / "sweep.csv")
    plots.write_plots(records, rows, out, main_threshold)
    return text_report.format_summary(summary)


def saliency_variants(config: Any, names: Sequence[str]) -> list[Any]:
    """Copies of `config` with each other infer.saliency_input in `names`
    (the config's own is skipped); bad names raise InputError."""
    return [with_inference(config, saliency_input=v) for v in names
            if v != config.infer.saliency_input]


def evaluate_and_report(config: Any, workdir: str | os.PathLike, *,
                        out_dir: str | os.PathLike | None = None,
                        variants: Sequence[Any] = (), write_predictions: bool = True,
                        resume: bool = True) -> str:
    """Evaluates every fold of config.data.folds and reports over them.

    Per fold, the records go to `<out>/fold<f>` and, for each config in
    `variants` (other inference settings of the same models, e.g. from
    `saliency_variants`), to `<out>/fold<f>-<method>` without predictions;
    then `report` writes the summary of all of them to `<out>` (default
    `<workdir>/eval`) and its text is returned.
    """
    out = Path(out_dir) if out_dir else Path(workdir) / "eval"
    records = []
    for fold in inputs.resolve_folds(config.data.folds, int(config.data.n_folds)):
        records += evaluate_fold(config, workdir, fold, out_dir=out / f"fold{int(fold)}",
                                 write_predictions=write_predictions, resume=resume)
        for vc in variants:
            records += evaluate_fold(vc, workdir, fold,
                                     out_dir=out / f"fold{int(fold)}-{method_label(vc)}",
                                     write_predictions=False, resume=resume)
    return report(records, out, thresholds=config.infer.report_thresholds,
                  main_threshold=config.infer.threshold, config=config)


def write_provenance(config: Any, out_dir: str | os.PathLike) -> None:
    """Writes config.json, config.txt and versions.json beside results.

    The training workdir holds the config the models were trained with, but
    inference settings (config.infer.*) may change at evaluation time, so
    every result folder gets the resolved config it was made with.
    """
    out = check_writable(out_dir)
    atomic_write_text(out / "config.json", config.to_json_best_effort(indent=2) + "\n")
    atomic_write_text(out / "config.txt", str(config))
    atomic_write_text(out / "versions.json",
                      json.dumps(wd.package_versions(), indent=2) + "\n")


def segment_files(config: Any, workdir: str | os.PathLike, inputs_: Sequence[str], *,
                  out_dir: str | os.PathLike, fold: int = 0) -> list[Path]:
    """Segments NIfTI files or DICOM folders without labels.

    Every input is checked (readable, a 3D volume) before anything is
    written; masks are written to `<out>/<name>_mask.nii.gz` in the source
    geometry. Returns the written paths.
    """
    if not inputs_:
        raise InputError("inputs: give at least one NIfTI file or DICOM folder")
    out = check_writable(out_dir)
    volumes = [(Path(p), volume_io.load_image(p)) for p in inputs_]  # fail before writing
    spec = inference_spec(config)
    rstn, params = load_models(config, workdir, fold, spec.planes)
    seg = make_segmenter(config, rstn, params)
    write_provenance(config, out)
    written = []
    for i, (path, vol) in enumerate(volumes):
        t0 = time.perf_counter()
        res = seg.segment(vol.data, t=float(config.infer.threshold),
                          run_all_rounds=False)
        name = path.name.removesuffix(".gz").removesuffix(".nii") or "volume"
        dest = out / f"{name}_mask.nii.gz"
        volume_io.save_mask(res.mask, vol.geometry, dest)
        written.append(dest)
        log.info("%d/%d %s: %d voxels, %d rounds, %.1f s (coarse %.1f s)", i + 1,
                 len(volumes), path, int(res.mask.sum()), res.rounds,
                 time.perf_counter() - t0, res.time_coarse_s)
    return written
