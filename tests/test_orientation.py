"""`data.orientation`: the official RSTN pipeline's voxel order (DICOM rows,
DICOM columns, slices by InstanceNumber; a NIfTI's stored array transposed
(1, 0, 2)) next to the canonical PLS one, checked against independent
readings of tiny synthetic files (nibabel's own array, pydicom's pixel
arrays stacked by InstanceNumber - 1), and written back onto the input.
"""

import json

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from stnjax.checks import InputError, VolumeError
from stnjax.data import manifest, orientation, volume_io
from stnjax.data.spec import DataSpec
from stnjax.data.store import CaseStore
from stnjax.eval import segment as seg_lib
from stnjax.train import workdir

RNG = np.random.default_rng(15)


def _nifti(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


# Stored axes: i -> inferior (z flipped), j -> right, k -> posterior (permuted).
ODD_AFFINE = np.array([[0.0, 0.8, 0.0, -20.0],
                       [0.0, 0.0, -1.25, 30.0],
                       [-2.5, 0.0, 0.0, 40.0],
                       [0.0, 0.0, 0.0, 1.0]])


def test_official_nifti_is_the_stored_array_transposed(tmp_path):
    stored = RNG.integers(-900, 900, size=(5, 6, 7)).astype(np.int16)
    f = _nifti(tmp_path / "ct.nii.gz", stored, ODD_AFFINE)
    vol = volume_io.load_image(f, orientation="official")
    want = nib.load(str(f)).get_fdata().transpose(1, 0, 2)    # the official nii2npy
    assert vol.data.dtype == np.float32 and vol.data.shape == (6, 5, 7)
    np.testing.assert_array_equal(vol.data, want)
    g = vol.geometry
    assert g.orientation == "official" and g.shape == (6, 5, 7)
    # The affine stays exact: model voxel (j, i, k) is stored voxel (i, j, k).
    for i, j, k in ((0, 0, 0), (4, 5, 6), (1, 3, 2)):
        np.testing.assert_allclose(g.affine @ [j, i, k, 1], ODD_AFFINE @ [i, j, k, 1])
    np.testing.assert_allclose(g.spacing, [0.8, 2.5, 1.25])   # per model axis
    # Canonical PLS is still the default, and the official volume maps onto it.
    canon = volume_io.load_image(f)
    assert canon.geometry.orientation == "canonical" and canon.data.shape == (7, 6, 5)
    np.testing.assert_array_equal(g.to_canonical(vol.data), canon.data)
    np.testing.assert_array_equal(g.from_canonical(canon.data), vol.data)
    np.testing.assert_allclose(g.spacing_to_canonical(g.spacing), canon.geometry.spacing)
    # A mask written back lies on the input: its stored order and affine.
    mask = vol.data > 100
    volume_io.save_mask(mask, g, tmp_path / "mask.nii.gz")
    back = nib.load(str(tmp_path / "mask.nii.gz"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask.transpose(1, 0, 2))
    np.testing.assert_allclose(back.affine, ODD_AFFINE, atol=1e-6)
    # ... and a label stored as the image comes out as the official transpose.
    case = volume_io.load_case(f, tmp_path / "mask.nii.gz", organ_id=1, orientation="official")
    np.testing.assert_array_equal(case.label, mask)
    np.testing.assert_array_equal(case.image, vol.data)


def _dicom_series(folder, instance_numbers, *, rows=6, cols=5):
    """A tiny CT series, one file per slice (position k at z = -100 + 2.5 k,
    axial, rows posterior, columns left), named in a shuffled order;
    returns {InstanceNumber: HU slice (rows, cols)}."""
    folder.mkdir()
    uid, hu = generate_uid(), {}
    names = RNG.permutation(len(instance_numbers))
    for k, n in enumerate(instance_numbers):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.preamble = meta, b"\0" * 128
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", uid
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-10.0, 20.0, -100.0 + 2.5 * k]
        ds.PixelSpacing = [0.7, 0.9]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if n is not None:
            ds.InstanceNumber = n
        stored = RNG.integers(0, 2000, size=(rows, cols)).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}.dcm", enforce_file_format=True)
        hu[n] = stored.astype(np.float32) - 1024
    return hu


