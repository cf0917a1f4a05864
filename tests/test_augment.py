"""Training-time augmentation (stnjax.data.augment) and its use in the sampler."""

import math

import numpy as np
import pytest
from scipy import ndimage

from stnjax.checks import InputError
from stnjax.data import manifest, sampler
from stnjax.data import store as case_store
from stnjax.data.augment import (ELASTIC_GRID, AugmentSpec, augment_window, draw_transform,
                                 elastic_field)
from stnjax.phantom import dataset as phantom_dataset
from stnjax.phantom import volumes as phantom


def _disc(h=64, w=80, centre=(30, 44), radius=12):
    """A bright disc on a dark slice: image == label, 3 channels."""
    r, c = np.mgrid[:h, :w]
    lab = (((r - centre[0]) ** 2 + (c - centre[1]) ** 2) <= radius ** 2).astype(np.float32)
    return np.repeat(lab[..., None], 3, -1), np.repeat(lab[..., None], 3, -1)


def test_inactive_spec_returns_the_window_unchanged():
    img, lab = _disc()
    a, b = augment_window(img, lab, np.random.default_rng(0), AugmentSpec())
    assert a is img and b is lab


def test_draw_transform_against_hand_computed_similarity():
    """The matrix is a rotation over the zoom, the centre moves by the shift."""
    spec = AugmentSpec(scale=0.2, rotate=30.0, shift=0.1)
    for seed in range(20):
        u = np.random.default_rng(seed).uniform(-1.0, 1.0, 4)
        zoom, angle = math.exp(u[0] * math.log(1.2)), math.radians(30.0 * u[1])
        matrix, offset = draw_transform(np.random.default_rng(seed), spec, (64, 80))
        np.testing.assert_allclose(matrix * zoom, [[math.cos(angle), math.sin(angle)],
                                                   [-math.sin(angle), math.cos(angle)]],
                                   atol=1e-12)
        assert 1 / 1.2 - 1e-9 <= zoom <= 1.2 + 1e-9
        # The output's centre samples the input at its centre minus the shift.
        centre = np.array([31.5, 39.5])
        shift = u[2:] * 0.1 * np.array([64.0, 80.0])
        np.testing.assert_allclose(matrix @ centre + offset, centre - shift, atol=1e-9)


def test_image_and_label_move_together_and_the_label_stays_binary():
    img, lab = _disc()
    spec = AugmentSpec(scale=0.15, rotate=20.0, shift=0.05)
    for seed in range(5):
        a, b = augment_window(img, lab, np.random.default_rng(seed), spec)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == img.shape
        assert set(np.unique(b)) <= {0.0, 1.0}
        inter = np.logical_and(a > 0.5, b > 0.5).sum()
        union = np.logical_or(a > 0.5, b > 0.5).sum()
        assert inter / union > 0.95
        # The disc's area scales by the zoom squared (matrix = R / zoom).
        matrix, _ = draw_transform(np.random.default_rng(seed), spec, img.shape[:2])
        zoom2 = 1.0 / abs(np.linalg.det(matrix))
        assert b[..., 0].sum() / lab[..., 0].sum() == pytest.approx(zoom2, rel=0.08)


def test_intensity_only_keeps_geometry_and_is_an_affine_map_clipped():
    rng = np.random.default_rng(3)
    img = rng.uniform(0.2, 0.8, (32, 40, 3)).astype(np.float32)
    lab = (img > 0.6).astype(np.float32)
    a, b = augment_window(img, lab, np.random.default_rng(7), AugmentSpec(intensity=0.3))
    np.testing.assert_array_equal(b, lab)
    u = np.random.default_rng(7).uniform(-1.0, 1.0, 6)[4:]  # draws 5 and 6
    want = np.clip((img - 0.5) * (1 + 0.3 * u[0]) + 0.5 + 0.15 * u[1], 0.0, 1.0)
    np.testing.assert_allclose(a, want, atol=1e-6)


