"""Coarse-to-fine inference against a plain per-window NumPy driver.

The reference driver below follows reference section 4 literally: one
window at a time, skip a window whose mask is empty on its three slices,
accumulate with the fixed /2 or /3 divisor, fuse by the mean, threshold,
NumPy largest-component filter, inter-iteration DSC, stop at t. It shares
only the network call (`RSTN.fine_round` / `coarse_prob` on one window) with
the code under test, so batching, chunking, the slab range, padding, the
while_loop and the device component filter are all checked independently.
The FCN's valid_hw masking makes a canvas or a padded bucket equivalent to
the exact-size input, so the comparison is exact up to float32 rounding.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch.configs.common import base_config
from stnjax.infer import rounds as infer
from stnjax import metrics
from stnjax.data import preprocess
from stnjax.checks import InputError
from stnjax.models.rstn import RSTN
from stnjax.infer.segmenter import Segmenter

SHAPE = (20, 18, 10)
AXIS = {"X": 0, "Y": 1, "Z": 2}


# Test oracles for the volume path, by plain indexing and loops (the library's
# training and inference share one implementation, preprocess; these do not).
def np_view(volume, plane):
    """(X, Y, Z) -> (S, H, W) with the plane's slicing axis first."""
    return np.moveaxis(np.asarray(volume), AXIS[plane], 0)


def np_window(view, j):
    """Slices j-1, j, j+1 of an (S, H, W) view as channels, edges replicated."""
    s = view.shape[0]
    return np.stack([view[max(j - 1, 0)], view[j], view[min(j + 1, s - 1)]], axis=-1)


def np_from_windows(pred, plane):
    """(S, H, W, 3) window outputs -> (X, Y, Z): each slice the mean of the
    channels that hold it (2 at the ends, 3 inside)."""
    s = pred.shape[0]
    out = np.zeros(pred.shape[:3], np.float64)
    for k in range(s):
        terms = [pred[j][..., k - j + 1] for j in (k - 1, k, k + 1) if 0 <= j < s]
        out[k] = np.mean(terms, axis=0)
    return np.moveaxis(out.astype(np.float32), 0, AXIS[plane])
SPEC = infer.InferenceSpec(batch_size=4, max_rounds=4, quantize_coarse=False,
                           report_thresholds=(0.5, 0.9, 0.99))
# One plane where the test is about the driver, not the planes (compile time).
SPEC_Z = dataclasses.replace(SPEC, planes=("Z",))


def _rstn():
    cfg = base_config().model
    cfg.width = 1 / 16
    cfg.variant = "pad32"
    cfg.canvases = (8, 12)  # the canvas a batch picks never changes the result
    cfg.margin = 3
    return RSTN.from_config(cfg)


@pytest.fixture(scope="module")
def setup():
    rstn = _rstn()
    keys = jax.random.split(jax.random.key(0), 3)
    params = {}
    init = jax.jit(rstn.init_params, static_argnums=1)
    logits = jax.jit(rstn.fcn_logits)
    for p, k in zip("XYZ", keys):
        pr = init(k, (32, 32))
        # Give the saliency some weight and the coarse net a bias that puts
        # a few regions above 0.5, so masks are neither empty nor full.
        sal = pr["saliency"]["saliency2"]
        pr["saliency"]["saliency2"] = dict(sal, kernel=0.3 * jax.random.normal(k, sal["kernel"].shape))
        params[p] = pr
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 120, SHAPE).astype(np.float32)
    hu[6:14, 5:12, 3:8] += 150.0  # a brighter "organ"
    image = jnp.asarray(preprocess.window_hu(hu))
    for p in "XYZ":  # centre each untrained net's logits: about 25 % above 0.5
        for net in ("coarse", "fine"):
            v = np_view(image, p)
            view = jnp.asarray(np.stack([np_window(v, j) for j in range(v.shape[0])]))
            logit = logits(params[p][net], view)
            head = params[p][net]["score_pool3"]
            shift = float(jnp.quantile(logit, 0.75))
            params[p][net]["score_pool3"] = dict(head, bias=head["bias"] - shift)
    label = np.zeros(SHAPE, bool)
    label[7:13, 6:11, 4:7] = True
    return rstn, params, hu, label