@pytest.mark.parametrize("run", ["superior_to_inferior", "inferior_to_superior"])
def test_official_dicom_follows_instance_number(tmp_path, run):
    nums = [4, 3, 2, 1] if run == "superior_to_inferior" else [1, 2, 3, 4]  # by position
    hu = _dicom_series(tmp_path / "ct", nums)
    vol = volume_io.load_image(tmp_path / "ct", orientation="official")
    # dicom2npy: array[:, :, InstanceNumber - 1] = the slice's pixels (rescaled here).
    want = np.stack([hu[n] for n in sorted(hu)], axis=2)
    np.testing.assert_array_equal(vol.data, want)
    # Voxel (0, 0, k) lies at the position of InstanceNumber k + 1 (LPS -> RAS).
    g = vol.geometry
    for k in range(4):
        z = -100.0 + 2.5 * nums.index(k + 1)
        np.testing.assert_allclose(g.affine @ [0, 0, k, 1], [10.0, -20.0, z, 1])
    np.testing.assert_allclose(g.spacing, [0.7, 0.9, 2.5])
    # Canonical stays PLS: slices inferior -> superior, whatever InstanceNumber does.
    canon = volume_io.load_image(tmp_path / "ct")
    by_position = np.stack([hu[n] for n in nums], axis=2)
    np.testing.assert_array_equal(canon.data, by_position)
    np.testing.assert_array_equal(g.to_canonical(vol.data), canon.data)
    # A mask of the official layout, written back, overlays the series.
    mask = vol.data > 0
    volume_io.save_mask(mask, g, tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(
        volume_io.load_label_map(tmp_path / "mask.nii.gz", canon.geometry).astype(bool),
        g.to_canonical(mask))
    np.testing.assert_array_equal(
        volume_io.load_label_map(tmp_path / "mask.nii.gz", g).astype(bool), mask)


def test_official_dicom_refuses_instance_numbers_out_of_order(tmp_path):
    _dicom_series(tmp_path / "mixed", [1, 3, 2, 4])
    with pytest.raises(VolumeError, match=r"mixed: data.orientation='official'.*"
                                          r"not run strictly one way.*: 3, .*: 2"):
        volume_io.load_image(tmp_path / "mixed", orientation="official")
    _dicom_series(tmp_path / "none", [1, 2, None, 4])
    with pytest.raises(VolumeError, match=r"none: .*1 file\(s\) carry none"):
        volume_io.load_image(tmp_path / "none", orientation="official")
    for folder in ("mixed", "none"):  # the canonical order needs no InstanceNumber
        assert volume_io.load_image(tmp_path / folder).data.shape == (6, 5, 4)


def _data_section(**fields):
    d = {"dir": "/data/x", "organ_id": 1, "hu_window": (-100.0, 240.0), "planes": "XYZ",
         "folds": "0", "n_folds": 4, "fold_rule": "position", "slice_threshold": 0.98,
         "buckets": (512,), "batch_size": 1, "order": "uniform", "cache_dir": "",
         "phantom": {"num_cases": 8, "shape": (8, 8, 8), "spacing": None, "seed": 0}}
    return {**d, **fields}


def test_orientation_refusals_name_the_field(tmp_path):
    assert DataSpec.from_config(_data_section()).orientation == "canonical"  # older configs
    assert DataSpec.from_config(_data_section(orientation="official")).orientation == "official"
    for fields, match in (
            ({"orientation": "sideways"}, r"data.orientation: expected one of \('canonical', "
                                          r"'official'\), got 'sideways'"),
            ({"orientation": "official", "spacing": (1, 1, 2)},
             r"data.orientation: 'official' .* never resampled .* data.spacing is \[1.0"),
            ({"orientation": "official", "dir": ""}, r"data.orientation: .* phantoms")):
        with pytest.raises(InputError, match=match):
            DataSpec.from_config(_data_section(**fields))
    with pytest.raises(InputError, match="orientation: expected one of"):
        volume_io.load_image(tmp_path / "anything.nii", orientation="PLS")
    # Canonical configs keep their identity; the official order is another model.
    rec = {"data": _data_section(orientation="canonical"), "model": {}, "train": {}}
    old = json.loads(json.dumps(rec))
    del old["data"]["orientation"]
    assert workdir.config_hash(old) == workdir.config_hash(rec)
    rec["data"]["orientation"] = "official"
    assert workdir.config_hash(old) != workdir.config_hash(rec)


def test_case_store_serves_the_official_layout(tmp_path):
    stored = RNG.integers(-90, 200, size=(5, 6, 7)).astype(np.int16)
    label = np.zeros(stored.shape, np.uint8)
    label[1:4, 2:5, 2:6] = 1
    ds = tmp_path / "ds"
    ds.mkdir()
    _nifti(ds / "c0.nii.gz", stored, ODD_AFFINE)
    _nifti(ds / "c0_label.nii.gz", label, ODD_AFFINE)
    man = manifest.load_manifest(manifest.write_manifest(
        ds, name="odd", organ_id=1, cases=[{"id": "c0", "image": "c0.nii.gz",
                                            "label": "c0_label.nii.gz"}]))
    with pytest.raises(InputError, match="orientation: 'official' takes no resampling"):
        CaseStore(man, tmp_path / "cache", orientation="official", spacing=(1, 1, 1))
    off = CaseStore(man, tmp_path / "cache", orientation="official")
    canon = CaseStore(man, tmp_path / "cache")
    assert off.shape("c0") == (6, 5, 7) and canon.shape("c0") == (7, 6, 5)
    np.testing.assert_array_equal(off.label("c0"), label.transpose(1, 0, 2).astype(bool))
    window = (np.clip(stored.transpose(1, 0, 2), -100, 240) + 100) / 340
    np.testing.assert_allclose(off.image("c0"), window, atol=1e-5)
    np.testing.assert_allclose(off.spacing("c0"), [0.8, 2.5, 1.25])
    geo = off.geometry("c0")  # from the cache record, without the source
    assert geo.orientation == "official"
    np.testing.assert_allclose(geo.affine, off.affine("c0"))
    np.testing.assert_array_equal(geo.to_source(off.label("c0")), label.astype(bool))
    # The segment spacing warning compares per canonical axis, whatever the layout.
    recs = seg_lib.cached_case_records(tmp_path / "cache")
    assert {r["orientation"] for r in recs} == {"official", "canonical"}
    lo, hi = seg_lib.training_spacing_range(recs)
    np.testing.assert_allclose(lo, canon.spacing("c0"))
    np.testing.assert_allclose(hi, canon.spacing("c0"))


def test_compose_and_inverse_orientation_transforms():
    x = RNG.normal(size=(2, 3, 4))
    for _ in range(20):
        a = np.c_[RNG.permutation(3), RNG.choice([-1, 1], 3)].astype(float)
        b = np.c_[RNG.permutation(3), RNG.choice([-1, 1], 3)].astype(float)
        two = nib.orientations.apply_orientation(nib.orientations.apply_orientation(x, a), b)
        np.testing.assert_array_equal(
            nib.orientations.apply_orientation(x, orientation.compose_ornt(a, b)), two)
        back = nib.orientations.apply_orientation(
            nib.orientations.apply_orientation(x, a), orientation.inverse_ornt(a))
        np.testing.assert_array_equal(back, x)


def test_segment_preview_of_an_official_volume_is_drawn_in_pls(tmp_path, monkeypatch):
    stored = RNG.integers(-90, 200, size=(5, 6, 7)).astype(np.int16)
    vol = volume_io.load_image(_nifti(tmp_path / "ct.nii.gz", stored, ODD_AFFINE),
                               orientation="official")
    mask = np.zeros(vol.data.shape, bool)
    mask[2:4, 1:3, 3:5] = True
    seen = {}

    def plot_overlay(image, masks, spacing, path, *, title):
        seen.update(image=image, mask=masks["prediction"], spacing=spacing)
        return path
    monkeypatch.setattr(seg_lib.plots, "plot_overlay", plot_overlay)
    seg_lib._preview(vol, mask, {"voxels": 8, "volume_ml": 0.1}, tmp_path / "p.png",
                     tmp_path / "ct.nii.gz", [])
    canon = volume_io.load_image(tmp_path / "ct.nii.gz")
    assert seen["image"].shape == seen["mask"].shape == canon.data.shape
    np.testing.assert_array_equal(seen["mask"], vol.geometry.to_canonical(mask))
    np.testing.assert_allclose(seen["spacing"], canon.geometry.spacing)


@pytest.mark.parametrize("layout", ["canonical", "official"])
def test_headers_alone_give_the_geometry_of_the_loaded_volume(tmp_path, layout):
    """`segment` checks every input from its headers (`read_geometry`) and
    decodes it later (`load_image`): both must agree in either layout, for a
    DICOM series numbered superior to inferior and a permuted NIfTI."""
    _dicom_series(tmp_path / "ct", [4, 3, 2, 1])
    affine = np.array([[0.0, 0.8, 0, 5], [-0.7, 0, 0, 3], [0, 0, -2.5, 9], [0, 0, 0, 1]])
    _nifti(tmp_path / "ct.nii.gz", np.arange(5 * 6 * 4, dtype=np.int16).reshape(5, 6, 4), affine)
    for path in (tmp_path / "ct", tmp_path / "ct.nii.gz"):
        head = volume_io.read_geometry(path, orientation=layout)
        full = volume_io.load_image(path, orientation=layout).geometry
        assert head.shape == full.shape and head.orientation == full.orientation == layout
        np.testing.assert_array_equal(head.affine, full.affine)
        np.testing.assert_array_equal(head.source_ornt, full.source_ornt)
    with pytest.raises(InputError, match="orientation"):
        volume_io.read_geometry(tmp_path / "ct.nii.gz", orientation="stored")


def test_segment_streams_inputs_in_the_models_layout(tmp_path):
    """`segment` checks headers first and decodes each input when its turn
    comes: the decoded image must be the one of the models' layout, on the
    grid the header check gave (a non-square input fails if they differ)."""
    data = np.arange(5 * 6 * 4, dtype=np.int16).reshape(5, 6, 4)
    path = _nifti(tmp_path / "ct.nii.gz", data, ODD_AFFINE)
    for layout in ("canonical", "official"):
        grids = seg_lib.check_inputs(
            [(path, volume_io.read_geometry(path, orientation=layout))], ("X", "Y", "Z"), None)
        job = seg_lib._SegmentJob([path], grids, None, tmp_path, None, 0.99, None, "", {},
                                  None, False, layout)
        _, vol, image = job.load("0")
        want = volume_io.load_image(path, orientation=layout)
        np.testing.assert_array_equal(image, want.data)
        assert vol.geometry.orientation == layout and image.shape == tuple(grids[0])