def test_gain_scales_about_the_window_low_end_after_the_six_earlier_draws():
    """gain: x exp(u7 * log(1 + g)), clipped; 0 (fat, air, padding) stays 0;
    the first six draws, hence the geometry and the contrast, are those of
    the same spec without a gain."""
    rng = np.random.default_rng(4)
    img = rng.uniform(0.0, 0.9, (32, 40, 3)).astype(np.float32)
    img[:6] = 0.0
    lab = (img > 0.5).astype(np.float32)
    base = AugmentSpec(intensity=0.2)
    with_gain = AugmentSpec(intensity=0.2, gain=0.5)
    a, _ = augment_window(img, lab, np.random.default_rng(11), base)
    g, gl = augment_window(img, lab, np.random.default_rng(11), with_gain)
    np.testing.assert_array_equal(gl, lab)
    u7 = np.random.default_rng(11).uniform(-1.0, 1.0, 7)[6]
    factor = math.exp(u7 * math.log(1.5))
    np.testing.assert_allclose(g, np.clip(a * factor, 0.0, 1.0), atol=1e-6)
    assert 1 / 1.5 <= factor <= 1.5
    # Alone, the gain keeps zero at zero and the order of intensities.
    only, _ = augment_window(img, lab, np.random.default_rng(2), AugmentSpec(gain=0.4))
    assert not only[:6].any()
    inside = img < 0.7  # below 1 / 1.4: never clipped
    ratio = only[inside & (img > 0)] / img[inside & (img > 0)]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    assert 1 / 1.4 - 1e-6 <= ratio[0] <= 1.4 + 1e-6


def test_elastic_field_passes_through_its_drawn_nodes_and_is_smooth():
    """Nodes every ELASTIC_GRID pixels, corners included, carry the drawn
    uniform values (2 x gh x gw draws, nothing more); between them the
    spline is smooth (a neighbour differs by a small fraction of elastic)."""
    h, w = 100, 70  # 4 x 4 nodes: ceil(99 / 32) + 1, ceil(69 / 32) + 1
    field = elastic_field(np.random.default_rng(8), 6.0, (h, w))
    rng = np.random.default_rng(8)
    nodes = rng.uniform(-6.0, 6.0, (2, 5, 4))
    assert field.shape == (2, h, w)
    rows = np.linspace(0, h - 1, 5)
    cols = np.linspace(0, w - 1, 4)
    # Nodes on whole pixels (row 0 and h-1, col 0 and w-1 always are).
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            if float(r).is_integer() and float(c).is_integer():
                np.testing.assert_allclose(field[:, int(r), int(c)], nodes[:, i, j], atol=1e-9)
    np.testing.assert_allclose(field[:, 0, 0], nodes[:, 0, 0], atol=1e-9)
    np.testing.assert_allclose(field[:, -1, -1], nodes[:, -1, -1], atol=1e-9)
    assert np.abs(np.diff(field, axis=1)).max() < 6.0 * 12 / ELASTIC_GRID
    assert np.abs(np.diff(field, axis=2)).max() < 6.0 * 12 / ELASTIC_GRID
    # The 2-D cubic spline of scipy through the same nodes.
    coords = np.stack(np.meshgrid(np.linspace(0, 4, h), np.linspace(0, 3, w), indexing="ij"))
    for k in range(2):
        want = ndimage.map_coordinates(nodes[k], coords, order=3, mode="nearest")
        np.testing.assert_allclose(field[k], want, atol=1e-9)
    # The generator moved by exactly the node draws.
    after = np.random.default_rng(8)
    elastic_field(after, 6.0, (h, w))
    np.testing.assert_array_equal(after.uniform(size=3), rng.uniform(size=3))