def ref_coarse(rstn, params, image, plane):
    view = np_view(image, plane)
    out = np.zeros(view.shape + (3,), np.float32)
    net = jax.jit(rstn.coarse_prob)  # one window at a time, batch 1
    for j in range(view.shape[0]):
        win = np_window(view, j)[None]
        out[j] = np.asarray(net(params, jnp.asarray(win)))[0]
    return np_from_windows(out, plane)


_FINE = {}


def _jit_fine_round(rstn):
    if id(rstn) not in _FINE:
        _FINE[id(rstn)] = jax.jit(rstn.fine_round)
    return _FINE[id(rstn)]


def ref_fine_plane(rstn, params, image, score, mask, plane):
    iv, sv, mv = (np_view(v, plane) for v in (image, score, mask))
    out = np.zeros(iv.shape + (3,), np.float32)
    net = _jit_fine_round(rstn)
    for j in range(iv.shape[0]):
        m = np_window(mv, j).astype(np.float32)
        if not m.any():
            continue  # skipped window: prediction 0, still in the divisor
        prob, _ = net(params, jnp.asarray(np_window(iv, j)[None]),
                                  jnp.asarray(np_window(sv, j)[None]),
                                  jnp.asarray(m[None]))
        out[j] = np.asarray(prob)[0]
    return np_from_windows(out, plane)


def ref_coarse_to_fine(rstn, params, image, score, mask, t, rounds, saliency="score",
                       planes="XYZ"):
    """The literal loop of reference 4.3; `saliency` picks the map fed to the
    saliency transformation ("score": the previous fused map, "mask": the
    previous binary mask, "coarse": round 0's fused map every round)."""
    inter, score0 = [], score
    for _ in range(rounds):
        if not mask.any():
            inter.append(1.0)
            break
        sal = {"score": score, "mask": mask.astype(np.float32), "coarse": score0}[saliency]
        fused = np.mean([ref_fine_plane(rstn, params[p], image, sal, mask, p)
                         for p in planes], axis=0)
        pred = metrics.largest_components(fused >= 0.5, 0.5)
        inter.append(metrics.inter_iteration_dsc(mask, pred))
        score, mask = fused, pred
        if inter[-1] >= t:
            break
    return score, mask, inter


def test_coarse_matches_per_window_reference(setup):
    rstn, params, hu, _ = setup
    image = preprocess.window_hu(hu)
    extent = jnp.asarray(SHAPE, jnp.int32)
    for p in "XYZ":
        got = infer.coarse_plane_prob(rstn, params[p], jnp.asarray(image), extent, plane=p,
                                      batch_size=4)
        np.testing.assert_allclose(np.asarray(got), ref_coarse(rstn, params[p], image, p),
                                   atol=2e-6)


def test_coarse_padding_along_the_slice_axis_is_exact(setup):
    """Extra padded slices are never used: edge replication and the divisor
    follow the real slice count."""
    rstn, params, hu, _ = setup
    image = preprocess.window_hu(hu)
    padded = np.pad(image, ((0, 5), (0, 0), (0, 0)))
    got = infer.coarse_plane_prob(rstn, params["X"], jnp.asarray(padded),
                                  jnp.asarray(SHAPE, jnp.int32), plane="X", batch_size=3)
    want = ref_coarse(rstn, params["X"], image, "X")
    np.testing.assert_allclose(np.asarray(got)[:SHAPE[0]], want, atol=2e-6)
    assert np.all(np.asarray(got)[SHAPE[0]:] == 0)


