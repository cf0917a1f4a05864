"""bench.organ_hu: per-organ mean HU (the measurement behind data.augment.gain)."""

import math

import numpy as np
import pytest

from bench import organ_hu


def test_organ_means_against_a_hand_computed_label():
    image = np.array([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    label = np.array([[1, 1, 0], [2, 0, 2]])
    got = organ_hu.organ_means(image, label, [1, 2, 7])
    assert got[:2] == [15.0, 50.0]
    assert math.isnan(got[2])  # an id the label lacks


def test_parse_organs_and_its_error():
    assert organ_hu.parse_organs("1:aorta, 6:pancreas") == [(1, "aorta"), (6, "pancreas")]
    with pytest.raises(SystemExit, match="--organs.*'liver'"):
        organ_hu.parse_organs("1:aorta,liver")