def test_elastic_warp_samples_the_image_at_the_displaced_positions():
    """Elastic alone: output (r, c) = input at (r, c) + field(r, c), the
    field drawn after the six earlier draws (replayed here); a linear ramp
    makes bilinear sampling exact. The label moves with the image."""
    h, w = 96, 80
    r, c = np.mgrid[:h, :w].astype(np.float64)
    ramp = (0.2 + 0.3 * r / h + 0.2 * c / w).astype(np.float32)
    img = np.repeat(ramp[..., None], 3, -1)
    lab = np.repeat((ramp > 0.45)[..., None], 3, -1).astype(np.float32)
    spec = AugmentSpec(intensity=0.1, elastic=5.0)
    a, b = augment_window(img, lab, np.random.default_rng(13), spec)
    rng = np.random.default_rng(13)
    u = rng.uniform(-1.0, 1.0, 6)
    field = elastic_field(rng, 5.0, (h, w))
    rs, cs = r + field[0], c + field[1]
    want = 0.2 + 0.3 * rs / h + 0.2 * cs / w
    want = np.clip((want - 0.5) * (1 + 0.1 * u[4]) + 0.5 + 0.05 * u[5], 0.0, 1.0)
    inside = (rs >= 0) & (rs <= h - 1) & (cs >= 0) & (cs <= w - 1)
    assert inside.mean() > 0.8 and np.abs(field).max() > 1.0
    np.testing.assert_allclose(a[..., 1][inside], want[inside], atol=1e-5)
    assert set(np.unique(b)) <= {0.0, 1.0}
    moved = 0.2 + 0.3 * rs / h + 0.2 * cs / w > 0.45
    agree = (b[..., 0] > 0.5) == moved
    assert agree[inside].mean() > 0.98  # nearest vs exact: only edge pixels differ


def test_elastic_keeps_the_earlier_draws_of_a_spec_without_it():
    """Adding an elastic warp leaves the intensity and gain draws alone:
    without geometry of its own, the warp of a constant image is the
    constant (inside the slice), transformed as without the warp."""
    img = np.full((64, 64, 3), 0.4, np.float32)
    lab = np.zeros_like(img)
    base = AugmentSpec(intensity=0.2, gain=0.3)
    a, _ = augment_window(img, lab, np.random.default_rng(21), base)
    e, _ = augment_window(img, lab, np.random.default_rng(21),
                          AugmentSpec(intensity=0.2, gain=0.3, elastic=0.5))
    np.testing.assert_allclose(e[2:-2, 2:-2], a[2:-2, 2:-2], atol=1e-6)


@pytest.mark.parametrize("field,value", [("scale", -0.1), ("rotate", 90.0), ("shift", 0.5),
                                         ("intensity", float("nan")), ("gain", 1.5),
                                         ("elastic", 40.0)])
def test_bad_ranges_name_the_field(field, value):
    with pytest.raises(InputError, match=f"data.augment.{field}"):
        AugmentSpec(**{field: value})
    with pytest.raises(InputError, match="unknown field.*flip"):
        AugmentSpec.from_config({"flip": 1.0})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms") / "ds"
    phantom_dataset.write_phantom_dataset(root, num_cases=4, seed=0,
                                          config=phantom.PhantomConfig(shape=(48, 40, 24)))
    return case_store.CaseStore(manifest.load_manifest(root), tmp_path_factory.mktemp("cache"))


def test_sampler_augments_per_slot_the_same_on_any_number_of_shards(store):
    counts = sampler.slice_organ_counts(store, None, "Z")
    slices = sampler.select_training_slices(counts, store.case_ids, 0.98)
    spec = AugmentSpec(scale=0.1, rotate=10.0, shift=0.05, intensity=0.1, elastic=3.0)
    plain = sampler.SliceSampler(store, slices, plane="Z", batch_size=4, buckets=(64,), seed=5)
    aug = sampler.SliceSampler(store, slices, plane="Z", batch_size=4, buckets=(64,), seed=5,
                               augment=spec)
    for step in (0, 3):
        p, a = plain.batch(step), aug.batch(step)
        np.testing.assert_array_equal(a["case_index"], p["case_index"])
        np.testing.assert_array_equal(a["hw"], p["hw"])
        assert not np.array_equal(a["image"], p["image"])
        halves = [aug.batch(step, shard=s, num_shards=2) for s in (0, 1)]
        for k in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), a[k])
        # The padded area of the bucket stays zero; each slot is its own
        # transform of its own window (nothing leaks between slots).
        for b, (h, w) in enumerate(a["hw"]):
            assert not a["image"][b, h:].any() and not a["image"][b, :, w:].any()
            rng = np.random.default_rng([5, step, b, 2])
            want = augment_window(p["image"][b, :h, :w], p["label"][b, :h, :w], rng, spec)
            np.testing.assert_array_equal(a["image"][b, :h, :w], want[0])
            np.testing.assert_array_equal(a["label"][b, :h, :w], want[1])
