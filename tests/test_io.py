"""Volume I/O: NIfTI and DICOM in, canonical PLS arrays, world alignment,
NIfTI out in the source geometry, and clear errors for bad input."""

import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from stnjax import fileio
from stnjax.data import volume_io
from stnjax.checks import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CT3 = DATA / "ct_example_3mm"
SLAB = DATA / "ct_dicom_slab"
needs_data = pytest.mark.skipif(
    not (CT3.is_dir() and SLAB.is_dir()),
    reason=f"real CT examples not found under {DATA}")


def _write(path, data, affine, dtype=None):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    nib.save(img, str(path))
    return nib.load(str(path))


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = (np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay),
                              np.cos(az), np.sin(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(codes_matrix, zooms, origin):
    a = np.eye(4)
    a[:3, :3] = np.asarray(codes_matrix, float) * np.asarray(zooms)[None, :]
    a[:3, 3] = origin
    return a


AFFINES = {
    "RAS": _affine(np.eye(3), (2.0, 3.0, 4.0), (-10.0, 20.0, 5.0)),
    "LAS": _affine(np.diag([-1, 1, 1]), (0.5, 0.75, 2.5), (100.0, -50.0, 7.0)),
    "LPI": _affine(np.diag([-1, -1, -1]), (1.0, 1.5, 3.0), (60.0, 70.0, 80.0)),
    # axes permuted: i -> superior, j -> anterior, k -> left
    "SAL": _affine([[0, 0, -1], [0, 1, 0], [1, 0, 0]], (2.0, 1.0, 3.0),
                   (1.0, 2.0, 3.0)),
    "oblique": _affine(_rotation(0.2, -0.15, 0.3), (0.9, 1.1, 2.0),
                       (-120.5, 33.25, -400.0)),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_nifti_round_trip(tmp_path, name):
    rng = np.random.default_rng(0)
    src = rng.integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    on_disk = _write(tmp_path / "img.nii.gz", src, AFFINES[name])
    vol = volume_io.load_image(tmp_path / "img.nii.gz")
    g = vol.geometry
    assert vol.data.dtype == np.float32 and vol.data.shape == g.shape
    assert nib.aff2axcodes(g.affine) == ("P", "L", "S")
    assert sorted(g.shape) == sorted(src.shape)
    # world coordinates agree: every source voxel lands on a canonical voxel
    # of the same value (exact reorientation, oblique affine kept)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in src.shape],
                               indexing="ij"), -1).reshape(-1, 3)
    world = nib.affines.apply_affine(on_disk.affine, ijk)
    can = nib.affines.apply_affine(np.linalg.inv(g.affine), world)
    np.testing.assert_allclose(can, np.round(can), atol=1e-4)
    can = np.round(can).astype(int)
    np.testing.assert_array_equal(vol.data[tuple(can.T)],
                                  src[tuple(ijk.T)].astype(np.float32))
    np.testing.assert_allclose(g.spacing, sorted_spacing(on_disk.affine, g),
                               rtol=1e-6)
    # writing back gives the file's array and affine exactly
    mask = vol.data > 0
    volume_io.save_mask(mask, g, tmp_path / "mask.nii.gz")
    back = nib.load(str(tmp_path / "mask.nii.gz"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), (src > 0))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(back.affine, on_disk.affine)
    volume_io.save_volume(vol.data, g, tmp_path / "vol.nii")
    back = nib.load(str(tmp_path / "vol.nii"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), src)
    np.testing.assert_array_equal(back.affine, on_disk.affine)
    # the geometry maps both ways
    np.testing.assert_array_equal(g.from_source(g.to_source(vol.data)), vol.data)


