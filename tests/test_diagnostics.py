"""Per-round diagnostics: crop-box sizes and overlaps on device against NumPy
loops, the per-case record (volume, precision, recall) against a hand-computed
case, and the summary and report that show them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stnjax.eval import records, report, runs, summaries
from stnjax.infer import diagnostics
from stnjax.infer.segmenter import CaseResult

AXIS = {"X": 0, "Y": 1, "Z": 2}


def np_box_size(ref, extent, plane, margin):
    """Oracle: per window of real slices [j-1, j, j+1] (edges replicated)
    holding any reference, the box of their union plus the margin, clamped to
    the real slice; the mean (height, width), NaN when no window has one."""
    v = np.moveaxis(ref[:extent[0], :extent[1], :extent[2]], AXIS[plane], 0)
    n, h, w = v.shape
    sizes = []
    for j in range(n):
        u = v[max(j - 1, 0)] | v[j] | v[min(j + 1, n - 1)]
        if not u.any():
            continue
        rows, cols = np.flatnonzero(u.any(1)), np.flatnonzero(u.any(0))
        sizes.append((min(rows[-1] + margin + 1, h) - max(rows[0] - margin, 0),
                      min(cols[-1] + margin + 1, w) - max(cols[0] - margin, 0)))
    return np.mean(sizes, axis=0) if sizes else np.array([np.nan, np.nan])


@pytest.mark.parametrize("plane", ["X", "Y", "Z"])
def test_box_sizes_match_the_window_loop(plane):
    rng = np.random.default_rng(AXIS[plane])
    shape, extent = (16, 14, 12), np.array([13, 11, 9])
    ref = np.zeros(shape, bool)
    ref[3:8, 2:6, 1:4] = True
    ref[10:13, 8:11, 6:9] = rng.random((3, 3, 3)) < 0.5  # up to the real border
    ref[:, :, extent[2]:] = False  # the padding holds nothing (masks are real-only)
    ref[extent[0]:] = False
    ref[:, extent[1]:] = False
    f = jax.jit(diagnostics.plane_box_size, static_argnames=("plane", "margin"))
    for margin in (0, 2, 20):
        got = np.asarray(f(jnp.asarray(ref), jnp.asarray(extent, jnp.int32), plane=plane,
                           margin=margin))
        np.testing.assert_allclose(got, np_box_size(ref, extent, plane, margin), rtol=1e-6)
    empty = f(jnp.zeros(shape, bool), jnp.asarray(extent, jnp.int32), plane=plane, margin=2)
    assert np.isnan(np.asarray(empty)).all()


def test_box_size_hand_computed():
    """One 2 x 3 blob in one axial slice, margin 1, real slice 5 x 6: every
    window holding it (slices 1, 2, 3) cuts rows [0, 4) and columns [1, 5)."""
    ref = np.zeros((5, 6, 5), bool)
    ref[1:3, 2:5 - 1, 2] = True  # rows 1-2, columns 2-3
    got = diagnostics.plane_box_size(jnp.asarray(ref), jnp.asarray([5, 6, 5], jnp.int32),
                                     plane="Z", margin=1)
    np.testing.assert_array_equal(np.asarray(got), [4.0, 4.0])
    vox, hits = diagnostics.overlap(jnp.asarray(ref), jnp.asarray(np.roll(ref, 1, axis=0)))
    assert (int(vox), int(hits)) == (4, 2)
    assert int(diagnostics.overlap(jnp.asarray(ref), None)[1]) == -1


def _result(rounds_run=2, T=3):
    """A CaseResult of 3 rounds run out of T with hand-set diagnostics."""
    voxels = np.array([8, 10, 6, -1][:T + 1], np.int32)
    hits = np.array([4, 5, 6, -1][:T + 1], np.int32)
    boxes = np.full((T + 1, 2, 2), np.nan, np.float32)
    boxes[1] = [[10, 12], [8, 9]]
    boxes[2] = [[9, 11], [np.nan, np.nan]]
    inter = np.array([np.nan, 0.6, 0.9, np.nan], np.float32)
    dsc = np.array([0.4, 0.5, 0.6, np.nan], np.float32)
    return CaseResult(mask=np.zeros((2, 2, 2), bool), score=None, coarse_mask=None,
                      rounds=rounds_run, inter=inter, dsc=dsc, masks_at={}, round_at={},
                      plane_dsc={}, oracles={}, time_coarse_s=0.1, time_rounds_s=[0.1, 0.1],
                      bucket=(2, 2, 2), overflow=0, voxels=voxels, hits=hits, boxes=boxes,
                      planes=("X", "Z"))


def test_round_diagnostics_hand_computed():
    label = np.zeros((4, 4, 4), bool)
    label.flat[:12] = True  # 12 label voxels
    d = runs.round_diagnostics(_result(), label, (2.0, 2.0, 2.5))  # 10 mm^3 = 0.01 mL a voxel
    assert d["volume_ml"] == [0.08, 0.1, 0.06, 0.06]  # round 3 not run: round 2's mask
    assert d["precision"] == [0.5, 0.5, 1.0, 1.0]
    assert d["recall"] == [4 / 12, 5 / 12, 0.5, 0.5]
    assert d["box_hw"] == {"X": [None, [10.0, 12.0], [9.0, 11.0], None],
                           "Z": [None, [8.0, 9.0], None, None]}
    empty = _result()
    empty.voxels[1] = 0
    empty.hits[1] = 0
    assert runs.round_diagnostics(empty, label, (1, 1, 1))["precision"][1] is None


def _record(case, vol, prec, rec):
    return records.CaseRecord(
        case_id=case, fold=0, method="rstn", gt_voxels=100, spacing=(1.0, 1.0, 1.0),
        dsc_rounds=[0.5, 0.6], inter_dsc=[None, 0.7], rounds_run=1, time_coarse_s=0.0,
        time_rounds_s=[0.0], extra={"rounds": {"volume_ml": vol, "precision": prec,
                                               "recall": rec, "box_hw": {}}})


def test_summary_and_report_show_the_per_round_means():
    recs = [_record("a", [1.0, 2.0], [0.5, None], [0.2, 0.4]),
            _record("b", [3.0, 4.0], [0.7, 0.9], [0.4, 0.6])]
    s = summaries.summarize(recs, thresholds=(0.99,), main_threshold=0.99)
    g = s.group("rstn")
    assert g.round_diagnostics["volume_ml"] == [2.0, 3.0]
    assert g.round_diagnostics["precision"] == pytest.approx([0.6, 0.9])  # None skipped
    assert g.round_diagnostics["recall"] == pytest.approx([0.3, 0.5])
    text = report.format_summary(s)
    assert "vol mL  prec %  recall %" in text
    assert "   3.00   90.00     50.00" in text  # round 1: mL, precision %, recall %
    # Records without diagnostics (older runs) print the plain table.
    plain = [records.CaseRecord(**{**r.__dict__, "extra": {}}) for r in recs]
    assert "vol mL" not in report.format_summary(
        summaries.summarize(plain, thresholds=(0.99,), main_threshold=0.99))
