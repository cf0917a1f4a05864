"""data.spacing: resampling to a target grid and back, the store on that grid, organ id lists.

References are independent of the code under test: a linear function of
the voxel position (which linear interpolation must reproduce exactly), the
world coordinates of voxel centres through the affines, a label's distance
from its own boundary (scipy), and hand-made label maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from stnjax.checks import InputError
from stnjax.data import manifest, resample, volume_io
from stnjax.data.spec import DataSpec
from stnjax.data.store import CaseStore
from launch.configs.common import base_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_check_spacing_accepts_three_positive_numbers_and_names_the_field():
    assert resample.check_spacing(()) is None and resample.check_spacing(None) is None
    assert resample.check_spacing([3, 3.0, 2.5]) == (3.0, 3.0, 2.5)
    for bad in ((1.0, 2.0), (0.0, 1.0, 1.0), (-1, 1, 1), ("a", 1, 1), 3.0, (1, 1, float("nan"))):
        with pytest.raises(InputError, match=r"data\.spacing: expected three positive numbers"):
            resample.check_spacing(bad)
    c = base_config()
    c.data.spacing = (3.0, 0.0, 3.0)
    with pytest.raises(InputError, match=r"data\.spacing"):
        DataSpec.from_config(c.data)


def test_grid_shape_keeps_the_extent():
    assert resample.grid_shape((512, 512, 100), (0.7, 0.7, 2.5), (3.0, 3.0, 3.0)) == (119, 119, 83)
    assert resample.grid_shape((10, 1, 4), (1.0, 1.0, 1.0), (20.0, 20.0, 20.0)) == (1, 1, 1)


def test_linear_resampling_reproduces_a_linear_function():
    """f(i, j, k) = a i + b j + c k on the source voxels, resampled: each
    destination voxel must hold f at its source position (half-voxel rule),
    exactly where no clamping happens."""
    a, b, c = 0.3, -1.2, 2.0
    src = (20, 17, 9)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in src], indexing="ij")
    vol = (a * i + b * j + c * k).astype(np.float32)
    dst = (33, 8, 14)
    out = resample.resample_linear(vol, dst)
    assert out.shape == dst and out.dtype == np.float32
    pos = [(np.arange(m) + 0.5) * (n / m) - 0.5 for n, m in zip(src, dst)]
    want = (a * pos[0][:, None, None] + b * pos[1][None, :, None] + c * pos[2][None, None, :])
    inside = np.ix_(*[(p >= 0) & (p <= n - 1) for p, n in zip(pos, src)])
    np.testing.assert_allclose(out[inside], want[inside], atol=1e-4)


def test_grid_affine_maps_voxel_centres_to_the_same_world_points():
    rng = np.random.default_rng(0)
    aff = np.eye(4)
    aff[:3, :3] = np.diag([0.7, -0.8, 2.5]) @ np.linalg.qr(rng.normal(size=(3, 3)))[0]
    aff[:3, 3] = [10.0, -20.0, 5.0]
    src, dst = (50, 40, 12), (12, 11, 10)
    new = resample.grid_affine(aff, src, dst)
    for idx in [(0, 0, 0), (11, 10, 9), (3, 7, 2)]:
        pos = [(i + 0.5) * (n / m) - 0.5 for i, n, m in zip(idx, src, dst)]
        np.testing.assert_allclose(new @ [*idx, 1.0], aff @ [*pos, 1.0], atol=1e-9)


def test_label_round_trip_matches_itself_away_from_boundaries():
    """A label to a coarser grid (nearest) and back (`to_grid`) equals
    itself on every voxel farther than two coarse voxels from its boundary."""
    shape, spacing, target = (90, 80, 30), (0.8, 0.8, 2.5), (3.0, 3.0, 3.0)
    i, j, k = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    label = ((i - 36) ** 2 / 400 + (j - 30) ** 2 / 150 + (k - 40) ** 2 / 300) < 1.0
    grid = resample.grid_shape(shape, spacing, target)
    back = resample.to_grid(resample.resample_nearest(label, grid), shape)
    assert back.shape == shape and back.dtype == bool
    dist_in = ndimage.distance_transform_edt(label, sampling=spacing)
    dist_out = ndimage.distance_transform_edt(~label, sampling=spacing)
    far = (dist_in > 6.0) | (dist_out > 6.0)
    assert far.sum() > 0.5 * label.size
    np.testing.assert_array_equal(back[far], label[far])
    assert abs(int(back.sum()) - int(label.sum())) < 0.1 * label.sum()


def test_select_organ_merges_several_ids_and_names_missing_ones(tmp_path):
    lab = np.zeros((4, 4, 2), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1], lab[2, 2, 0] = 1, 2, 3
    np.testing.assert_array_equal(volume_io.select_organ(lab, [2, 1], source="x"),
                                  (lab == 1) | (lab == 2))
    assert volume_io.ids_present(lab, (1, 2, 5)) == [1, 2]
    with pytest.raises(volume_io.VolumeError, match=r"any of organ ids \[5, 6\].*present: 1, 2, 3"):
        volume_io.select_organ(lab, (6, 5), source="x")
    for bad in ([], [0], [1, True], "7"):
        with pytest.raises(InputError, match="organ_id"):
            volume_io.organ_ids(bad)


def _dataset(tmp_path: Path, n: int = 2, organ_id=7) -> Path:
    src = DATA / "ct_example_3mm"
    tmp_path.mkdir(parents=True)
    cases = [{"id": f"c{i}", "image": str(src / "ct.nii.gz"),
              "label": str(src / "labels_multiclass.nii.gz")} for i in range(n)]
    manifest.write_manifest(tmp_path, name="t", organ_id=organ_id, cases=cases)
    return tmp_path


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real CT examples not found under {DATA}")
def test_store_serves_the_resampled_grid_and_maps_back(tmp_path):
    ds = _dataset(tmp_path / "ds")
    man = manifest.load_manifest(ds)
    native = CaseStore(man, tmp_path / "cache")
    coarse = CaseStore(man, tmp_path / "cache", spacing=(4.5, 4.5, 6.0))
    case = volume_io.load_case(DATA / "ct_example_3mm" / "ct.nii.gz",
                               DATA / "ct_example_3mm" / "labels_multiclass.nii.gz", organ_id=7)
    grid = resample.grid_shape(case.image.shape, case.geometry.spacing, (4.5, 4.5, 6.0))
    assert native.shape("c0") == case.image.shape and not native.resampled("c0")
    assert coarse.shape("c0") == grid and coarse.resampled("c0")
    np.testing.assert_allclose(coarse.spacing("c0"), [4.5, 4.5, 6.0], rtol=0.02)
    np.testing.assert_allclose(coarse.native_spacing("c0"), case.geometry.spacing)
    assert coarse.native_shape("c0") == case.image.shape
    np.testing.assert_array_equal(coarse.native_label("c0"), case.label)
    np.testing.assert_array_equal(coarse.label("c0"), resample.resample_nearest(case.label, grid))
    # The HU are resampled before windowing: the cached levels decode to the
    # window of the linearly resampled image (to the uint16 quantisation).
    want = np.clip((resample.resample_linear(case.image, grid) + 100.0) / 340.0, 0.0, 1.0)
    np.testing.assert_allclose(coarse.image("c0"), want, atol=2e-5)
    # Separate cache entries: the native store is untouched by the coarse one.
    assert native._base("c0") != coarse._base("c0")
    assert native.shape("c0") == case.image.shape
    back = coarse.to_native("c0", np.asarray(coarse.label("c0")))
    assert back.shape == case.image.shape and back.dtype == bool
    assert abs(int(back.sum()) - int(case.label.sum())) < 0.5 * case.label.sum()
    with pytest.raises(InputError, match="model grid"):
        coarse.to_native("c0", np.zeros((3, 3, 3), bool))


@pytest.mark.skipif(not DATA.is_dir(), reason=f"real CT examples not found under {DATA}")
def test_store_names_an_organ_id_absent_from_every_label(tmp_path):
    ds = _dataset(tmp_path / "ds", organ_id=[7, 250])
    store = CaseStore(manifest.load_manifest(ds), tmp_path / "cache")
    assert store.organ_ids_present("c0") == (7,)
    with pytest.raises(InputError, match=r"data\.organ_ids: \[250\] of \[7, 250\] occur in no label"):
        store.check_organ_ids()
    ok = CaseStore(manifest.load_manifest(_dataset(tmp_path / "ds2", organ_id=[6, 7])),
                   tmp_path / "cache")
    ok.check_organ_ids()
    assert json.loads((tmp_path / "ds2" / "dataset.json").read_text())["organ_id"] == [6, 7]
    lab = np.asarray(nib.load(DATA / "ct_example_3mm" / "labels_multiclass.nii.gz").dataobj)
    assert int(np.asarray(ok.label("c0")).sum()) == int(np.isin(lab, (6, 7)).sum())


def test_segment_statistics_and_spacing_warning_by_hand():
    from stnjax.eval import segment as S
    hu = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 2, 1:3] = True                           # HU 21 and 22
    assert S.case_summary(mask, hu, (2.0, 1.0, 0.5)) == {
        "voxels": 2, "volume_ml": 0.002, "mean_hu": 21.5}
    assert S.case_summary(np.zeros_like(mask), hu, (1, 1, 1))["mean_hu"] is None
    ref = (np.array([0.7, 0.7, 2.5]), np.array([0.9, 0.9, 5.0]))
    assert S.spacing_warning((0.8, 0.8, 3.0), ref, "x") is None
    assert S.spacing_warning((0.8, 0.5, 7.4), ref, "x") is None       # inside 1.5x
    w = S.spacing_warning((0.8, 0.4, 8.0), ref, "the training cases' spacing")
    assert "along axis [1, 2]" in w and "0.70-0.90, 0.70-0.90, 2.50-5.00" in w
    assert S.spacing_warning((9.0, 9.0, 9.0), None, "x") is None
    assert S.training_spacing_range([{"spacing": [1, 1, 2]}, {"spacing": [3, 3, 3],
                                     "native_spacing": [0.5, 0.5, 1]}]) is not None