def test_coarse_to_fine_matches_reference_driver(setup):
    rstn, params, hu, label = setup
    image = preprocess.window_hu(hu)
    extent = jnp.asarray(SHAPE, jnp.int32)
    # Round 0 as a coarse net would give it: a shifted, enlarged organ and a
    # graded score (untrained nets average to nearly empty masks).
    mask0_np = np.zeros(SHAPE, bool)
    mask0_np[5:14, 7:13, 3:8] = True
    mask0 = jnp.asarray(mask0_np)
    score0 = jnp.asarray(np.where(mask0_np, 0.8, 0.1).astype(np.float32))
    run = jax.jit(lambda t: infer.coarse_to_fine(rstn, params, jnp.asarray(image), extent,
                                                 score0, mask0, t, spec=SPEC,
                                                 label=jnp.asarray(label)))
    res = run(jnp.float32(2.0))  # all rounds
    score, mask, inter = ref_coarse_to_fine(rstn, params, image, np.asarray(score0),
                                            mask0_np, 2.0, SPEC.max_rounds)
    assert int(res.rounds) == len(inter) == SPEC.max_rounds
    np.testing.assert_allclose(np.asarray(res.inter)[1:], inter, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(res.mask), mask)
    np.testing.assert_allclose(np.asarray(res.score), score, atol=1e-5)
    assert np.isnan(np.asarray(res.inter)[0])
    # Per-round diagnostics of the last round: its mask's voxels and overlap.
    r = int(res.rounds)
    assert int(res.voxels[r]) == mask.sum() and int(res.hits[r]) == (mask & label).sum()
    assert (int(res.voxels[0]), int(res.hits[0])) == (mask0_np.sum(), (mask0_np & label).sum())
    assert np.isnan(np.asarray(res.boxes[0])).all() and np.isfinite(np.asarray(res.boxes[1])).all()
    # Per-round DSC against the label, round 0 included.
    assert abs(float(res.dsc[0]) - metrics.dsc(mask0_np, label)) < 1e-6
    assert abs(float(res.dsc[-1]) - metrics.dsc(mask, label)) < 1e-6

    # Early stop at a traced t gives the mask reported for t by the full run.
    for i, t in enumerate(SPEC.report_thresholds):
        early = run(jnp.float32(t))
        np.testing.assert_array_equal(np.asarray(early.mask), np.asarray(res.masks_at[i]))
        assert int(early.rounds) == int(res.round_at[i])
        first = [r + 1 for r, v in enumerate(inter) if v >= t]
        assert int(res.round_at[i]) == (first[0] if first else SPEC.max_rounds)
    assert run._cache_size() == 1  # one compilation for every t


@pytest.mark.parametrize("saliency", ["mask", "coarse"])
def test_saliency_input_variants_match_reference_driver(setup, saliency):
    """The paper's variant (saliency of the previous binary mask) and the
    round-0 variant follow the literal driver with that map, and differ from
    the reference's continuous score from round 2 on; the host-stepped
    rounds (per-round timing) agree with the while_loop."""
    rstn, params, hu, label = setup
    image = preprocess.window_hu(hu)
    extent = jnp.asarray(SHAPE, jnp.int32)
    mask0_np = np.zeros(SHAPE, bool)
    mask0_np[5:14, 7:13, 3:8] = True
    score0_np = np.where(mask0_np, 0.8, 0.1).astype(np.float32)
    spec = dataclasses.replace(SPEC_Z, max_rounds=3, saliency_input=saliency)
    res = infer.coarse_to_fine(rstn, params, jnp.asarray(image), extent,
                               jnp.asarray(score0_np), jnp.asarray(mask0_np),
                               jnp.float32(2.0), spec=spec)
    score, mask, inter = ref_coarse_to_fine(rstn, params, image, score0_np, mask0_np, 2.0, 3,
                                            saliency=saliency, planes="Z")
    ref_default = ref_coarse_to_fine(rstn, params, image, score0_np, mask0_np, 2.0, 3,
                                     planes="Z")
    assert int(res.rounds) == len(inter) == 3
    np.testing.assert_allclose(np.asarray(res.inter)[1:], inter, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(res.mask), mask)
    np.testing.assert_allclose(np.asarray(res.score), score, atol=1e-5)
    assert np.abs(score - ref_default[0]).max() > 1e-3  # the option changes the result
    stepped = Segmenter(rstn, params, spec, per_round_timing=True)
    looped = Segmenter(rstn, params, spec)
    a, b = (s.segment(hu, label=label, t=0.99) for s in (stepped, looped))
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.dsc, b.dsc)


