"""bench.coarse_errors: the false-positive breakdown against a hand-computed case."""

import numpy as np
import pytest

from bench.coarse_errors import error_breakdown

SPACING = (1.5, 1.5, 3.0)


def _case():
    """A 2 x 2 x 2 organ on axial slices 5-6 and ten false positives placed
    by hand: 4 on slice 15 (27 mm from the organ's slices), 2 on slice 8
    (6 mm), 3 beside the organ on its slice 5, 1 on slice 6 at 30 mm."""
    label = np.zeros((40, 40, 20), bool)
    label[10:12, 10:12, 5:7] = True
    pred = label.copy()
    pred[20:22, 20:22, 15] = True          # off-slice, far along z: 4
    pred[10:12, 10, 8] = True              # off-slice, near along z: 2
    pred[12, 10:13, 5] = True              # organ slice, beside it: 3
    pred[31, 10, 6] = True                 # organ slice, 20 px = 30 mm away: 1
    return pred, label


def test_error_breakdown_against_hand_counts():
    pred, label = _case()
    r = error_breakdown(pred, label, SPACING, near_mm=20.0)
    assert r["pred_ml"] == pytest.approx(18 * 1.5 * 1.5 * 3.0 / 1000.0)
    assert r["dsc"] == pytest.approx(2 * 8 / (18 + 8))
    assert r["recall"] == pytest.approx(1.0)
    assert r["fp_off_slice"] == pytest.approx(0.6)
    assert r["fp_off_near"] == pytest.approx(0.2)
    assert r["fp_off_above"] == pytest.approx(0.6)  # slices 8 and 15 lie above 5-6
    assert r["fp_near"] == pytest.approx(0.3)
    assert r["fp_far"] == pytest.approx(0.1)
    assert r["fp_largest"] == pytest.approx(0.4)
    # A wider "near" takes the slice-15 block (27 mm) and the 30 mm voxel.
    wide = error_breakdown(pred, label, SPACING, near_mm=31.0)
    assert wide["fp_off_near"] == pytest.approx(0.6) and wide["fp_far"] == pytest.approx(0.0)


def test_error_breakdown_edge_cases():
    pred, label = _case()
    exact = error_breakdown(label, label, SPACING)
    assert exact["dsc"] == 1.0 and np.isnan(exact["fp_off_slice"])
    empty = error_breakdown(pred, np.zeros_like(label), SPACING)
    assert empty["dsc"] == 0.0 and np.isnan(empty["recall"])
    assert empty["fp_off_slice"] == pytest.approx(1.0) and empty["fp_off_near"] == 0.0
    assert np.isnan(empty["fp_off_above"])
    below = pred.copy()
    below[20:22, 20:22, 1] = True  # 4 more, under the organ
    assert error_breakdown(below, label, SPACING)["fp_off_above"] == pytest.approx(6 / 14)
    with pytest.raises(ValueError, match="equal 3-D shapes"):
        error_breakdown(pred[..., 0], label[..., 0], SPACING)
