"""Real CT through the commands with data.spacing; the MSD and numbered-pair dataset readers.

The smoke run: two manually labelled BTCV volumes (512 x 512 slices at
0.7-1 mm, 3-5 mm apart) made into a dataset by `launch.make_dataset
--pair_by=number`, trained on an 8 mm grid for a few steps (one plane),
evaluated and segmented. What is checked is the geometry, against the
source files themselves: predictions and masks have the input's shape and
affine, and the recorded DSC is the DSC of the written prediction against
the source label on the source grid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BTCV = DATA / "btcv9"


def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), STNJAX_HUGE_PAGES="0", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
    return proc


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.skipif(not BTCV.is_dir(), reason=f"BTCV volumes not found under {BTCV}")
def test_btcv_smoke_train_evaluate_segment_with_spacing(tmp_path):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    # The two smallest volumes (90 and 104 slices): the least to read.
    names = sorted((p.name for p in (BTCV / "images").iterdir()),
                   key=lambda n: (BTCV / "images" / n).stat().st_size)[:2]
    for n in names:
        (imgs / n).symlink_to(BTCV / "images" / n)
        lab = n.replace("img", "label")
        (labs / lab).symlink_to(BTCV / "labels" / lab)
    ds, work = tmp_path / "ds", tmp_path / "work"
    # --no_check: training reads (and checks) both cases anyway.
    out = _ok(_cli("launch.make_dataset", f"--out={ds}", f"--images={imgs}",
                   f"--labels={labs}", "--pair_by=number", "--organ_id=6", "--no_check"))
    assert "2 cases" in out.stdout
    assert json.loads((ds / "dataset.json").read_text())["organ_id"] == 6
    # 8 mm: 45-60 pixels in-plane, one 64 bucket, few seconds a step program.
    _ok(_cli("launch.train", "--config=launch/configs/smoke.py", f"--workdir={work}",
             f"--config.data.dir={ds}", "--config.data.spacing=(8.0, 8.0, 8.0)",
             "--config.data.n_folds=2", "--config.data.buckets=(64,)",
             "--config.train.stages=J:2", "--config.train.checkpoint_every=2"))
    _ok(_cli("launch.evaluate", f"--workdir={work}", "--config.infer.max_rounds=1"))
    cases = json.loads((work / "eval" / "fold0" / "cases.json").read_text())["records"]
    assert len(cases) == 1
    rec = cases[0]
    man = json.loads((ds / "dataset.json").read_text())
    entry = next(c for c in man["cases"] if c["id"] == rec["case_id"])
    src_img, src_lab = nib.load(entry["image"]), nib.load(entry["label"])
    pred = nib.load(work / "eval" / "fold0" / "predictions" / f"{rec['case_id']}.nii.gz")
    # On the source grid: same shape and affine as the input, and the
    # recorded DSC is that of this file against the source label.
    assert pred.shape == src_img.shape
    np.testing.assert_allclose(pred.affine, src_img.affine, atol=1e-4)
    np.testing.assert_allclose(rec["spacing"], src_img.header.get_zooms()[:3], rtol=1e-4)
    mask, label = np.asarray(pred.dataobj) > 0, np.asarray(src_lab.dataobj) == 6
    key = next(iter(rec["metrics_at"]))
    assert rec["gt_voxels"] == int(label.sum())
    assert abs(rec["metrics_at"][key]["dsc"] - _dice(mask, label)) < 1e-6
    overlay = (work / "eval" / "fold0" / "overlays" / f"{rec['case_id']}.png").read_bytes()
    assert overlay[:8] == b"\x89PNG\r\n\x1a\n" and len(overlay) > 20_000
    # segment: the mask overlays its input.
    masks = tmp_path / "masks"
    _ok(_cli("launch.segment", f"--workdir={work}", f"--out={masks}",
             "--config.infer.max_rounds=1", "--preview", entry["image"]))
    seg = nib.load(next(masks.glob("*_mask.nii.gz")))
    assert next(masks.glob("*_preview.png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seg.shape == src_img.shape
    np.testing.assert_allclose(seg.affine, src_img.affine, atol=1e-4)


def _msd(root: Path, n: int = 2) -> Path:
    """An MSD-layout folder from the small real exam: pancreas 1, 'tumour' 2
    (a part of the pancreas), background 0."""
    src = DATA / "ct_example_3mm"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    lab = nib.load(src / "labels_multiclass.nii.gz")
    ids = np.asarray(lab.dataobj)
    msd = np.zeros(ids.shape, np.uint8)
    msd[ids == 7] = 1
    x = np.nonzero(ids == 7)[0]
    msd[(ids == 7) & (np.arange(ids.shape[0])[:, None, None] < np.median(x))] = 2
    training = []
    for i in range(1, n + 1):
        name = f"pancreas_{i:03d}.nii.gz"
        (root / "imagesTr" / name).symlink_to(src / "ct.nii.gz")
        nib.save(nib.Nifti1Image(msd, lab.affine), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "Pancreas", "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "training": training, "test": []}))
    return root


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real CT examples not found under {DATA}")
def test_make_dataset_msd_merges_foreground_ids_and_names_bad_folders(tmp_path):
    from stnjax.checks import DatasetError
    from stnjax.data import manifest, volume_io
    msd = _msd(tmp_path / "Task07")
    out = tmp_path / "ds"
    _ok(_cli("launch.make_dataset", f"--out={out}", f"--msd={msd}"))
    man = manifest.load_manifest(out)
    assert man.organ_id == (1, 2) and man.name == "Pancreas"
    assert man.case_ids == ("pancreas_001", "pancreas_002")
    case = volume_io.load_case(man.root / man.case("pancreas_001").image,
                               man.root / man.case("pancreas_001").label, organ_id=man.organ_id)
    lab = np.asarray(nib.load(DATA / "ct_example_3mm" / "labels_multiclass.nii.gz").dataobj)
    assert int(case.label.sum()) == int((lab == 7).sum())  # 1 and 2: the whole pancreas
    # Bad input: errors naming the folder, file or id, and no manifest written
    # (the command once, the readers directly).
    proc = _cli("launch.make_dataset", f"--out={tmp_path / 'o1'}", f"--images={msd / 'imagesTr'}",
                f"--labels={msd / 'labelsTr'}", "--organ_id=1,250")
    assert proc.returncode != 0 and "--organ_id: [250] occur in none of the 2 labels" in proc.stderr
    assert not (tmp_path / "o1" / "dataset.json").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(DatasetError, match=r"bad: no imagesTr/ folder"):
        manifest.msd_cases(bad)
    (msd / "labelsTr" / "pancreas_009.nii.gz").symlink_to(msd / "labelsTr" / "pancreas_001.nii.gz")
    with pytest.raises(DatasetError, match=r"without a partner .*labelsTr/pancreas_009\.nii\.gz"):
        manifest.msd_cases(msd)
    (msd / "labelsTr" / "pancreas_009.nii.gz").unlink()
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "background"},
                                                  "training": [{"image": "./imagesTr/x.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"training\[0\] must hold 'image' and 'label'"):
        manifest.msd_cases(msd)


def test_paired_cases_by_number_and_its_errors(tmp_path):
    from stnjax.checks import DatasetError
    from stnjax.data import manifest
    imgs, labs = tmp_path / "i", tmp_path / "l"
    imgs.mkdir()
    labs.mkdir()
    for n in ("img0001", "img0010", "._img0003"):
        (imgs / f"{n}.nii.gz").write_bytes(b"")
    for n in ("label0001", "label0010"):
        (labs / f"{n}.nii.gz").write_bytes(b"")
    cases = manifest.paired_cases(imgs, labs, pair_by="number")
    assert [(c["id"], Path(c["label"]).name) for c in cases] == [
        ("img0001", "label0001.nii.gz"), ("img0010", "label0010.nii.gz")]
    with pytest.raises(DatasetError, match="no label"):
        manifest.paired_cases(imgs, labs)  # by name: img0001 has no label0001 partner
    (labs / "lab1.nii.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="pair with the same image"):
        manifest.paired_cases(imgs, labs, pair_by="number")