def test_saliency_input_is_checked():
    with pytest.raises(InputError, match="saliency_input"):
        infer.InferenceSpec(saliency_input="fused")


def test_empty_coarse_mask_is_a_documented_result(setup):
    rstn, params, hu, _ = setup
    image = jnp.asarray(preprocess.window_hu(hu))
    extent = jnp.asarray(SHAPE, jnp.int32)
    empty = jnp.zeros(SHAPE, bool)
    res = infer.coarse_to_fine(rstn, params, image, extent, jnp.zeros(SHAPE), empty,
                               jnp.float32(0.99), spec=SPEC)
    assert int(res.rounds) == 1 and float(res.inter[1]) == 1.0
    assert not np.asarray(res.mask).any()


def test_segmenter_buckets_compiles_and_crops(setup):
    rstn, params, hu, label = setup
    seg = Segmenter(rstn, params, SPEC_Z, volume_buckets=(16, 24, 32))
    res = seg.segment(hu, label=label, t=0.99, oracles=True)
    assert res.bucket == (24, 24, 16)
    assert res.mask.shape == SHAPE and res.mask.dtype == bool
    assert set(res.masks_at) == set(SPEC.report_thresholds)
    # One jitted loop: its total, no per-round times made up from it.
    assert res.time_rounds_s == [] and res.time_loop_s > 0
    assert set(res.plane_dsc) == {"Z"} and set(res.oracles) == {"strong", "weak", "gt_crop"}
    n = seg.compile_count
    # Another volume of the same bucket and another t: no new compilation.
    seg.segment(hu[:-1, :-1], label=label[:-1, :-1], t=0.9)
    assert seg.compile_count == n
    # Host-stepped rounds (per-round timing) give the same answer.
    step = Segmenter(rstn, params, SPEC_Z, volume_buckets=(16, 24, 32), per_round_timing=True)
    res2 = step.segment(hu, label=label, t=0.99)
    np.testing.assert_array_equal(res2.mask, res.mask)
    np.testing.assert_allclose(res2.dsc, res.dsc)
    np.testing.assert_array_equal(res2.voxels, res.voxels)
    np.testing.assert_allclose(res2.boxes, res.boxes)
    assert res.planes == ("Z",) and res.boxes.shape == (SPEC.max_rounds + 1, 1, 2)


