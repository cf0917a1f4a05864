"""Datasets (stnjax.data: manifest, fold table, case store) and training
slices (stnjax.data.sampler: the training-slice rule, sampler, prefetch)."""

import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from stnjax.data import store as case_store
from stnjax.data import manifest
from stnjax.data import volume_io
from stnjax.phantom import volumes as phantom
from stnjax.phantom import dataset as phantom_dataset
from stnjax.data import preprocess
from stnjax.data import sampler
from stnjax.checks import InputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SLAB = DATA / "ct_dicom_slab"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """8 small phantom cases (48 x 48 x 24), 4 folds of 2."""
    root = tmp_path_factory.mktemp("phantoms") / "ds"
    return phantom_dataset.write_phantom_dataset(
        root, num_cases=8, seed=0, config=phantom.PhantomConfig(shape=(48, 48, 24)))


@pytest.fixture(scope="module")
def store(phantoms, tmp_path_factory):
    return case_store.CaseStore(manifest.load_manifest(phantoms), tmp_path_factory.mktemp("cache"))


def _write_case(folder, cid, shape, organ_slices, rng):
    """A hand-made NIfTI case (canonical PLS affine) with organ id 1 in the
    given axial slices (a small box); returns the manifest entry."""
    hu = rng.integers(-200, 300, shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    for z in organ_slices:
        lab[2:5, 3:7, z] = 1
    aff = phantom_dataset.canonical_affine(shape, (1.0, 1.0, 2.0))
    nib.save(nib.Nifti1Image(hu, aff), str(folder / f"{cid}.nii.gz"))
    nib.save(nib.Nifti1Image(lab, aff), str(folder / f"{cid}_seg.nii.gz"))
    return {"id": cid, "image": f"{cid}.nii.gz", "label": f"{cid}_seg.nii.gz"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Cases of three sizes: different axial buckets."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    cases = [_write_case(root, "a", (20, 30, 10), range(2, 8), rng),
             _write_case(root, "b", (20, 30, 10), range(0, 10), rng),
             _write_case(root, "c", (40, 30, 10), range(3, 6), rng),
             _write_case(root, "d", (33, 12, 10), range(4, 9), rng)]
    manifest.write_manifest(root, name="mixed", organ_id=1, cases=cases)
    return case_store.CaseStore(manifest.load_manifest(root), root / "cache")


# ------------------------------------------------------------------ folds

def test_folds_by_position_82_matches_reference():
    ids = [f"{i:04d}" for i in range(1, 83)]
    folds = manifest.folds_by_position(ids[::-1], 4)  # input order does not matter
    assert [len(folds[f]) for f in range(4)] == [20, 20, 21, 21]
    # FD0 tests 01-20, FD1 21-40, FD2 41-61, FD3 62-82 (reference 1.4)
    assert folds[0] == ids[0:20] and folds[1] == ids[20:40]
    assert folds[2] == ids[40:61] and folds[3] == ids[61:82]


@pytest.mark.parametrize("n, sizes", [(8, [2, 2, 2, 2]), (5, [1, 1, 1, 2]), (10, [2, 2, 3, 3]),
                                      (7, [1, 2, 2, 2])])
def test_folds_by_position_small(n, sizes):
    ids = [f"c{i}" for i in range(n)]
    folds = manifest.folds_by_position(ids, 4)
    assert [len(folds[f]) for f in range(4)] == sizes
    assert sum(folds.values(), []) == sorted(ids)  # contiguous, in order, each once


def test_folds_by_position_errors():
    with pytest.raises(manifest.DatasetError, match="duplicate"):
        manifest.folds_by_position(["a", "a", "b", "c"])
    with pytest.raises(manifest.DatasetError, match="cannot fill"):
        manifest.folds_by_position(["a", "b", "c"], 4)


def test_nih_table_missing_ids_do_not_shift():
    default = manifest.nih_pancreas_fold_table()
    assert [len(default[f]) for f in range(4)] == [20, 19, 21, 20]  # 25 and 70 removed
    assert "PANCREAS_0025" not in default[1] and "PANCREAS_0070" not in default[3]
    assert default[0][0] == "PANCREAS_0001" and default[2][-1] == "PANCREAS_0061"
    present = [f"{i:04d}" for i in range(1, 83) if i not in (3, 25, 41, 70)]
    table = manifest.nih_pancreas_fold_table(present)
    for f, (lo, hi) in enumerate(manifest.NIH_PANCREAS_FOLD_RANGES):
        assert table[f] == [f"{i:04d}" for i in range(lo, hi + 1) if i not in (3, 25, 41, 70)]
    with pytest.raises(manifest.DatasetError, match="NIH case number"):
        manifest.nih_pancreas_fold_table(["PANCREAS_0083"])


def test_fold_table_round_trip_and_missing_case(phantoms, tmp_path, caplog):
    root = tmp_path / "ds"
    root.mkdir()
    for p in ("images", "labels"):
        os.symlink(phantoms / p, root / p)
    m = manifest.load_manifest(phantoms)
    manifest.write_manifest(root, name="x", organ_id=7, cases=m.cases)
    table = manifest.load_or_create_fold_table(root)  # created once
    assert table == manifest.folds_by_position(m.case_ids)
    assert manifest.read_fold_table(root / manifest.FOLDS_FILE) == table
    # a case disappears: the stored table is reused, nothing shifts
    kept = [c for c in m.cases if c.id != "phantom_002"]
    manifest.write_manifest(root, name="x", organ_id=7, cases=kept)
    with caplog.at_level(logging.WARNING):
        again = manifest.load_or_create_fold_table(root)
    assert again == table and "phantom_002" in caplog.text
    ids = manifest.load_manifest(root).case_ids
    train, test = manifest.split(again, 1, ids)
    assert test == ["phantom_003"] and "phantom_002" not in train and len(train) == 6
    assert manifest.split(again, 0) == (sorted(sum((table[f] for f in (1, 2, 3)), [])), table[0])
    with pytest.raises(manifest.DatasetError, match="fold"):
        manifest.split(again, 4)
    with pytest.raises(manifest.DatasetError, match="in no fold"):
        manifest.split(again, 0, list(ids) + ["new_case"])
    with pytest.raises(manifest.DatasetError, match="has 4 folds"):
        manifest.load_or_create_fold_table(root, n_folds=5)


def test_fold_table_file_errors(tmp_path):
    bad = tmp_path / "folds.json"
    bad.write_text(json.dumps({"folds": {"0": ["a", "b"], "1": ["b"]}}))
    with pytest.raises(manifest.DatasetError, match="'b' is in folds 0 and 1"):
        manifest.read_fold_table(bad)
    bad.write_text("{not json")
    with pytest.raises(manifest.DatasetError, match="not valid JSON"):
        manifest.read_fold_table(bad)


# ------------------------------------------------------------------ manifest

def test_manifest_errors_name_file_and_case(tmp_path):
    (tmp_path / "img.nii.gz").write_bytes(b"")
    good = {"name": "t", "organ_id": 1,
            "cases": [{"id": "c1", "image": "img.nii.gz", "label": None}]}
    (tmp_path / "dataset.json").write_text(json.dumps(good))
    m = manifest.load_manifest(tmp_path)
    assert m.case_ids == ("c1",) and m.cases[0].label is None and m.root == tmp_path.resolve()
    bad_cases = {
        "does not exist": {"id": "c2", "image": "missing.nii.gz", "label": None},
        "more than once": {"id": "c1", "image": "img.nii.gz", "label": None},
        "'image' must be": {"id": "c3", "label": None},
    }
    for msg, case in bad_cases.items():
        bad = {**good, "cases": good["cases"] + [case]}
        (tmp_path / "dataset.json").write_text(json.dumps(bad))
        with pytest.raises(manifest.DatasetError, match=msg) as e:
            manifest.load_manifest(tmp_path)
        assert "dataset.json" in str(e.value)
    (tmp_path / "dataset.json").write_text(json.dumps({**good, "organ_id": 0}))
    with pytest.raises(manifest.DatasetError, match="organ_id"):
        manifest.load_manifest(tmp_path)
    with pytest.raises(manifest.DatasetError, match="no such file"):
        manifest.load_manifest(tmp_path / "nowhere")


def test_manifest_paths_stay_in_the_folder_unless_switched(tmp_path):
    """A path that leaves the dataset folder ("../..", absolute) is refused,
    naming the case and the switch; with "external_paths": true it is read;
    write_manifest given outside files sets the switch itself; a symlink
    inside the folder may point anywhere."""
    ds, elsewhere = tmp_path / "ds", tmp_path / "store"
    ds.mkdir(), elsewhere.mkdir()
    (elsewhere / "img.nii.gz").write_bytes(b"")
    (ds / "link.nii.gz").symlink_to(elsewhere / "img.nii.gz")
    for path in ("../store/img.nii.gz", str(elsewhere / "img.nii.gz"),
                 "sub/../../store/img.nii.gz", "../../../../../../etc/passwd"):
        doc = {"name": "t", "organ_id": 1, "cases": [{"id": "c1", "image": path, "label": None}]}
        (ds / "dataset.json").write_text(json.dumps(doc))
        with pytest.raises(manifest.DatasetError,
                           match=r"case 'c1': image .* is outside the dataset folder.*"
                                 r"external_paths"):
            manifest.load_manifest(ds)
        if "passwd" not in path:
            (ds / "dataset.json").write_text(json.dumps({**doc, "external_paths": True}))
            assert manifest.load_manifest(ds).cases[0].image == (elsewhere / "img.nii.gz")
    doc = {"name": "t", "organ_id": 1, "external_paths": "yes",
           "cases": [{"id": "c1", "image": "link.nii.gz", "label": None}]}
    (ds / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(manifest.DatasetError, match="'external_paths' must be true or false"):
        manifest.load_manifest(ds)
    del doc["external_paths"]
    (ds / "dataset.json").write_text(json.dumps(doc))
    assert manifest.load_manifest(ds).cases[0].image == (elsewhere / "img.nii.gz").resolve()
    manifest.write_manifest(ds, name="t", organ_id=1,
                            cases=[{"id": "c1", "image": elsewhere / "img.nii.gz", "label": None}])
    written = json.loads((ds / "dataset.json").read_text())
    assert written["external_paths"] is True
    assert written["cases"][0]["image"] == str((elsewhere / "img.nii.gz").resolve())
    manifest.write_manifest(ds, name="t", organ_id=1,
                            cases=[{"id": "c1", "image": "link.nii.gz", "label": None}])
    assert "external_paths" not in json.loads((ds / "dataset.json").read_text())


# ------------------------------------------------------------------ training slices

COUNTS = {"a": np.array([0, 5, 10, 0]), "b": np.array([1, 2, 3, 0]), "c": np.array([6, 7, 8])}


def test_training_slices_hand_computed():
    # all positive counts: 10 8 7 6 5 3 2 1 -> P = 8
    # 0.98: floor(7.84) = 7th largest = 2 -> count >= 2, train cases a and b only
    rows = sampler.select_training_slices(COUNTS, ["a", "b"], 0.98)
    np.testing.assert_array_equal(rows, [[0, 1], [0, 2], [1, 1], [1, 2]])
    # P includes the test case c: 0.5 -> floor(4) = 4th largest = 6 -> only a's 10.
    # (Counting P over the training cases only would give 5 and keep a's 5.)
    np.testing.assert_array_equal(sampler.select_training_slices(COUNTS, ["a", "b"], 0.5), [[0, 2]])
    # threshold > 1: an absolute pixel count
    np.testing.assert_array_equal(sampler.select_training_slices(COUNTS, ["a", "b"], 3),
                                  [[0, 1], [0, 2], [1, 2]])
    # threshold 1: every slice with organ pixels; never a background slice
    np.testing.assert_array_equal(sampler.select_training_slices(COUNTS, ["b", "c"], 1.0),
                                  [[1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]])


def test_training_slices_errors():
    with pytest.raises(manifest.DatasetError, match="plane Z, fold 2"):
        sampler.select_training_slices(COUNTS, ["b"], 0.5, plane="Z", fold=2)
    with pytest.raises(manifest.DatasetError, match="not in counts"):
        sampler.select_training_slices(COUNTS, ["zz"])
    with pytest.raises(manifest.DatasetError, match="no slice"):
        sampler.select_training_slices({"a": np.zeros(3, int)}, ["a"])


def test_training_slices_property():
    rng = np.random.default_rng(1)
    counts = {f"c{i}": rng.integers(0, 50, 30) * (rng.uniform(size=30) < 0.5) for i in range(6)}
    rows = sampler.select_training_slices(counts, list(counts), 0.9)
    all_pos = np.concatenate([v[v > 0] for v in counts.values()])
    active = np.array([counts[f"c{i}"][j] for i, j in rows])
    assert len(active) >= int(0.9 * all_pos.size)
    assert active.min() > 0 and active.min() >= np.sort(all_pos)[::-1][int(0.9 * all_pos.size) - 1]


def test_slice_counts_match_labels(store):
    cid = store.case_ids[3]
    case = store.load_case(cid)
    for plane, axes in (("X", (1, 2)), ("Y", (0, 2)), ("Z", (0, 1))):
        counts = sampler.slice_organ_counts(store, None, plane)
        assert list(counts) == list(store.case_ids)
        np.testing.assert_array_equal(counts[cid], case.label.sum(axis=axes))


# ------------------------------------------------------------------ case store

def test_case_store_values_and_cache_reuse(phantoms, tmp_path):
    m = manifest.load_manifest(phantoms)
    s1 = case_store.CaseStore(m, tmp_path)
    cid = m.case_ids[1]
    case = volume_io.load_case(m.cases[1].image, m.cases[1].label, organ_id=7)
    ref = preprocess.window_hu(case.image)
    np.testing.assert_allclose(s1.image(cid), ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(s1.label(cid), case.label)
    np.testing.assert_allclose(s1.spacing(cid), case.geometry.spacing)
    np.testing.assert_allclose(s1.affine(cid), case.geometry.affine)
    for plane in "XYZ":
        np.testing.assert_array_equal(s1.plane(cid, plane, "label"),
                                      np.moveaxis(case.label, AXIS[plane], 0))
        last = case.label.shape[AXIS[plane]] - 1
        img, lab = s1.window(cid, plane, last)  # edge slice replicated
        np.testing.assert_allclose(img, np_window(ref, plane, last), atol=1e-5)
        np.testing.assert_array_equal(lab, np_window(case.label, plane, last))
    geom = s1.geometry(cid)  # from the cache record, not the source
    for name in ("affine", "source_affine", "source_ornt"):
        np.testing.assert_array_equal(getattr(geom, name), getattr(case.geometry, name))
    assert (geom.shape, geom.source_shape) == (case.geometry.shape, case.geometry.source_shape)
    assert s1.loads == 1
    s2 = case_store.CaseStore(m, tmp_path)  # a new process would see the same cache
    s2.prepare([cid])
    assert s2.loads == 0 and isinstance(s2.label(cid), np.memmap)
    s3 = case_store.CaseStore(m, tmp_path, hu_window=(-200, 300))  # another window: new entry
    s3.prepare([cid])
    assert s3.loads == 1
    st = os.stat(m.cases[1].image)
    os.utime(m.cases[1].image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # source changed
    s4 = case_store.CaseStore(m, tmp_path)
    s4.prepare([cid])
    assert s4.loads == 1
    with pytest.raises(manifest.DatasetError, match="not in manifest"):
        s4.image("nope")


@pytest.mark.skipif(not SLAB.is_dir(), reason=f"real CT example not found under {DATA}")
def test_case_store_dicom_folder(tmp_path):
    cases = [{"id": "slab", "image": str(SLAB / "dicom"),
              "label": str(SLAB / "labels_multiclass.nii.gz")}]
    (tmp_path / "ds").mkdir()
    manifest.write_manifest(tmp_path / "ds", name="slab", organ_id=7, cases=cases)
    s = case_store.CaseStore(manifest.load_manifest(tmp_path / "ds"), tmp_path / "cache")
    assert s.shape("slab") == (512, 512, 20)
    counts = sampler.slice_organ_counts(s, None, "Z")["slab"]
    assert np.count_nonzero(counts) == 4 and counts[:4].all()  # pancreas in the 4 lowest slices
    assert s.label("slab").sum() == 1327


# ------------------------------------------------------------------ sampler

AXIS = {"X": 0, "Y": 1, "Z": 2}


def np_window(volume, plane, j):
    """Test oracle: slices j-1, j, j+1 (edges replicated) of an (X, Y, Z)
    volume along `plane`, stacked as channels (H, W, 3), by plain indexing."""
    v = np.moveaxis(np.asarray(volume), AXIS[plane], 0)
    s = v.shape[0]
    return np.stack([v[max(j - 1, 0)], v[j], v[min(j + 1, s - 1)]], axis=-1)


def _check_against_reference(store, batch, plane):
    """Every real slot equals the oracle's window, zero-padded, with its size."""
    for b in range(len(batch["weight"])):
        if batch["weight"][b] == 0:
            assert not batch["hw"][b].any() and not batch["image"][b].any()
            continue
        cid = store.case_ids[batch["case_index"][b]]
        j = int(batch["slice_index"][b])
        img = np_window(store.image(cid), plane, j)
        lab = np_window(store.label(cid), plane, j)
        h, w, _ = img.shape
        np.testing.assert_allclose(batch["image"][b, :h, :w], img, atol=1e-6)
        np.testing.assert_array_equal(batch["label"][b, :h, :w], lab.astype(np.float32))
        assert tuple(batch["hw"][b]) == (h, w)
        assert not batch["image"][b, h:].any() and not batch["image"][b, :, w:].any()
        assert not batch["label"][b, h:].any() and not batch["label"][b, :, w:].any()


def test_sampler_shapes_padding_and_values(store):
    counts = sampler.slice_organ_counts(store, None, "X")
    slices = sampler.select_training_slices(counts, store.case_ids[:6], 0.98)
    s = sampler.SliceSampler(store, slices, plane="X", batch_size=4, buckets=(64, 32), seed=0)
    assert s.buckets() == {(64, 32): len(slices)}  # X view: H = 48 -> 64, W = 24 -> 32
    b = s.batch(3)
    assert b["image"].shape == b["label"].shape == (4, 64, 32, 3)
    assert b["hw"].shape == (4, 2) and b["hw"].dtype == np.int32
    assert b["image"].dtype == b["label"].dtype == b["weight"].dtype == np.float32
    assert b["case_index"].dtype == b["slice_index"].dtype == np.int32
    np.testing.assert_array_equal(b["weight"], 1.0)
    assert set(np.unique(b["label"])) <= {0.0, 1.0}
    assert b["label"][:, :, :, 1].any(axis=(1, 2)).all()  # centre slices hold organ
    assert set(b["case_index"]) <= set(range(6))  # training cases only
    _check_against_reference(store, b, "X")
    exact = sampler.SliceSampler(store, slices, plane="X", batch_size=2, buckets=(), seed=0)
    assert exact.buckets() == {(48, 24): len(slices)}
    with pytest.raises(manifest.DatasetError, match="exceeds the largest bucket 32"):
        sampler.SliceSampler(store, slices, plane="X", batch_size=2, buckets=(16, 32))


def test_sampler_deterministic_and_sharded(store):
    counts = sampler.slice_organ_counts(store, None, "Z")
    slices = sampler.select_training_slices(counts, store.case_ids, 0.98)
    a, b, c = (sampler.SliceSampler(store, slices, plane="Z", batch_size=8, buckets=(64,),
                                    seed=seed) for seed in (5, 5, 6))
    for key, v in a.batch(11).items():
        np.testing.assert_array_equal(v, b.batch(11)[key])
    rows = lambda batch: list(zip(batch["case_index"], batch["slice_index"]))  # noqa: E731
    assert rows(a.batch(11)) != rows(a.batch(12)) and rows(a.batch(11)) != rows(c.batch(11))
    full = a.batch(7)
    parts = [a.batch(7, shard=i, num_shards=4) for i in range(4)]
    for key in full:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    with pytest.raises(InputError, match="does not divide"):
        a.batch(0, num_shards=3)
    with pytest.raises(InputError, match="shard"):
        a.batch(0, shard=4, num_shards=4)
    got = [(step, batch["slice_index"].tolist())
           for step, batch in sampler.prefetch(a, range(3, 6))]
    assert got == [(st, a.batch(st)["slice_index"].tolist()) for st in range(3, 6)]


def test_sampler_bucket_choice_proportional(mixed):
    counts = sampler.slice_organ_counts(mixed, None, "Z")
    slices = sampler.select_training_slices(counts, mixed.case_ids, 1.0)
    # Z views: a, b (20 x 30) -> (32, 32); c (40 x 30) -> (64, 32); d (33 x 12) -> (64, 16)
    s = sampler.SliceSampler(mixed, slices, plane="Z", batch_size=2, buckets=(16, 32, 64), seed=1)
    assert s.buckets() == {(32, 32): 16, (64, 16): 5, (64, 32): 3}
    keys = [s.plan(step)[0] for step in range(3000)]
    for key, n in s.buckets().items():
        assert abs(keys.count(key) / 3000 - n / 24) < 0.03
    for step in (0, 1, 2):  # every slot of a batch comes from its bucket
        b = s.batch(step)
        assert b["image"].shape[1:3] == s.plan(step)[0]
        _check_against_reference(mixed, b, "Z")


def test_sampler_epoch_covers_each_slice_once(mixed):
    counts = sampler.slice_organ_counts(mixed, None, "Z")
    slices = sampler.select_training_slices(counts, mixed.case_ids, 1.0)
    s = sampler.SliceSampler(mixed, slices, plane="Z", batch_size=4, buckets=(32, 64), seed=3,
                             order="epoch")
    # buckets (32,32): 16 slices -> 4 batches; (64,32): 3 + 5 = 8 -> 2 batches
    assert s.steps_per_epoch == 6
    seen, pads, orders = [], 0, []
    for step in range(12):
        b = s.batch(step)
        real = b["weight"] > 0
        pads += int((~real).sum())
        if step < 6:
            seen += list(zip(b["case_index"][real].tolist(), b["slice_index"][real].tolist()))
        orders.append(list(zip(b["case_index"].tolist(), b["slice_index"].tolist())))
        _check_against_reference(mixed, b, "Z")
    assert sorted(seen) == sorted(map(tuple, slices.tolist()))  # each active slice once
    assert pads == 0  # 16 and 8 fill whole batches
    assert orders[:6] != orders[6:]  # a new permutation each epoch
    s5 = sampler.SliceSampler(mixed, slices, plane="Z", batch_size=5, buckets=(32, 64), seed=3,
                              order="epoch")
    # 16 slices -> 4 batches (4 padding slots), 8 -> 2 batches (2 padding slots)
    b = [s5.batch(i) for i in range(s5.steps_per_epoch)]
    assert s5.steps_per_epoch == 6 and sum(int((x["weight"] == 0).sum()) for x in b) == 30 - 24
    assert all((x["case_index"][x["weight"] == 0] == -1).all() for x in b)


def test_nih_pancreas_layout(tmp_path, caplog):
    images, labels = tmp_path / "Pancreas-CT", tmp_path / "TCIA_pancreas_labels-02-05-2017"
    layout = (("0001", ["s1"]), ("0002", ["s1"]), ("0003", ["s1", "s2"]), ("0004", ["s1"]))
    for case, series in layout:
        for ser in series:
            d = images / f"PANCREAS_{case}" / "study" / ser
            d.mkdir(parents=True)
            (d / "1-001.dcm").write_bytes(b"")
    labels.mkdir()
    for case in ("0001", "0003", "0004"):
        (labels / f"label{case}.nii.gz").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        cases = manifest.nih_pancreas_cases(images, labels)
    assert [c["id"] for c in cases] == ["PANCREAS_0001", "PANCREAS_0004"]
    assert cases[0]["image"] == str(images / "PANCREAS_0001" / "study" / "s1")
    assert "PANCREAS_0002" in caplog.text and "PANCREAS_0003" in caplog.text
    manifest.write_manifest(tmp_path, name="nih", organ_id=1, cases=cases)
    table = manifest.load_or_create_fold_table(tmp_path, rule="nih_pancreas")
    assert table == {0: ["PANCREAS_0001", "PANCREAS_0004"], 1: [], 2: [], 3: []}
    assert json.loads((tmp_path / "folds.json").read_text())["rule"] == "nih_pancreas"


def test_make_dataset_cli_pairs_real_files(tmp_path):
    """launch.make_dataset pairs images and labels by name, checks each case
    (world alignment included) and writes a manifest that loads."""
    import subprocess
    import sys
    src = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct_example_3mm"
    if not src.is_dir():
        pytest.skip("shared CT data not present")
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "case01.nii.gz").symlink_to(src / "ct.nii.gz")
    (tmp_path / "labels" / "case01.nii.gz").symlink_to(src / "labels_multiclass.nii.gz")
    out = tmp_path / "ds"
    run = subprocess.run([sys.executable, "-m", "launch.make_dataset", f"--out={out}",
                          f"--images={tmp_path / 'images'}", f"--labels={tmp_path / 'labels'}",
                          "--organ_id=7"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    m = manifest.load_manifest(out)
    assert list(m.case_ids) == ["case01"] and m.organ_id == 7
    # An image without a label is a clear error naming it.
    (tmp_path / "images" / "case02.nii.gz").symlink_to(src / "ct.nii.gz")
    with pytest.raises(manifest.DatasetError, match="case02"):
        manifest.paired_cases(tmp_path / "images", tmp_path / "labels")


def test_paired_cases_relative_to_the_working_directory(tmp_path, monkeypatch):
    """Relative --images/--labels are read from the caller's working
    directory, not from the dataset folder the manifest is written in (the
    README's `--images=../shared/...` with `--out=/tmp/...`)."""
    for sub in ("src/images", "src/labels", "elsewhere/ds"):
        (tmp_path / sub).mkdir(parents=True)
    for sub in ("images/a1.nii.gz", "labels/a1.nii.gz"):
        (tmp_path / "src" / sub).write_bytes(b"x")
    monkeypatch.chdir(tmp_path / "src")
    cases = manifest.paired_cases("images", "labels")
    assert cases == [{"id": "a1", "image": str(tmp_path / "src/images/a1.nii.gz"),
                      "label": str(tmp_path / "src/labels/a1.nii.gz")}]
    manifest.write_manifest(tmp_path / "elsewhere/ds", name="rel", organ_id=1, cases=cases)
    m = manifest.load_manifest(tmp_path / "elsewhere/ds")
    assert Path(m.case("a1").image) == tmp_path / "src/images/a1.nii.gz"


def test_negative_slices_added_from_training_cases():
    rows = sampler.select_training_slices(COUNTS, ["a", "b"], 0.98)   # 4 rows
    np.testing.assert_array_equal(sampler.add_negative_slices(COUNTS, ["a", "b"], rows, 0.0),
                                  rows)
    # Organ-free slices of the training cases a and b: a0, a3, b3 (c is a test case).
    pool = {(0, 0), (0, 3), (1, 3)}
    half = sampler.add_negative_slices(COUNTS, ["a", "b"], rows, 0.5, seed=1)  # round(2)
    added = {tuple(r) for r in half} - {tuple(r) for r in rows}
    assert len(half) == 6 and len(added) == 2 and added <= pool
    assert np.all(np.diff(half[:, 0] * 100 + half[:, 1]) > 0)       # sorted, no repeats
    assert half.dtype == np.int32
    # Deterministic per seed; more than the pool asks gives the whole pool.
    np.testing.assert_array_equal(
        half, sampler.add_negative_slices(COUNTS, ["a", "b"], rows, 0.5, seed=1))
    draws = {tuple(map(tuple, sampler.add_negative_slices(COUNTS, ["a", "b"], rows, 0.5,
                                                          seed=s))) for s in range(20)}
    assert len(draws) > 1
    every = sampler.add_negative_slices(COUNTS, ["a", "b"], rows, 3.0)
    assert {tuple(r) for r in every} == {tuple(r) for r in rows} | pool
    with pytest.raises(InputError, match="data.negatives"):
        sampler.add_negative_slices(COUNTS, ["a", "b"], rows, -1.0)