def sorted_spacing(affine, g):
    """Spacing per canonical axis from the source zooms, independently:
    the canonical axis that points most along a world axis gets its zoom."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    out = np.empty(3)
    for src_axis in range(3):
        world = affine[:3, src_axis] / zooms[src_axis]
        dots = np.abs(world @ (g.affine[:3, :3] / g.spacing))
        out[int(np.argmax(dots))] = zooms[src_axis]
    return out


def test_trailing_singleton_4d_is_squeezed(tmp_path):
    src = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1)
    _write(tmp_path / "a.nii", src, AFFINES["RAS"])
    vol = volume_io.load_image(tmp_path / "a.nii")
    assert vol.data.shape == (3, 2, 4)


def test_scaling_is_applied(tmp_path):
    img = nib.Nifti1Image(np.full((3, 3, 3), 100, np.int16), AFFINES["RAS"])
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    np.testing.assert_array_equal(volume_io.load_image(tmp_path / "s.nii.gz").data,
                                  -824.0)



def test_implausible_hu_is_a_warning_naming_the_file(tmp_path, caplog):
    """HU far outside body CT (a wrong rescale, 3e10) is loaded but warned
    about, with the file and the fraction of voxels; plausible HU is quiet."""
    data = np.full((4, 5, 6), 40.0, np.float32)
    data[0, :2, :3] = 3e10  # 6 of 120 voxels
    _write(tmp_path / "hot.nii.gz", data, AFFINES["RAS"])
    _write(tmp_path / "ok.nii.gz", np.full((4, 5, 6), -1000.0, np.float32), AFFINES["RAS"])
    with caplog.at_level("WARNING", logger="stnjax.data"):
        volume_io.load_image(tmp_path / "ok.nii.gz")
        assert not caplog.records
        vol = volume_io.load_image(tmp_path / "hot.nii.gz")
    assert vol.data.max() == np.float32(3e10)
    (rec,) = caplog.records
    assert "hot.nii.gz" in rec.getMessage() and "5.0000 %" in rec.getMessage()


# --------------------------------------------------------------- real data

@needs_data
def test_ct_example_3mm():
    case = volume_io.load_case(CT3 / "ct.nii.gz", CT3 / "labels_multiclass.nii.gz",
                        organ_id=7)
    raw = np.asarray(nib.load(str(CT3 / "ct.nii.gz")).dataobj)
    raw_lab = np.asarray(nib.load(str(CT3 / "labels_multiclass.nii.gz")).dataobj)
    assert raw.shape == (122, 101, 112)
    assert case.case_id == "ct"
    assert case.image.shape == (101, 122, 112) and case.image.dtype == np.float32
    np.testing.assert_allclose(case.geometry.spacing, 3.0)
    # RAS file -> PLS: axis 0 = file y reversed, axis 1 = file x reversed
    np.testing.assert_array_equal(case.image,
                                  raw.transpose(1, 0, 2)[::-1, ::-1, :])
    assert case.label.dtype == bool and int(case.label.sum()) == 695
    np.testing.assert_array_equal(
        case.label, (raw_lab == 7).transpose(1, 0, 2)[::-1, ::-1, :])
    liver = volume_io.load_case(CT3 / "ct.nii.gz", CT3 / "labels_multiclass.nii.gz",
                         organ_id=5, case_id="c1")
    assert liver.case_id == "c1" and int(liver.label.sum()) == 41692


@needs_data
def test_integral_float_labels_accepted(tmp_path):
    lab = nib.load(str(CT3 / "labels_multiclass.nii.gz"))
    ref = volume_io.load_image(CT3 / "ct.nii.gz").geometry
    data = np.asarray(lab.dataobj).astype(np.float32)
    _write(tmp_path / "f.nii.gz", data, lab.affine)
    got = volume_io.load_label_map(tmp_path / "f.nii.gz", ref)
    assert got.dtype.kind in "iu"
    want = volume_io.load_label_map(CT3 / "labels_multiclass.nii.gz", ref)
    np.testing.assert_array_equal(got, want)
    data[10, 10, 10] = 7.5
    _write(tmp_path / "g.nii.gz", data, lab.affine)
    with pytest.raises(volume_io.VolumeError, match=r"g\.nii\.gz.*non-integral.*7\.5"):
        volume_io.load_label_map(tmp_path / "g.nii.gz", ref)


@pytest.fixture(scope="module")
def slab():
    if not SLAB.is_dir():
        pytest.skip(f"DICOM example not found under {SLAB}")
    vol = volume_io.load_image(SLAB / "dicom")
    lab = volume_io.load_label_map(SLAB / "labels_multiclass.nii.gz", vol.geometry)
    return vol, lab


@needs_data
def test_dicom_decode_and_rescale(slab):
    vol, _ = slab
    g = vol.geometry
    assert vol.data.shape == (512, 512, 20) and vol.data.dtype == np.float32
    np.testing.assert_allclose(g.spacing, [0.9765625, 0.9765625, 2.0])
    # air in front of the body (axis 0 runs anterior -> posterior)
    assert abs(float(np.median(vol.data[30, 200:300, :])) + 1000) < 30
    assert abs(float(np.median(vol.data[vol.data < -500])) + 1000) < 30
    # the most inferior slice (z = -804.5) is canonical slice 0, rows and
    # columns as stored; HU = stored value * slope + intercept
    files = sorted((SLAB / "dicom").iterdir())
    ds = min((pydicom.dcmread(f) for f in files),
             key=lambda d: float(d.ImagePositionPatient[2]))
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"
    want = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(vol.data[:, :, 0], want)
    # the affine follows the headers: voxel 0 at the slice's position (LPS ->
    # RAS), one row further is +0.977 mm along LPS y
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(g.affine @ [0, 0, 0, 1],
                               [-ipp[0], -ipp[1], ipp[2], 1])
    np.testing.assert_allclose(g.affine @ [1, 0, 19, 1] - g.affine @ [0, 0, 0, 1],
                               [0, -0.9765625, 38.0, 0])


@needs_data
def test_dicom_label_aligned_in_world_space(slab):
    vol, lab = slab
    expect = {5: 89.0, 7: 61.0, 1: 80.0}   # liver, pancreas, spleen
    for organ, hu in expect.items():
        mask = volume_io.select_organ(lab, organ, source="slab")
        assert abs(float(vol.data[mask].mean()) - hu) < 3, organ
    pancreas = lab == 7
    assert int(pancreas.sum()) == 1327
    assert set(np.flatnonzero(pancreas.any(axis=(0, 1)))) <= {0, 1, 2, 3}
    # the check is meaningful: the reference's naive loading (label array
    # transposed to row/column, slices by index) gives other statistics
    raw = np.asarray(nib.load(str(SLAB / "labels_multiclass.nii.gz")).dataobj)
    naive = raw.transpose(1, 0, 2)
    for organ, hu in expect.items():
        assert abs(float(vol.data[naive == organ].mean()) - hu) > 30, organ


@needs_data
def test_dicom_mask_written_in_source_geometry(slab, tmp_path):
    vol, lab = slab
    mask = lab == 7
    volume_io.save_mask(mask, vol.geometry, tmp_path / "pancreas.nii.gz")
    back = nib.load(str(tmp_path / "pancreas.nii.gz"))
    np.testing.assert_allclose(back.affine, vol.geometry.source_affine,
                               atol=1e-4)
    assert back.shape == (512, 512, 20)
    np.testing.assert_array_equal(np.asarray(back.dataobj),
                                  vol.geometry.to_source(mask))
    # and it loads back onto the image grid
    again = volume_io.load_label_map(tmp_path / "pancreas.nii.gz", vol.geometry)
    np.testing.assert_array_equal(again.astype(bool), mask)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@needs_data
def test_mismatched_pairs_name_both_files(slab, tmp_path):
    vol, _ = slab
    with pytest.raises(volume_io.GeometryError) as err:
        volume_io.load_label_map(CT3 / "labels_multiclass.nii.gz", vol.geometry)
    msg = str(err.value)
    assert str(CT3 / "labels_multiclass.nii.gz") in msg
    assert str(SLAB / "dicom") in msg and "shape" in msg
    # same grid, origin shifted by 1.5 mm
    lab = nib.load(str(CT3 / "labels_multiclass.nii.gz"))
    ref = volume_io.load_image(CT3 / "ct.nii.gz").geometry
    for shift, ok in ((1.5, False), (0.01, True)):
        aff = lab.affine.copy()
        aff[:3, 3] += [0.0, shift, 0.0]
        _write(tmp_path / "shifted.nii.gz", np.asarray(lab.dataobj), aff)
        if ok:
            volume_io.load_label_map(tmp_path / "shifted.nii.gz", ref)
            continue
        with pytest.raises(volume_io.GeometryError,
                           match=r"shifted\.nii\.gz.*ct\.nii\.gz.*1\.5 mm apart"):
            volume_io.load_label_map(tmp_path / "shifted.nii.gz", ref)
        with pytest.raises(volume_io.GeometryError):
            volume_io.load_case(CT3 / "ct.nii.gz", tmp_path / "shifted.nii.gz")


# --------------------------------------------------------------- bad input

def test_missing_and_non_nifti_files(tmp_path):
    with pytest.raises(volume_io.VolumeError, match=r"nope\.nii\.gz: no such file"):
        volume_io.load_image(tmp_path / "nope.nii.gz")
    (tmp_path / "text.nii.gz").write_text("not an image\n")
    with pytest.raises(volume_io.VolumeError, match=r"text\.nii\.gz: not a readable NIfTI"):
        volume_io.load_image(tmp_path / "text.nii.gz")
    (tmp_path / "blob.dat").write_bytes(os.urandom(300))
    with pytest.raises(volume_io.VolumeError, match=r"blob\.dat"):
        volume_io.load_image(tmp_path / "blob.dat")
    with pytest.raises(volume_io.VolumeError, match=r"lab\.nii: no such file"):
        volume_io.load_label_map(tmp_path / "lab.nii",
                          volume_io.Geometry.from_affine(np.eye(4), (2, 2, 2), "x"))
    # A symlink loop and a broken link say so (not "no such file").
    (tmp_path / "loop_a.nii.gz").symlink_to(tmp_path / "loop_b.nii.gz")
    (tmp_path / "loop_b.nii.gz").symlink_to(tmp_path / "loop_a.nii.gz")
    with pytest.raises(volume_io.VolumeError, match=r"loop_a\.nii\.gz: a symbolic link loop"):
        volume_io.load_image(tmp_path / "loop_a.nii.gz")
    (tmp_path / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(volume_io.VolumeError, match=r"dangling\.nii\.gz: a broken symbolic link "
                                                    r"\(to .*gone\.nii\.gz"):
        volume_io.load_image(tmp_path / "dangling.nii.gz")


@pytest.mark.parametrize("shape, kind", [((5, 6), "2D"), ((4, 4, 4, 2), "4D")])
def test_rejects_non_3d(tmp_path, shape, kind):
    _write(tmp_path / "v.nii.gz", np.zeros(shape, np.float32), np.eye(4))
    with pytest.raises(volume_io.VolumeError,
                       match=rf"v\.nii\.gz: expected a 3D volume, got a {kind}"):
        volume_io.load_image(tmp_path / "v.nii.gz")


def test_rejects_nan_voxels(tmp_path):
    data = np.zeros((3, 3, 3), np.float32)
    data[1, 1, 1], data[0, 0, 0] = np.nan, np.inf
    _write(tmp_path / "n.nii.gz", data, np.eye(4))
    with pytest.raises(volume_io.VolumeError, match=r"n\.nii\.gz: 2 NaN or infinite"):
        volume_io.load_image(tmp_path / "n.nii.gz")


def test_select_organ_errors():
    lab = np.zeros((3, 3, 3), np.uint8)
    with pytest.raises(volume_io.VolumeError, match="lab.nii: empty label"):
        volume_io.select_organ(lab, 1, source="lab.nii")
    lab[0, 0, 0], lab[1, 1, 1] = 3, 5
    with pytest.raises(volume_io.VolumeError,
                       match=r"lab.nii: no voxel with organ_id=7; ids present: 3, 5"):
        volume_io.select_organ(lab, 7, source="lab.nii")
    np.testing.assert_array_equal(volume_io.select_organ(lab, 5, source="x"), lab == 5)


def test_save_errors_before_writing(tmp_path):
    g = volume_io.Geometry.from_affine(AFFINES["LAS"], (4, 5, 6), "img.nii")
    mask = np.zeros(g.shape, bool)
    with pytest.raises(volume_io.VolumeError, match="does not exist"):
        volume_io.save_mask(mask, g, tmp_path / "missing" / "m.nii.gz")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(volume_io.VolumeError, match="is not a folder"):
        volume_io.save_mask(mask, g, tmp_path / "afile" / "m.nii.gz")
    with pytest.raises(volume_io.VolumeError, match="must end in .nii"):
        volume_io.save_mask(mask, g, tmp_path / "m.png")
    with pytest.raises(InputError, match=r"expected shape \(5, 4, 6\)"):
        volume_io.save_mask(np.zeros((4, 5, 6), bool), g, tmp_path / "m.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores folder permissions")
def test_unwritable_folder(tmp_path):
    g = volume_io.Geometry.from_affine(np.eye(4), (2, 2, 2), "img.nii")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(volume_io.VolumeError, match="not writable"):
            volume_io.save_mask(np.ones((2, 2, 2), bool), g, locked / "m.nii.gz")
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_unwritable_folder_any_user(tmp_path, monkeypatch):
    # root ignores permission bits, so simulate the OS answers
    g = volume_io.Geometry.from_affine(np.eye(4), (2, 2, 2), "img.nii")
    mask = np.ones((2, 2, 2), bool)
    real_access = os.access
    monkeypatch.setattr(volume_io.os, "access", lambda p, mode: (
        False if Path(p) == tmp_path else real_access(p, mode)))
    with pytest.raises(volume_io.VolumeError, match=rf"{tmp_path} is not writable"):
        volume_io.save_mask(mask, g, tmp_path / "m.nii.gz")
    monkeypatch.setattr(volume_io.os, "access", real_access)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(fileio, "_create_file", refuse)  # the temp file
    with pytest.raises(volume_io.VolumeError, match="cannot write in"):
        volume_io.save_mask(mask, g, tmp_path / "m.nii.gz")
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    g = volume_io.Geometry.from_affine(np.eye(4), (2, 2, 2), "img.nii")
    out = tmp_path / "m.nii.gz"
    volume_io.save_mask(np.ones((2, 2, 2), bool), g, out)
    before = out.read_bytes()

    def disk_full(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(volume_io.nib, "save", disk_full)
    with pytest.raises(volume_io.VolumeError, match="No space left"):
        volume_io.save_mask(np.zeros((2, 2, 2), bool), g, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_mask_gets_umask_permissions(tmp_path, umask, mode):
    # A prediction is shared with others: world-readable when the umask
    # allows it (mkstemp would make it 0o600 whatever the umask).
    g = volume_io.Geometry.from_affine(np.eye(4), (2, 2, 2), "img.nii")
    old = os.umask(umask)
    try:
        volume_io.save_mask(np.ones((2, 2, 2), bool), g, tmp_path / "m.nii.gz")
        volume_io.save_mask(np.zeros((2, 2, 2), bool), g, tmp_path / "m.nii.gz")  # replaced
    finally:
        os.umask(old)
    got = stat.S_IMODE(os.stat(tmp_path / "m.nii.gz").st_mode)
    assert got == mode, oct(got)
    assert bool(got & stat.S_IROTH) == (umask == 0o022 or umask == 0o002)
    assert not nib.load(str(tmp_path / "m.nii.gz")).get_fdata().any()


def test_missing_world_position_warns(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), None)
    nib.save(img, str(tmp_path / "nocode.nii"))
    with pytest.warns(UserWarning, match=r"nocode\.nii: sform_code and qform_code"):
        volume_io.load_image(tmp_path / "nocode.nii")


# ----------------------------------------------------------- bad DICOM

def _slab_files():
    files = sorted((SLAB / "dicom").iterdir())
    # name order is position order here (descending z); keep it explicit
    return sorted(files, key=lambda f: float(
        pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def slab_files():
    if not SLAB.is_dir():
        pytest.skip(f"DICOM example not found under {SLAB}")
    return _slab_files()


def _copy(files, folder):
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


def _edit(path, fn):
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path)


def test_dicom_gap_and_duplicates(slab_files, tmp_path):
    gap = _copy(slab_files[0:3] + slab_files[4:6], tmp_path / "gap")
    with pytest.raises(volume_io.VolumeError,
                       match=r"gap.*uneven slice spacing.*median step 2\.000 mm, "
                             r"but 4\.000 mm"):
        volume_io.load_image(gap)
    dup = _copy(slab_files[0:4], tmp_path / "dup")
    shutil.copy(slab_files[2], dup / "copy_of_2")
    with pytest.raises(volume_io.VolumeError, match=r"dup.*duplicate slice position"):
        volume_io.load_image(dup)


def test_dicom_mixed_sizes_and_orientations(slab_files, tmp_path):
    mixed = _copy(slab_files[0:4], tmp_path / "mixed")
    small = mixed / slab_files[1].name

    def shrink(ds):
        ds.set_pixel_data(ds.pixel_array[:256, :256].copy(), "MONOCHROME2", 12)
    _edit(small, shrink)
    assert pydicom.dcmread(small).Rows == 256
    with pytest.raises(volume_io.VolumeError,
                       match=rf"mixed.*mixed sizes.*256x256 in {small.name}"):
        volume_io.load_image(mixed)
    tilted = _copy(slab_files[0:4], tmp_path / "tilted")

    def tilt(ds):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.99980, 0.02]
    _edit(tilted / slab_files[2].name, tilt)
    with pytest.raises(volume_io.VolumeError, match="tilted.*mixed slice orientations"):
        volume_io.load_image(tilted)


def test_dicom_series_choice_and_skipped_files(slab, slab_files, tmp_path):
    two = _copy(slab_files[0:4], tmp_path / "two")
    for f in slab_files[2:4]:
        _edit(two / f.name, lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.3.4"))
    with pytest.raises(volume_io.VolumeError,
                       match=r"(?s)holds 2 series.*series_uid='1\.2\.3\.4': 2 file"):
        volume_io.load_image(two)
    full = slab[0].data
    np.testing.assert_array_equal(volume_io.load_image(two, series_uid="1.2.3.4").data,
                                  full[:, :, 2:4])
    np.testing.assert_array_equal(volume_io.load_image(two, series_uid="").data,
                                  full[:, :, 0:2])
    with pytest.raises(volume_io.VolumeError, match="no series with series_uid='9'"):
        volume_io.load_image(two, series_uid="9")
    extra = _copy(slab_files[0:3], tmp_path / "extra")
    (extra / "README.txt").write_text("notes\n")
    with pytest.warns(UserWarning, match=r"skipped 1 file.*README\.txt"):
        vol = volume_io.load_image(extra)
    assert vol.data.shape == (512, 512, 3)


def test_dicom_missing_pixels_and_empty_folders(slab_files, tmp_path):
    nopix = _copy(slab_files[0:3], tmp_path / "nopix")
    _edit(nopix / slab_files[1].name, lambda ds: delattr(ds, "PixelData"))
    with pytest.raises(volume_io.VolumeError, match=rf"{slab_files[1].name}: no pixel data"):
        volume_io.load_image(nopix)
    # Truncated copies: cut inside the pixel data (pydicom then returns an
    # empty dataset and only warns) and inside the header.
    for keep, want in ((0.5, r"truncated or corrupt \(\d+ bytes; pydicom: End of file"),
                       (2000, r"no pixel data and no image size: the file \(2000 bytes\) "
                              r"ends .* probably truncated")):
        cut = _copy(slab_files[0:3], tmp_path / f"cut{keep}")
        f = cut / slab_files[1].name
        data = f.read_bytes()
        f.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
        with pytest.raises(volume_io.VolumeError, match=rf"{slab_files[1].name}: {want}"):
            volume_io.load_image(cut)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(volume_io.VolumeError, match="empty: no files"):
        volume_io.load_image(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    with pytest.raises(volume_io.VolumeError, match="neither a NIfTI file nor a folder"):
        with pytest.warns(UserWarning):
            volume_io.load_image(junk)
    with pytest.raises(volume_io.VolumeError, match="single DICOM file: pass the folder"):
        volume_io.load_image(slab_files[0])