@pytest.mark.parametrize("per_round", [False, True])
def test_case_times_exclude_compilation(setup, monkeypatch, per_round):
    """Compilation happens before the timed calls: with a fake clock that
    only advances (by 1000 s) when a compilation starts, every case time is
    0; each compilation is listed with its own time."""
    import types
    from stnjax.infer import segmenter as seg_mod
    rstn, params, hu, label = setup
    clock = [0.0]
    monkeypatch.setattr(seg_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    orig = Segmenter._compile

    def compile_slowly(self, name, bucket, *args):
        if (name, bucket) not in self._compiled:
            clock[0] += 1000.0
        return orig(self, name, bucket, *args)
    monkeypatch.setattr(Segmenter, "_compile", compile_slowly)
    seg = Segmenter(rstn, params, SPEC_Z, per_round_timing=per_round)
    res = seg.segment(hu, label=label, t=0.99)
    assert res.time_coarse_s == 0.0 and sum(res.time_rounds_s) == 0.0 and res.time_loop_s == 0.0
    assert sorted(seg.compile_seconds) == sorted(seg._compiled) and seg.compile_seconds
    assert all(v >= 0.0 for v in seg.compile_seconds.values())


def test_bucket_padding_does_not_change_the_result(setup):
    """A volume padded into a larger bucket (every axis) gives the same
    probabilities and masks as the exact-size run (FCN valid_hw masking)."""
    rstn, params, hu, label = setup
    exact = Segmenter(rstn, params, SPEC_Z).segment(hu, label=label, t=0.9)
    padded = Segmenter(rstn, params, SPEC_Z, volume_buckets=(32,)).segment(hu, label=label, t=0.9)
    assert exact.bucket == SHAPE and padded.bucket == (32, 32, 32)
    np.testing.assert_allclose(padded.score, exact.score, atol=1e-5)
    np.testing.assert_array_equal(padded.mask, exact.mask)
    np.testing.assert_array_equal(padded.coarse_mask, exact.coarse_mask)
    assert padded.rounds == exact.rounds


def test_segmenter_bad_input(setup):
    rstn, params, hu, _ = setup
    seg = Segmenter(rstn, params, SPEC)
    with pytest.raises(InputError, match="single slice"):
        seg.segment(hu[:, :, :1])
    bad = hu.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        seg.segment(bad)
    with pytest.raises(InputError, match="report thresholds"):
        seg.segment(hu, t=0.97)
    with pytest.raises(InputError, match="plane"):
        Segmenter(rstn, {"X": params["X"]}, SPEC)
    broken = {p: jax.tree_util.tree_map(lambda x: x * jnp.nan, params[p]) for p in "XYZ"}
    with pytest.raises(InputError, match="NaN"):
        Segmenter(rstn, broken, SPEC).segment(hu)


def test_other_devices_load_the_first_compilation_unless_the_cache_is_on(setup, tmp_path,
                                                                         monkeypatch):
    """Without the persistent compilation cache a device copy loads the first
    device's executables (`devices.load_on_device`) and gives the same
    result; with the cache on it compiles (reads the cache) instead, since
    a cache-served XLA:CPU executable cannot be serialized again."""
    from stnjax.infer import segmenter as seg_mod
    rstn, params, hu, label = setup
    loads = []
    real = seg_mod.load_on_device
    monkeypatch.setattr(seg_mod, "load_on_device",
                        lambda c, d: loads.append(d) or real(c, d))
    before = jax.config.jax_compilation_cache_dir
    d0, d1, d2 = jax.local_devices()[:3]
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        first = Segmenter(rstn, params, SPEC_Z).on_device(d0)
        want = first.segment(hu, label=label, t=0.99)
        got = first.on_device(d1).segment(hu, label=label, t=0.99)
        assert loads and set(loads) == {d1}
        np.testing.assert_array_equal(got.mask, want.mask)
        np.testing.assert_array_equal(got.score, want.score)
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        n = len(loads)
        first.on_device(d2).segment(hu, label=label, t=0.99)
        assert len(loads) == n
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize("coarse_lcc", [False, True])
def test_round_zero_against_numpy_fusion_and_component_filter(coarse_lcc):
    """round_zero: mean of the planes >= 0.5 inside the extent (reference
    4.2 F2); with infer.coarse_lcc the NumPy largest-component filter on top
    (components >= 0.5 x the largest kept); the score is never filtered."""
    probs = np.zeros((3, 12, 10, 8), np.float32)
    probs[:, 1:5, 1:5, 1:5] = 0.9      # 64 voxels
    probs[:2, 7:9, 6:8, 3:5] = 0.8     # 8 voxels, mean 0.53: kept by the plain fusion
    probs[0, 7:9, 1:3, 1:3] = 0.9      # one plane only: mean 0.3, never in the mask
    probs[:, 10:12, 8:10, 6:8] = 0.9   # outside the real extent (10, 8, 6)
    extent = np.array([10, 8, 6])
    spec = dataclasses.replace(SPEC, coarse_lcc=coarse_lcc)
    score, mask = infer.round_zero(jnp.asarray(probs), jnp.asarray(extent, jnp.int32), spec=spec)
    valid = np.zeros(probs.shape[1:], bool)
    valid[:10, :8, :6] = True
    want = (probs.mean(0) >= 0.5) & valid
    assert want.sum() == 64 + 8
    if coarse_lcc:
        want = metrics.largest_components(want, 0.5)
        assert want.sum() == 64
    np.testing.assert_array_equal(np.asarray(mask), want)
    np.testing.assert_allclose(np.asarray(score), probs.mean(0) * valid, atol=1e-7)
