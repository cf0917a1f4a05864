"""Evaluation and segmentation runs on a real (smoke) training run.

One tiny training run (smoke config: axial plane, 12 steps) feeds the
evaluation of its fold, the label-free segmentation of files, and the
bad-input cases of both: a checkpoint of another plane or config, and an
output folder that cannot be written (no output file may appear).
"""

import errno
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from faults import run_failing
from launch.configs import smoke
from stnjax import metrics
from stnjax.checks import InputError
from stnjax.data import manifest, volume_io
from stnjax.eval import plots, records, runs
from stnjax.eval import segment as seg_lib
from stnjax.eval.spec import EvalSpec
from stnjax.train import inputs, loop
from stnjax.train import workdir as wd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for this module's in-process runs, as
    the commands have: the many evaluations of the same models and buckets
    compile each program once. Put back as it was afterwards (the worker
    runs other test files next)."""
    from jax._src import compilation_cache as cc
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    cc.reset_cache()  # the cache is set up once per process, at the first compilation
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(keys[1], 0.0)
    yield
    for k, v in before.items():
        jax.config.update(k, v)
    cc.reset_cache()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    spec = EvalSpec.from_config(smoke.get_config())
    loop.train(spec.train, work)
    return spec, work


def test_evaluate_fold_writes_records_predictions_and_reports(trained, tmp_path):
    spec, work = trained
    out = tmp_path / "eval"
    recs = runs.evaluate_fold(spec, work, 0, out_dir=out)
    assert recs and all(r.num_rounds == spec.max_rounds for r in recs)
    assert json.loads((out / "config.json").read_text())["infer"]["saliency_input"] == "score"
    assert records.read_records(out) == recs  # cases.json round trip
    for r in recs:
        pred = out / "predictions" / f"{r.case_id}.nii.gz"
        img = nib.load(pred)
        # The prediction has the source file's geometry and the recorded DSC.
        man = manifest.load_manifest(inputs.dataset_dir(spec.train.data, work))
        src = man.root / man.case(r.case_id).image
        np.testing.assert_allclose(img.affine, nib.load(src).affine, atol=1e-5)
        case = volume_io.load_case(src, man.root / man.case(r.case_id).label,
                                   organ_id=man.organ_id)
        mask = volume_io.load_label_map(pred, case.geometry).astype(bool)
        key = records.threshold_key(spec.threshold)
        assert abs(metrics.dsc(mask, case.label) - r.metrics_at[key]["dsc"]) < 1e-6
        _assert_png(out / "overlays" / f"{r.case_id}.png", min_width=1000)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(
        f"{r.case_id}.png" for r in recs)  # one picture a case, no temporaries
    text = runs.report(recs, out, thresholds=spec.report_thresholds,
                       main_threshold=spec.threshold, record=spec.record)
    assert "Coarse (round 0)" in text
    for name in ("summary.txt", "summary.json", "sweep.csv", "sweep.png", "config.txt"):
        assert (out / name).is_file()
    # The resolved config (inference settings included) and versions beside the results.
    assert json.loads((out / "config.json").read_text()) == json.loads(
        smoke.get_config().to_json())
    assert json.loads((out / "versions.json").read_text())["jax"] == jax.__version__


def _assert_png(path: Path, min_width: int) -> None:
    """A complete PNG file of at least `min_width` pixels across (header and
    end chunk) and of a plausible size."""
    import struct
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-12:-4] == b"\0\0\0\0IEND", path
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_width and height >= 300 and len(data) > 20_000, (path, width, len(data))


def test_evaluate_command_with_other_inference_settings(trained, tmp_path):
    """`launch.evaluate --out=... --config.infer.*=...` evaluates the same
    models with other inference settings into another folder, which records
    the settings used; the training workdir is left alone."""
    spec, work = trained
    out = tmp_path / "eval-mask"
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    args = [f"--config={ROOT / 'launch/configs/smoke.py'}", f"--workdir={work}", f"--out={out}",
            "--config.infer.saliency_input=mask", "--config.infer.max_rounds=2",
            "--no_predictions"]
    # The disk fills up while the summary is written (sweep.csv fails): one
    # line naming the file and what was kept; no summary file at all; the
    # case records stay, and the same command then resumes from them.
    proc = run_failing("launch.evaluate", args, prefix=out, errno_=errno.ENOSPC,
                       name_part="sweep.csv")
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "sweep.csv: No space left on device" in err[0] and \
        f"no summary file in {out} was written" in err[0], err[0]
    assert not any((out / n).exists() for n in ("summary.json", "summary.txt", "sweep.png"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert records.read_records(out / "fold0")
    # Without --config: the config stored in the workdir, overrides applied
    # (the same settings, so the resume keeps the recorded case).
    proc = subprocess.run(
        [sys.executable, "-m", "launch.evaluate", *args[1:]],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming, 1 of 1 cases already evaluated" in proc.stderr
    assert f"results in {out}" in proc.stdout
    used = json.loads((out / "config.json").read_text())["infer"]
    assert used["saliency_input"] == "mask" and used["max_rounds"] == 2
    recs = records.read_records(out / "fold0")
    assert recs and all(r.num_rounds == 2 and r.method == "rstn-sal-mask" for r in recs)
    assert not (out / "fold0" / "predictions").exists()
    assert json.loads((out / "fold0" / "config.json").read_text())["infer"]["saliency_input"] \
        == "mask"
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
    # A typo in the new setting is a clear error before any output.
    bad = tmp_path / "eval-bad"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.evaluate", f"--config={ROOT / 'launch/configs/smoke.py'}",
         f"--workdir={work}", f"--out={bad}", "--config.infer.saliency_input=fused"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode != 0 and "saliency_input" in proc.stderr
    assert not bad.exists()


def _volatile_free(rec):
    """A record without its timings, device and process (they differ between
    runs: `records.RUN_FIELDS`)."""
    return records.without_run_fields(rec)


def test_interrupted_evaluation_resumes(trained, tmp_path, monkeypatch):
    """An evaluation killed after its first case resumes with the second
    only and ends with the records of an uninterrupted run; other inference
    settings, a missing prediction or unreadable records mean re-running."""
    spec, work = trained
    orig_split = inputs.fold_split

    def two_cases(*args):  # the smoke fold has one test case: add a training case
        train, test = orig_split(*args)
        return train, list(test) + [sorted(train)[0]]
    monkeypatch.setattr(inputs, "fold_split", two_cases)
    full = runs.evaluate_fold(spec, work, 0, out_dir=tmp_path / "a")
    assert len(full) == 2

    calls = []
    orig_segment = runs.Segmenter.segment_image

    def segment(self, *a, **kw):
        calls.append(1)
        if kill_at and len(calls) == kill_at:
            raise RuntimeError("killed")
        return orig_segment(self, *a, **kw)
    monkeypatch.setattr(runs.Segmenter, "segment_image", segment)

    out = tmp_path / "b"
    kill_at = 2
    with pytest.raises(RuntimeError, match="killed"):  # one device: the cases in order
        runs.evaluate_fold(spec, work, 0, out_dir=out, devices=1)
    assert [r.case_id for r in records.read_records(out)] == [full[0].case_id]
    kill_at, calls[:] = 0, []
    resumed = runs.evaluate_fold(spec, work, 0, out_dir=out)
    assert len(calls) == 1  # only the case the kill interrupted
    assert [_volatile_free(r) for r in resumed] == [_volatile_free(r) for r in full]
    assert records.read_records(out) == resumed

    calls[:] = []
    runs.evaluate_fold(spec, work, 0, out_dir=out)
    assert len(calls) == 0  # finished: nothing to run
    (out / "predictions" / f"{full[1].case_id}.nii.gz").unlink()
    runs.evaluate_fold(spec, work, 0, out_dir=out)
    assert len(calls) == 1  # the case whose prediction is missing
    calls[:] = []
    other = spec.with_inference(max_rounds=2)
    assert all(r.num_rounds == 2 for r in runs.evaluate_fold(other, work, 0, out_dir=out))
    assert len(calls) == 2  # other settings: every case again
    (out / "cases.json").write_text("{ torn")
    calls[:] = []
    runs.evaluate_fold(other, work, 0, out_dir=out)
    assert len(calls) == 2
    calls[:] = []
    runs.evaluate_fold(other, work, 0, out_dir=out, resume=False)
    assert len(calls) == 2


def test_main_job_evaluates_and_compares_saliency_inputs(trained):
    """`launch.main` on a finished workdir: training resumes as complete,
    both inference settings are evaluated into their folders, and the
    printed summary holds both methods and their paired comparison."""
    spec, work = trained
    proc = subprocess.run(
        [sys.executable, "-m", "launch.main", f"--config={ROOT / 'launch/configs/smoke.py'}",
         f"--workdir={work}"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already complete" in proc.stderr
    assert "== RSTN (rstn)" in proc.stdout
    assert "(rstn-sal-coarse)" in proc.stdout and "RSTN vs RSTN, saliency of" in proc.stdout
    main = records.read_records(work / "eval" / "fold0")
    variant = records.read_records(work / "eval" / "fold0-rstn-sal-coarse")
    assert [r.case_id for r in main] == [r.case_id for r in variant]
    assert {r.method for r in main} == {"rstn"} and {r.method for r in variant} == {
        "rstn-sal-coarse"}
    # Round 1 is the same map either way (round 0's map is the previous one).
    assert all(abs(a.dsc_rounds[1] - b.dsc_rounds[1]) < 1e-6 for a, b in zip(main, variant))
    assert (work / "eval" / "fold0" / "predictions").is_dir()
    assert not (work / "eval" / "fold0-rstn-sal-coarse" / "predictions").exists()
    assert json.loads((work / "eval" / "config.json").read_text())["name"] == "smoke"
    # The stage-wise baseline: trained on the same data for as many steps
    # (one CF stage), evaluated with its own inference, compared in the summary.
    assert "== Stage-wise (C2F) (stagewise)" in proc.stdout, proc.stdout
    assert "RSTN vs Stage-wise (C2F)" in proc.stdout
    base_cfg = json.loads((work / "stagewise" / "config.json").read_text())
    assert base_cfg["train"]["stages"] == "CF:12" and base_cfg["train"]["method"] == "stagewise"
    base = records.read_records(work / "eval" / "fold0-stagewise")
    assert [r.case_id for r in base] == [r.case_id for r in main]
    assert {r.method for r in base} == {"stagewise"}


def test_inference_variant_copies_are_checked(trained):
    spec, _ = trained
    v = spec.with_inference(saliency_input="coarse")
    assert v.saliency_input == "coarse" and spec.saliency_input == "score"
    assert v.method == "rstn-sal-coarse" and spec.method == "rstn"
    assert v.record["infer"]["saliency_input"] == "coarse"
    assert v.record["model"] == spec.record["model"] and v.train is spec.train
    with pytest.raises(InputError, match="infer.saliency_input"):
        spec.with_inference(saliency_input="fused")
    with pytest.raises(InputError, match="infer.margin"):
        spec.with_inference(margin=3)
    with pytest.raises(InputError, match="infer.threshold: 0.97 is not among"):
        spec.with_inference(threshold=0.97)  # its mask would not be kept: before any work
    assert spec.with_inference(threshold=0.95).threshold == 0.95
    assert [s.method for s in runs.saliency_variants(spec, ["score", "mask"])] == [
        "rstn-sal-mask"]
    lcc = spec.with_inference(coarse_lcc=True)
    assert lcc.inference.coarse_lcc and not spec.inference.coarse_lcc
    assert lcc.method == "rstn-coarse-lcc" and lcc.record["infer"]["coarse_lcc"] is True


def test_segment_files_without_labels(trained, tmp_path):
    spec, work = trained
    ds = inputs.dataset_dir(spec.train.data, work)
    src = sorted(ds.glob("images/*.nii.gz"))[:1]
    written = runs.segment_files(spec, work, [str(p) for p in src], out_dir=tmp_path)
    assert [p.name for p in written] == [src[0].name.replace(".nii.gz", "_mask.nii.gz")]
    img = nib.load(written[0])
    assert img.shape == nib.load(src[0]).shape
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}
    assert (tmp_path / "config.json").is_file() and (tmp_path / "versions.json").is_file()
    # No silent overwrite: an existing mask is refused unless asked for.
    before = written[0].read_bytes()
    with pytest.raises(InputError, match=r"_mask.nii.gz exists .*--overwrite"):
        runs.segment_files(spec, work, [str(p) for p in src], out_dir=tmp_path)
    assert runs.segment_files(spec, work, [str(p) for p in src], out_dir=tmp_path,
                              overwrite=True) == written
    assert written[0].read_bytes() == before  # same models, same input: the same mask
    # Two inputs with one name (p1/ct.nii.gz, p2/ct.nii.gz): an error before any output.
    for d in ("p1", "p2"):
        (tmp_path / d).mkdir()
        shutil.copy(src[0], tmp_path / d / "ct.nii.gz")
    out = tmp_path / "same"
    with pytest.raises(InputError, match=r"p1/ct.nii.gz and .*p2/ct.nii.gz would both write"):
        runs.segment_files(spec, work, [str(tmp_path / d / "ct.nii.gz") for d in ("p1", "p2")],
                           out_dir=out)
    assert not any(p for p in out.iterdir() if not p.name.startswith("."))


def test_segment_json_probabilities_and_warnings(trained, tmp_path, monkeypatch):
    """segment.json against the written files and a hand-made input: shape,
    spacing, voxels and mL of the mask file, mean HU inside it; the
    probability map on the input's grid in [0, 1]; the empty-mask and the
    far-spacing warnings (the smoke models saw 6.67 x 6.67 x 10.67 mm)."""
    spec, work = trained
    ds = inputs.dataset_dir(spec.train.data, work)
    src = sorted(ds.glob("images/*.nii.gz"))[0]
    # A second input: the same phantom at 2 x 2 x 3 mm (far from training), and
    # a flat water volume (on the training spacing).
    img = nib.load(src)
    fine = tmp_path / "fine.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([2.0, 2.0, 3.0, 1.0])), str(fine))
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine), str(flat))
    out = tmp_path / "out"
    texts = {}  # the words drawn on each preview

    def save(fig, path):
        texts[Path(path).name] = [t.get_text() for ax in fig.axes for t in ax.texts]
        return save_png(fig, path)
    save_png = plots._save
    monkeypatch.setattr(plots, "_save", save)
    real = seg_lib.on_input_grid

    def on_input_grid(res, vol, target):  # the flat volume: no organ, whatever
        mask, prob = real(res, vol, target)  # the tiny models say
        return (mask if vol.data.any() else np.zeros_like(mask)), prob
    monkeypatch.setattr(seg_lib, "on_input_grid", on_input_grid)
    written = runs.segment_files(spec, work, [str(src), str(fine), str(flat)], out_dir=out,
                                 probabilities=True, preview=True)
    assert [p.name for p in written] == [
        f"{n}_{k}" for n in (src.name[:-7], "fine", "flat")
        for k in ("mask.nii.gz", "prob.nii.gz", "preview.png")]
    for p in written[2::3]:
        _assert_png(p, min_width=1000)
    # The flat volume's mask is empty: its picture says so, the others' not.
    assert [("empty mask" in texts[p.name]) for p in written[2::3]] == [
        not (np.asarray(nib.load(m).dataobj) > 0).any() for m in written[::3]]
    assert texts["flat_preview.png"].count("empty mask") == 3  # on each of the three views
    doc = json.loads((out / "segment.json").read_text())
    assert doc["settings"]["threshold"] == spec.threshold
    assert [Path(e["input"]).name for e in doc["inputs"]] == [src.name, "fine.nii.gz", "flat.nii.gz"]
    for e in doc["inputs"]:
        hu = np.asarray(nib.load(e["input"]).dataobj, np.float64)
        m = nib.load(e["mask"])
        mask = np.asarray(m.dataobj) > 0
        zooms = np.asarray(m.header.get_zooms()[:3], np.float64)
        assert e["shape"] == list(hu.shape) and e["voxels"] == int(mask.sum())
        np.testing.assert_allclose(sorted(e["spacing_mm"]), sorted(zooms), rtol=1e-5)
        assert e["volume_ml"] == pytest.approx(mask.sum() * np.prod(zooms) / 1000, abs=1e-3)
        if mask.any():
            assert e["mean_hu"] == pytest.approx(hu[mask].mean(), abs=0.01)
        prob = np.asarray(nib.load(e["probabilities"]).dataobj)
        assert prob.shape == hu.shape and prob.dtype == np.float32
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        assert ("empty mask: no organ found" in e["warnings"]) == (not mask.any())
    far = [any("far from the training cases' spacing" in w for w in e["warnings"])
           for e in doc["inputs"]]
    assert far == [False, True, False]
    assert doc["inputs"][0]["voxels"] > 0


def test_a_second_segment_call_compiles_nothing(trained, tmp_path):
    """`launch.segment` keeps its compiled programs in the persistent
    compilation cache: a second call, on another volume of the same bucket,
    loads every program from there and says so (the first compiled them)."""
    spec, work = trained
    src = sorted(inputs.dataset_dir(spec.train.data, work).glob("images/*.nii.gz"))[0]
    other = tmp_path / "other.nii.gz"  # another volume, of the same size
    img = nib.load(src)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine), str(other))

    def segment(out, volume):
        proc = subprocess.run(
            [sys.executable, "-m", "launch.segment", f"--workdir={work}", f"--out={out}",
             f"--compilation_cache={tmp_path / 'cache'}", str(volume)],
            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", STNJAX_HUGE_PAGES="0"),
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr
    first = segment(tmp_path / "a", src)
    assert " I compiled coarse for bucket " in first
    assert re.search(r"I compiled [1-9]\d* programs \(0 loaded from the compilation cache\)",
                     first), first
    second = segment(tmp_path / "b", other)
    assert not re.search(r" I compiled \w+ for bucket", second), second  # none compiled
    assert " I loaded from the compilation cache: coarse for bucket " in second
    assert "compiled nothing: all " in second, second


DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real CT examples not found under {DATA}")
def test_segment_real_ct_nifti_and_dicom(trained, tmp_path):
    """Real scans through the label-free command path: a 3 mm RAS NIfTI
    and a JPEG 2000 DICOM series of 512 x 512 slices (LPS headers) give
    binary masks on each source's own grid, in its voxel order and affine;
    read back through world coordinates, the NIfTI's equals what the
    Segmenter computes in the canonical orientation."""
    spec, work = trained
    # Geometry, not rounds: 2 rounds, exact volume sizes (no padding to buckets).
    spec = spec.with_inference(max_rounds=2, volume_buckets=())
    srcs = [DATA / "ct_example_3mm" / "ct.nii.gz", DATA / "ct_dicom_slab" / "dicom"]
    written = runs.segment_files(spec, work, [str(p) for p in srcs], out_dir=tmp_path)
    assert [p.name for p in written] == ["ct_mask.nii.gz", "dicom_mask.nii.gz"]
    masks = []
    for src, dest in zip(srcs, written):
        vol = volume_io.load_image(src)
        img = nib.load(dest)
        assert img.shape == vol.geometry.to_source(vol.data).shape
        np.testing.assert_allclose(img.affine, vol.geometry.source_affine, atol=1e-4)
        assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1}
        masks.append((vol, volume_io.load_label_map(dest, vol.geometry).astype(bool)))
    vol, mask = masks[0]
    params = runs.load_models(spec.train, work, 0, ("Z",))
    res = runs.make_segmenter(spec, params).segment(
        vol.data, t=spec.threshold, run_all_rounds=False)
    np.testing.assert_array_equal(mask, res.mask)
    assert res.rounds >= 1 and mask.any()  # a real run, not an empty pass-through


def test_checkpoint_of_another_plane_or_config_is_refused(trained, tmp_path):
    spec, work = trained
    # Another config: the hash of the model/training fields differs.
    other = smoke.get_config()
    other.train.base_lr = 2e-3
    with pytest.raises(InputError, match="another config"):
        runs.load_models(EvalSpec.from_config(other).train, work, 0, ("Z",))
    # A run folder of plane X that holds plane Z's checkpoint.
    fake = tmp_path / "work"
    shutil.copytree(wd.run_dir(work, 0, "Z"), wd.run_dir(fake, 0, "X"))
    with pytest.raises(InputError, match="plane 'Z', expected fold 0 plane 'X'"):
        runs.load_models(spec.train, fake, 0, ("X",))
    # A plane that was never trained.
    with pytest.raises(InputError, match="no checkpoint"):
        runs.load_models(spec.train, work, 0, ("Y",))


def test_unwritable_output_is_an_error_before_any_output(trained, tmp_path):
    spec, work = trained
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="cannot be written"):
        runs.evaluate_fold(spec, work, 0, out_dir=blocker / "eval")
    with pytest.raises(InputError, match="cannot be written"):
        runs.segment_files(spec, work, ["x.nii.gz"], out_dir=blocker / "masks")
    # A bad input file is found before anything is written.
    out = tmp_path / "masks"
    with pytest.raises(InputError):
        runs.segment_files(spec, work, [str(tmp_path / "missing.nii.gz")], out_dir=out)
    assert not any(p for p in out.iterdir() if not p.name.startswith("."))
    # A volume too thin for 3-slice windows: named, before anything is written.
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 1), np.int16), np.eye(4)), str(tmp_path / "thin.nii.gz"))
    with pytest.raises(InputError, match=r"thin\.nii\.gz: shape \(20, 20, 1\) has a single slice"):
        runs.segment_files(spec, work, [str(tmp_path / "thin.nii.gz")], out_dir=out)
    assert not any(p for p in out.iterdir() if not p.name.startswith("."))


def test_readme_python_snippet_runs_as_written(trained, tmp_path):
    """The README's Python API example, run with only its set-up lines
    (workdir, files, organ id, output) pointed at the smoke training run."""
    import re as re_
    spec, work = trained
    text = (ROOT / "README.md").read_text()
    code = text[text.index("## Python API"):]
    code = code[code.index("```python\n") + 10:]
    code = code[:code.index("```")]
    man = manifest.load_manifest(inputs.dataset_dir(spec.train.data, work))
    case = man.cases[0]
    setup = {"WORKDIR": f"WORKDIR = {str(work)!r}",
             "IMAGE": f"IMAGE, LABEL, ORGAN = {str(case.image)!r}, {str(case.label)!r}, "
                      f"{man.organ_id}",
             "OUT": f"OUT = {str(tmp_path / 'mask.nii.gz')!r}"}
    for name, line in setup.items():
        code, n = re_.subn(rf"^{name}\b.*$", line, code, count=1, flags=re_.M)
        assert n == 1, f"README snippet lost its {name} line"
    env: dict = {}
    exec(compile(code, "README.md", "exec"), env)  # noqa: S102 - our own README
    res, out = env["res"], env["out"]
    img = nib.load(str(case.image))
    written = nib.load(str(tmp_path / "mask.nii.gz"))
    assert written.shape == img.shape and np.allclose(written.affine, img.affine)
    assert res.dsc is not None and len(res.dsc) == spec.inference.max_rounds + 1
    # The pure functions give the driver's inter-round DSC for the rounds
    # they ran (they stop at t = 0.99; the driver records all rounds).
    r = int(out.rounds)
    assert r >= 1
    np.testing.assert_allclose(np.asarray(out.inter)[1:r + 1], np.asarray(res.inter)[1:r + 1],
                               atol=1e-5)


# ------------------------------------------------------- cohort inference (issue 14)
# Every case of a cohort must give the same record on any device of any
# process: the comparisons below blank records.RUN_FIELDS only (wall-clock
# times, which vary from run to run, and the device and process, which vary
# with the device and process count by design); masks, metrics, rounds and
# diagnostics must be the same bits as the one-device run's.

_SEGMENTERS: dict = {}


def _one_compilation(mp):
    """Every evaluation and segmentation of these tests gets the same
    Segmenter, so each program is compiled once per device at most (with the
    persistent cache these tests turn on, the device copies read it; the
    loading path without the cache: tests/test_infer.py); the multi-process
    runs compile their own."""
    make = runs.make_segmenter

    def shared(spec, params):
        key = json.dumps(spec.record, sort_keys=True, default=str)
        return _SEGMENTERS.setdefault(key, make(spec, params))
    mp.setattr(runs, "make_segmenter", shared)


@pytest.fixture(scope="module")
def cohort(trained, tmp_path_factory):
    """A copy of the trained workdir whose fold 0 tests all 4 phantom cases
    (the smoke fold has 1), and its evaluation on one device: the reference.
    3 rounds on volumes of their own size (48 x 48 x 24), to keep it short."""
    spec, work = trained
    spec = spec.with_inference(max_rounds=3, volume_buckets=(24, 48))
    copy = tmp_path_factory.mktemp("cohort") / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("jax_cache"))
    ds = inputs.dataset_dir(spec.train.data, copy)
    ids = sorted(manifest.load_manifest(ds).case_ids)
    manifest.write_fold_table(ds, {0: ids, 1: [], 2: [], 3: []})
    with pytest.MonkeyPatch.context() as mp:
        _one_compilation(mp)
        one = runs.evaluate_fold(spec, copy, 0, out_dir=copy / "eval-1dev", devices=1)
    assert [r.case_id for r in one] == ids and {r.device for r in one} == {"cpu:0"}
    return spec, copy, one


def _same_predictions(a: Path, b: Path, names) -> None:
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_four_devices_give_the_one_device_records_and_resume_after_a_kill(
        cohort, monkeypatch, tmp_path):
    """4 cases on 4 devices: a kill in one device's case keeps the cases the
    others finished; the rerun (reading the records of cases.json and of
    another process's part file) runs only the rest (no case twice) and ends
    with the one-device records and predictions, from at least 2 devices."""
    spec, work, one = cohort
    _one_compilation(monkeypatch)
    ran, orig, calls = [], runs.Segmenter.segment_image, itertools.count(1)

    def segment(self, *a, **kw):
        if next(calls) == kill_at:  # the second case to start: the first one finishes
            raise RuntimeError("killed")
        res = orig(self, *a, **kw)
        ran.append(self.device)
        return res
    monkeypatch.setattr(runs.Segmenter, "segment_image", segment)
    out, kill_at = tmp_path / "eval", 2
    with pytest.raises(RuntimeError, match="killed"):
        runs.evaluate_fold(spec, work, 0, out_dir=out, devices=4)
    kept = records.read_records(out)
    assert 1 <= len(kept) == len(ran) <= 3  # the finished cases, each recorded
    assert not list(out.glob("cases.p*.json"))
    # As if a 2-process run had been killed: its last case recorded by
    # process 1 in its part file, not yet merged by process 0.
    (out / "cases.p1.json").write_text(records.records_json_text(kept[-1:]))
    if kept[:-1]:
        records.write_records(kept[:-1], out)
    else:
        (out / "cases.json").unlink()
    kill_at = 0
    resumed = runs.evaluate_fold(spec, work, 0, out_dir=out, devices=4)
    assert len(ran) == len(one)  # each case ran once over the two runs
    assert [records.without_run_fields(r) for r in resumed] == \
        [records.without_run_fields(r) for r in one]
    assert records.read_records(out) == resumed and not list(out.glob("cases.p*.json"))
    assert len({r.device for r in resumed}) >= 2 and {r.process for r in resumed} == {0}
    _same_predictions(work / "eval-1dev" / "predictions", out / "predictions",
                      [f"{r.case_id}.nii.gz" for r in one])


def test_segment_six_inputs_on_four_devices_like_one(cohort, monkeypatch, tmp_path):
    """segment of 6 inputs on 4 devices, and on 2 processes x 2 devices
    (simulated in threads), writes the one-device run's masks and entries;
    on one device at most 2 inputs are decoded at a time (one running, one
    ahead), not all 6 up front."""
    spec, work, _ = cohort
    _one_compilation(monkeypatch)
    images = sorted(inputs.dataset_dir(spec.train.data, work).glob("images/*.nii.gz"))
    for k in (0, 1):  # 6 inputs from the 4 phantoms
        shutil.copy(images[k], tmp_path / f"again{k}.nii.gz")
        images.append(tmp_path / f"again{k}.nii.gz")
    decoded, alive, most = [], weakref.WeakSet(), {}
    load_image = volume_io.load_image

    def counted(path, *a, **kw):  # every volume decoded, and how many are alive at once
        vol = load_image(path, *a, **kw)
        decoded.append(path)
        alive.add(vol)
        most[n] = max(most.get(n, 0), len(alive))
        return vol
    monkeypatch.setattr(volume_io, "load_image", counted)
    outs = {}
    for n in (1, 4):
        written = runs.segment_files(spec, work, [str(p) for p in images],
                                     out_dir=tmp_path / f"d{n}", devices=n)
        outs[n] = json.loads((tmp_path / f"d{n}" / "segment.json").read_text())["inputs"]
        assert len(written) == 6 and len({e["device"] for e in outs[n]}) >= min(n, 2)
    assert len(decoded) == 12 and most[1] == 2 and most[4] <= 6, most
    # Two processes of one run, as two threads over one in-memory store.
    from stnjax.eval import hostlink
    from stnjax.eval.hosts import Hosts
    kv, me = hostlink.LocalKV(), threading.local()
    links = [hostlink.HostLink(kv, k, 2, "h", timeout=60) for k in (0, 1)]

    def process(k):
        me.k = k
        runs.segment_files(spec, work, [str(p) for p in images], out_dir=tmp_path / "h2",
                           devices=2)
    monkeypatch.setattr(Hosts, "current", classmethod(lambda cls: cls(me.k, 2, "h",
                                                                      links[me.k])))
    threads = [threading.Thread(target=process, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for link in links:
        link.close()
    outs["h2"] = json.loads((tmp_path / "h2" / "segment.json").read_text())["inputs"]
    assert [e["process"] for e in outs["h2"]] == [0, 1, 0, 1, 0, 1]  # every other input
    assert not list((tmp_path / "h2").glob("segment.p*.json"))
    for n in (4, "h2"):
        assert [_segment_result(e) for e in outs[n]] == [_segment_result(e) for e in outs[1]]
        _same_predictions(tmp_path / "d1", tmp_path / ("d4" if n == 4 else n),
                          [Path(e["mask"]).name for e in outs[1]])


def _segment_result(entry: dict) -> dict:
    """A segment.json entry without what says how and where it ran."""
    run_fields = ("seconds", "seconds_compiling", "seconds_coarse", "device", "process", "mask")
    return {k: v for k, v in entry.items() if k not in run_fields}


# launch.evaluate or launch.segment as __main__ (as `python -m` runs it), on
# process `me` of a multi-host run. fail "case@k": on process k, reading that
# case raises an I/O error, as a host whose mount of the data failed. hang
# "n@k": on process k the n-th case never ends (until the test kills it).
_DRIVER = r"""
import errno, os, runpy, sys, time
module, fail, hang = sys.argv[1:4]
sys.argv = [module.replace(".", "/") + ".py"] + sys.argv[4:]
me = next(a.split("=")[1] for a in sys.argv if a.startswith("--process_id="))
if fail.endswith("@" + me):
    case = fail.rsplit("@", 1)[0]
    from stnjax.data.store import CaseStore
    image = CaseStore.image
    def broken(self, cid, *a, **k):
        if cid == case:
            raise OSError(errno.EIO, os.strerror(errno.EIO), f"/mnt/lost/{cid}.nii.gz")
        return image(self, cid, *a, **k)
    CaseStore.image = broken
if hang.endswith("@" + me):
    from stnjax.infer.segmenter import Segmenter
    segment_image, calls = Segmenter.segment_image, []
    def hung(self, *a, **k):
        calls.append(1)
        if len(calls) == int(hang.split("@")[0]):
            time.sleep(3600)
        return segment_image(self, *a, **k)
    Segmenter.segment_image = hung
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


COHORT_FLAGS = ("--config.infer.max_rounds=3", "--config.infer.volume_buckets=(24, 48)")
HOST_TIMEOUT = 8  # --host_timeout of the multi-process runs (s; a margin for a busy machine)


def _start_two(module: str, log_stem: Path, *args: str, fail: str = "", hang: str = ""):
    """`module` as 2 processes x 2 fake CPU devices; (processes, log files)."""
    from multiproc import _env, _free_port
    multi = (f"--coordinator=localhost:{_free_port()}", "--num_processes=2",
             f"--host_timeout={HOST_TIMEOUT}")
    procs, logs = {}, {}
    for k in (0, 1):
        logs[k] = log_stem.parent / f"{log_stem.name}-p{k}.out"
        with open(logs[k], "w") as f:
            procs[k] = subprocess.Popen(
                [sys.executable, "-c", _DRIVER, module, fail, hang, *multi,
                 f"--process_id={k}", *args],
                cwd=ROOT, env=dict(_env(2), STNJAX_HUGE_PAGES="0"), stdout=f,
                stderr=subprocess.STDOUT, text=True)
    return procs, logs


def _two_hosts(work: Path, out: Path, *extra: str, fail: str = "") -> dict:
    """launch.evaluate as 2 processes x 2 fake CPU devices; {process: (code, output)}."""
    from multiproc import _wait_all
    procs, logs = _start_two("launch.evaluate", out, f"--workdir={work}", f"--out={out}",
                             *COHORT_FLAGS, *extra, fail=fail)
    codes = _wait_all(procs, time.monotonic() + 240)
    return {k: (codes[k], logs[k].read_text()) for k in procs}


def _error_lines(res: dict) -> dict:
    """{process: its one "error: " line}, after checking there is one and no traceback."""
    lines = {}
    for k, (code, text) in res.items():
        errors = [l for l in text.splitlines() if l.startswith("error: ")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
        lines[k] = errors[0]
    return lines


def _kill_process_1_mid_evaluation(work: Path, out: Path) -> tuple[float, str]:
    """launch.evaluate on 2 processes, one device each; process 1 hangs in its
    second case and is killed (SIGKILL) once both processes recorded their
    finished cases. Returns the seconds from the kill until process 0
    exited, and its output."""
    procs, logs = _start_two("launch.evaluate", out, f"--workdir={work}", f"--out={out}",
                             *COHORT_FLAGS, "--devices=1", hang="2@1")
    deadline = time.monotonic() + 240
    try:
        while not ((out / "fold0" / "cases.p1.json").is_file() and (out / "fold0" /
                   "cases.json").is_file() and len(records.read_records(out / "fold0")) == 2):
            assert time.monotonic() < deadline and procs[0].poll() is None, \
                logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
            time.sleep(0.05)
        procs[1].kill()
        killed = time.monotonic()
        code = procs[0].wait(timeout=HOST_TIMEOUT + 60)
        waited = time.monotonic() - killed
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    text = logs[0].read_text()
    assert code == 1 and procs[1].wait() == -9, text[-3000:]
    assert _error_lines({0: (code, text)})
    return waited, text


def test_two_hosts_kill_fail_stop_resume_and_match_one_device(cohort, tmp_path):
    """launch.evaluate over 2 processes. (1) Process 1 is killed (SIGKILL) in
    its second case: process 0 notices within --host_timeout, exits with one
    error line naming the lost process and host, and keeps (merges) the cases
    both finished. (2) The same command resumes; process 0 cannot read the
    last case: both stop with one error line naming that case and host. (3)
    It resumes again and ends with the one-device records (and
    predictions), the summary written by process 0. launch.segment
    --multihost on the 4 phantom images then writes the one-device masks,
    each process its share, process 0 the merged segment.json."""
    from multiproc import _gloo_available
    if not _gloo_available():
        pytest.skip("this jaxlib has no gloo CPU collectives")
    spec, work, one = cohort
    out, ids = work / "eval-2x2", [r.case_id for r in one]
    waited, text = _kill_process_1_mid_evaluation(work, out)
    error = next(l for l in text.splitlines() if l.startswith("error: "))
    assert re.search(rf"process 1 on host \S+ was lost: no sign of life for {HOST_TIMEOUT} s "
                     r"\(killed, crashed, or its host or network failed\); process 0 on host "
                     r"\S+ stopped; kept the records \(and predictions\) of 3 finished cases",
                     error) and "a rerun resumes" in error, error
    assert waited < HOST_TIMEOUT + 15, waited
    print(f"\nkilled process 1: process 0 exited {waited:.1f} s later "
          f"(--host_timeout={HOST_TIMEOUT})")
    kept = records.read_records(out / "fold0")
    assert [r.case_id for r in kept] == ids[:3] and [r.process for r in kept] == [0, 1, 0]
    assert all((out / "fold0" / "predictions" / f"{c}.nii.gz").is_file() for c in ids[:3])
    assert not list((out / "fold0").glob("cases.p*.json")) and not (out / "summary.json").exists()

    res = _two_hosts(work, out, fail=f"{ids[3]}@0")  # the last case: process 0's share now
    for k, line in _error_lines(res).items():
        assert f"{ids[3]!r} failed on process 0 on host " in line and "(load)" in line \
            and "Input/output error" in line and "a rerun resumes" in line, line
    assert "resuming, 3 of 4 cases already evaluated" in res[0][1]
    assert " process 1 on host " in res[1][1] and " stopped; kept the records" in res[1][1]
    assert len(records.read_records(out / "fold0")) == 3

    res = _two_hosts(work, out)
    assert [c for c, _ in res.values()] == [0, 0], res[0][1][-3000:] + res[1][1][-3000:]
    final = records.read_records(out / "fold0")
    assert [records.without_run_fields(r) for r in final] == \
        [records.without_run_fields(r) for r in one]
    assert {r.process for r in final} == {0, 1}
    _same_predictions(work / "eval-1dev" / "predictions", out / "fold0" / "predictions",
                      [f"{c}.nii.gz" for c in ids])
    assert (out / "summary.json").is_file() and "results in" in res[0][1] and \
        "results in" not in res[1][1]
    _two_hosts_segment(spec, work, tmp_path)


def _two_hosts_segment(spec, work: Path, tmp_path: Path) -> None:
    """launch.segment --multihost (2 processes x 2 devices) on the 4 phantom
    images against an in-process one-device run."""
    from multiproc import _wait_all
    images = sorted(inputs.dataset_dir(spec.train.data, work).glob("images/*.nii.gz"))
    with pytest.MonkeyPatch.context() as mp:
        _one_compilation(mp)
        runs.segment_files(spec, work, [str(p) for p in images], out_dir=tmp_path / "d1",
                           devices=1)
    out = tmp_path / "h2"
    procs, logs = _start_two("launch.segment", out, f"--workdir={work}", f"--out={out}",
                             *COHORT_FLAGS, *map(str, images))
    codes = _wait_all(procs, time.monotonic() + 240)
    texts = {k: logs[k].read_text() for k in procs}
    assert [codes[0], codes[1]] == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    entries = json.loads((out / "segment.json").read_text())["inputs"]
    ref = json.loads((tmp_path / "d1" / "segment.json").read_text())["inputs"]
    assert [e["process"] for e in entries] == [0, 1, 0, 1]
    assert [_segment_result(e) for e in entries] == [_segment_result(e) for e in ref]
    _same_predictions(tmp_path / "d1", out, [Path(e["mask"]).name for e in ref])
    for k in (0, 1):  # each process wrote (and printed) its own masks
        wrote = sorted(l.split("/")[-1] for l in texts[k].splitlines() if l.startswith("wrote "))
        assert wrote == sorted(Path(e["mask"]).name for e in entries if e["process"] == k)
    assert not list(out.glob("segment.p*.json"))


def test_readme_scripted_studies_run_as_written(trained):
    """The README's second Python example (two labelled settings evaluated and
    compared, then a sweep over t), with only its WORKDIR line pointed at
    the smoke training run."""
    import contextlib
    import io
    spec, work = trained
    text = (ROOT / "README.md").read_text()
    code = text[text.index("Scripted studies:"):]
    code = code[code.index("```python\n") + 10:]
    code = code[:code.index("```")]
    code, n = re.subn(r"^WORKDIR\b.*$", f"WORKDIR = {str(work)!r}", code, count=1, flags=re.M)
    assert n == 1, "README example lost its WORKDIR line"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own README
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("coarse-saliency vs reference at t = 0.99: ")
    assert len(lines) == 1 + 2 * 6 and "reference        t = 2.0  : DSC" in lines[-1]
    sweep = (work / "sweep.csv").read_text().splitlines()
    assert len(sweep) == 1 + 2 * 6
    for label in ("reference", "coarse-saliency"):
        assert records.read_records(work / f"eval-{label}" / "fold0")[0].method == label


def test_evaluate_training_cases(trained, tmp_path, monkeypatch):
    """split="train" runs the fold's labelled training cases, scored as the
    same case is when it is a test case; an unknown split is refused before
    anything is written."""
    spec, work = trained
    data = spec.train.data
    ds_dir = inputs.dataset_dir(data, work)
    train_ids, test_ids = inputs.fold_split(data, ds_dir, inputs.open_store(data, ds_dir, work), 0)
    fit = runs.evaluate_fold(spec, work, 0, out_dir=tmp_path / "train", split="train",
                             write_predictions=False)
    assert [r.case_id for r in fit] == list(train_ids) and not set(train_ids) & set(test_ids)
    orig_split = inputs.fold_split
    monkeypatch.setattr(inputs, "fold_split",
                        lambda *a: (orig_split(*a)[0], [orig_split(*a)[0][0]]))
    as_test = runs.evaluate_fold(spec, work, 0, out_dir=tmp_path / "test", write_predictions=False)
    assert _volatile_free(as_test[0]) == _volatile_free(fit[0])
    with pytest.raises(InputError, match="split"):
        runs.evaluate_fold(spec, work, 0, out_dir=tmp_path / "bad", split="validation")
    assert not (tmp_path / "bad").exists()
