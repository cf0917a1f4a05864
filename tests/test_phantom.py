"""Synthetic CT phantoms: determinism, anatomy statistics, difficulty,
dataset writing and the make_phantoms launcher."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from stnjax.data import manifest
from stnjax.data import volume_io
from stnjax.phantom import volumes as phantom
from stnjax.phantom import dataset as phantom_dataset
from stnjax.checks import InputError

SMALL = phantom.PhantomConfig(shape=(48, 48, 24))
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def cases():
    """Default-size cases (the shape the dataset ships with)."""
    out = []
    for s in SEEDS:
        t = time.perf_counter()
        p = phantom.render_phantom(s)
        out.append((p, time.perf_counter() - t))
    return out


def test_deterministic_by_seed():
    a = phantom.make_phantom(7, SMALL)
    b = phantom.make_phantom(7, SMALL)
    c = phantom.make_phantom(8, SMALL)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    hu, labels, spacing = a
    assert hu.dtype == np.float32 and labels.dtype == np.uint8
    assert hu.shape == labels.shape == (48, 48, 24)
    np.testing.assert_allclose(spacing, np.asarray(phantom.REFERENCE_FOV_MM) / (48, 48, 24))
    assert np.all(hu == np.round(hu)) and hu.min() >= -1024 and hu.max() <= 3071
    assert set(np.unique(labels)) <= {0, *phantom.LABELS}


def test_fast_and_default_shape(cases):
    p, _ = cases[0]
    assert p.hu.shape == (128, 128, 64)
    np.testing.assert_allclose(p.spacing, (2.5, 2.5, 4.0))  # anisotropic like real CT
    # "well under 1 s" per case; a generous bound on a busy 2-core CI box.
    assert min(t for _, t in cases) < 2.0


def test_pancreas_small_and_spread_over_slices(cases):
    for p, _ in cases:
        pan = p.labels == phantom.PANCREAS_ID
        per_slice = pan.sum(axis=(0, 1)) / (pan.shape[0] * pan.shape[1])  # axial = Z
        assert per_slice.max() < 0.015, per_slice.max()
        assert np.count_nonzero(per_slice) >= 8
        # one connected, curved organ: spans far more in L-R than it is thick
        lab, n = ndimage.label(pan)
        assert np.bincount(lab.ravel())[1:].max() > 0.9 * pan.sum()
        extent = np.ptp(np.argwhere(pan), axis=0) * p.spacing
        assert extent[1] > 80  # mm, head to tail
    # the other organs with their TotalSegmentator ids are present
    present = set(np.unique(cases[0][0].labels))
    assert {1, 2, 3, 5, 6, 7, 19, 52, 63, 64} <= present


# Realistic HU (portal-venous CT), means within tolerance; big structures
# are eroded by one voxel so that the partial-volume rim does not count.
HU_RANGES = {
    "subcutaneous fat": (-120, -85), "muscle": (35, 65), "liver": (75, 110),
    "spleen": (85, 125), "kidney cortex": (140, 215), "pancreas": (55, 110),
    "aorta": (150, 215), "portal/splenic vein": (130, 200), "vertebrae": (380, 700),
    "air outside": (-1010, -990), "lung": (-900, -780),
}


def _tissue_masks(p):
    t, lab = p.tissue, p.labels
    ero = ndimage.binary_erosion
    return {
        "subcutaneous fat": ero(t == phantom.TISSUE_ID["subcutaneous_fat"]),
        "muscle": ero(np.isin(lab, (86, 87, 88, 89))), "liver": ero(lab == 5),
        "spleen": ero(lab == 1), "kidney cortex": ero(t == phantom.TISSUE_ID["kidney_cortex"]),
        "pancreas": lab == 7, "aorta": ero(lab == 52), "portal/splenic vein": lab == 64,
        "vertebrae": ero(np.isin(lab, range(27, 36))),
        "air outside": ero(t == phantom.TISSUE_ID["air"]),
        "lung": ero(np.isin(lab, (11, 14))),
    }


def test_tissue_hu_in_documented_ranges(cases):
    for p, _ in cases:
        for name, mask in _tissue_masks(p).items():
            assert mask.sum() > 20, name
            lo, hi = HU_RANGES[name]
            assert lo <= p.hu[mask].mean() <= hi, (name, float(p.hu[mask].mean()))
        stomach = p.hu[p.labels == 6]
        assert stomach.min() < -900  # the air pocket
        assert (stomach > 0).mean() > 0.3  # wall and content


def test_cases_vary(cases):
    pans = [p.labels == 7 for p, _ in cases]
    volumes = np.array([m.sum() for m in pans])
    centroids = np.array([np.argwhere(m).mean(0) for m in pans])
    assert np.ptp(volumes) > 0.1 * volumes.mean()
    assert np.ptp(centroids, axis=0).max() > 2.0  # voxels
    bodies = [np.count_nonzero(p.tissue != phantom.TISSUE_ID["air"]) for p, _ in cases]
    assert len(set(bodies)) == len(bodies)


def test_pancreas_intensity_overlaps_its_neighbours(cases):
    """Within 10 mm of the pancreas, bowel, duodenum, lymph nodes and gut walls
    share its HU: intensity alone cannot separate them."""
    bins = np.arange(-200, 310, 10)
    soft = [phantom.TISSUE_ID[k] for k in ("lymph_node", "gut_wall", "gut_chyme")]
    for p, _ in cases:
        pan = p.labels == 7
        dist = ndimage.distance_transform_edt(~pan, sampling=p.spacing)
        shell = (dist > 0) & (dist <= 10)
        neigh = shell & (np.isin(p.labels, (18, 19)) | np.isin(p.tissue, soft))
        assert neigh.sum() > 100
        hp = np.histogram(p.hu[pan], bins)[0] / pan.sum()
        hn = np.histogram(p.hu[neigh], bins)[0] / neigh.sum()
        assert np.minimum(hp, hn).sum() > 0.3  # overlap coefficient of the HU histograms
        lo, hi = np.percentile(p.hu[pan], [10, 90])
        assert np.mean((p.hu[shell] >= lo) & (p.hu[shell] <= hi)) > 0.1


def test_config_validation():
    with pytest.raises(InputError, match="shape"):
        phantom.PhantomConfig(shape=(64, 64))
    with pytest.raises(InputError, match="spacing"):
        phantom.PhantomConfig(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="noise_hu"):
        phantom.PhantomConfig(noise_hu=-1)
    with pytest.raises(InputError, match="seed"):
        phantom.make_phantom(-1, SMALL)


def test_written_dataset_keeps_geometry(tmp_path):
    cfg = phantom.PhantomConfig(shape=(40, 40, 20), spacing=(0.8, 0.8, 2.5))
    out = phantom_dataset.write_phantom_dataset(tmp_path / "ds", num_cases=4, seed=3, config=cfg)
    m = manifest.load_manifest(out)
    assert m.organ_id == 7 and m.case_ids == tuple(f"phantom_{i:03d}" for i in range(4))
    assert manifest.read_fold_table(out) == {f: [f"phantom_{f:03d}"] for f in range(4)}
    img = nib.load(str(m.cases[1].image))
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 2.5))
    assert nib.aff2axcodes(img.affine) == ("P", "L", "S")
    case = volume_io.load_case(m.cases[1].image, m.cases[1].label, organ_id=7)
    hu, labels, spacing = phantom.make_phantom(m.cases[1].extra["seed"], cfg)
    np.testing.assert_array_equal(case.image, hu)
    np.testing.assert_array_equal(case.label, labels == 7)
    np.testing.assert_allclose(case.geometry.spacing, spacing)
    assert m.cases[1].extra["seed"] == phantom_dataset.case_seed(3, 1)


def test_dataset_overwrite_rules(tmp_path):
    out = tmp_path / "ds"
    old_mask = os.umask(0o022)
    try:
        phantom_dataset.write_phantom_dataset(out, num_cases=4, seed=0, config=SMALL)
    finally:
        os.umask(old_mask)
    # a shared dataset: the umask's permissions, not the private ones of mkdtemp
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [out, *out.rglob("*")]}
    assert modes["."] == modes["images"] == 0o755 and modes["dataset.json"] == 0o644
    assert all(m == (0o755 if (out / k).is_dir() else 0o644) for k, m in modes.items()), modes
    stamp = (out / "dataset.json").stat().st_mtime_ns
    phantom_dataset.write_phantom_dataset(out, num_cases=4, seed=0, config=SMALL)  # same: kept
    assert (out / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="different dataset"):
        phantom_dataset.write_phantom_dataset(out, num_cases=4, seed=1, config=SMALL)
    phantom_dataset.write_phantom_dataset(out, num_cases=5, seed=1, config=SMALL, overwrite=True)
    assert len(manifest.load_manifest(out)) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a dataset"):
        phantom_dataset.write_phantom_dataset(other, num_cases=4, config=SMALL, overwrite=True)
    assert (other / "x.txt").read_text() == "keep me"


def test_make_phantoms_cli(tmp_path):
    # A subprocess: absl flags are process-global and other launchers define
    # flags with the same names (--out, --overwrite).
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "launch.make_phantoms", f"--out={out}", "--num_cases=4",
           "--seed=2", "--shape=32,32,16", "--spacing=1.0,1.0,3.0"]
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    text = run.stdout
    assert "4 cases" in text and "phantom_003" in text and "max_frac%" in text
    other = [c.replace("--seed=2", "--seed=3") for c in cmd]  # a different dataset
    again = subprocess.run(other, cwd=root, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "different dataset" in again.stdout + again.stderr
    rows = phantom_dataset.summarize_dataset(out)
    labels = [nib.load(str(c.label)).get_fdata() for c in manifest.load_manifest(out).cases]
    for row, lab in zip(rows, labels):  # the summary against a direct count
        pan = lab == 7
        assert row["organ_voxels"] == pan.sum()
        assert row["max_organ_fraction"] == pytest.approx(pan.sum((0, 1)).max() / (32 * 32))
    gen = json.loads((out / "dataset.json").read_text())["generator"]
    assert gen["config"]["spacing"] == [1.0, 1.0, 3.0] and gen["seed"] == 2
