"""Coarse-to-fine inference as pure, jit-able functions (reference section 4).

A volume (model-layout axes, canonical PLS unless `data.orientation` says
"official"; normalised to [0, 1]) is padded to a volume
bucket; `extent` (int32 (3,), traced) holds its real size, so every volume
of a bucket shares one compilation. One RSTN per plane: `params` maps a
plane name to that plane's parameter tree.

Round 0 (`coarse_probs`, `fuse`): per plane, the coarse network on every
3-slice window, windows averaged back into slices (reference 1.7), the
reference's uint8 round trip (lesson 4, optional); then the planes' mean
>= 0.5 (RSTN) or a binary majority vote (the stage-wise baseline, C2F).

Rounds 1..T (`coarse_to_fine`, one `lax.while_loop`): per plane, windows
whose previous mask is empty on all three slices are skipped (probability
0, still counted in the /2 or /3 average, as the reference); the others get
saliency from the previous round's continuous fused map, a crop box from
the previous binary mask (margin K), the fine network and the paste back.
(`InferenceSpec.saliency_input` offers the paper's saliency of the previous
mask, and round 0's coarse map in every round.) Then the planes' mean >= 0.5
and the largest-component filter. The loop
stops when the inter-iteration DSC reaches `t` (traced: a sweep over t
compiles once) or after T rounds; t > 1 runs all T rounds and records each,
from which the result at any t is read (the reference's reporting).

Only the windows between the first and last slice holding mask voxels (plus
one on each side) are run, in batches of `batch_size`, so a round costs
what the organ needs, not the whole volume.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stnjax.checks import InputError
from stnjax.infer import diagnostics
from stnjax.metrics import dsc_jax, largest_components_jax
from stnjax.models.rstn import RSTN
from stnjax.data.preprocess import (PLANE_AXIS, PLANES, add_windows, check_plane, from_plane_view,
                                    gather_windows, plane_view, window_counts)
from stnjax.models.crop import extent_mask

FUSIONS = ("mean", "majority")
# What drives the saliency transformation in round r (see InferenceSpec).
SALIENCY_INPUTS = ("score", "mask", "coarse")


@dataclasses.dataclass(frozen=True)
class InferenceSpec:
    """Static settings of inference (one compilation per value).

    Attributes:
      planes: planes to use, any non-empty subset of ("X", "Y", "Z").
      batch_size: windows per forward pass.
      max_rounds: T, the most fine rounds.
      lcc_threshold: keep components >= this x the largest (reference 0.5).
      report_thresholds: thresholds t_k whose masks are kept (first round
        with inter-DSC >= t_k, else the last round run).
      fusion: "mean" (RSTN: mean >= 0.5) or "majority" (C2F: binary vote).
      use_saliency: False for the stage-wise baseline (raw-image crops).
      quantize_coarse: round coarse probabilities to 1/255 (the reference
        stores them as uint8 before fusion and saliency).
      saliency_input: the map fed to the saliency transformation in round r:
        "score", the previous round's continuous fused probability (the
        reference code, 4.3); "mask", the previous round's binary mask (the
        paper: "computed via the mask from the previous round", reference
        6.4); "coarse", the fused coarse map of round 0 in every round (the
        kind of map the fine network saw in training, which removes the
        train/test mismatch that reference 6.4 points out; the crop still
        follows the previous round's mask).
      coarse_lcc: also apply the largest-component filter (lcc_threshold)
        to round 0's fused coarse mask, whose boxes crop round 1 (not in
        the reference, which filters the fine rounds only, 4.3): scattered
        false positives of weak coarse networks otherwise widen every box.
    """
    planes: tuple[str, ...] = PLANES
    batch_size: int = 8
    max_rounds: int = 10
    lcc_threshold: float = 0.5
    report_thresholds: tuple[float, ...] = (0.90, 0.95, 0.98, 0.99)
    fusion: str = "mean"
    use_saliency: bool = True
    quantize_coarse: bool = True
    saliency_input: str = "score"
    coarse_lcc: bool = False

    def __post_init__(self):
        if not self.planes or len(set(self.planes)) != len(self.planes):
            raise InputError(f"planes: expected distinct planes from {PLANES}, got {self.planes!r}")
        for p in self.planes:
            check_plane(p, "planes")
        if self.batch_size < 1:
            raise InputError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.max_rounds < 1:
            raise InputError(f"max_rounds: expected >= 1, got {self.max_rounds}")
        if self.fusion not in FUSIONS:
            raise InputError(f"fusion: expected one of {FUSIONS}, got {self.fusion!r}")
        if self.saliency_input not in SALIENCY_INPUTS:
            raise InputError(f"saliency_input: expected one of {SALIENCY_INPUTS}, "
                             f"got {self.saliency_input!r}")


class C2FResult(NamedTuple):
    """What `coarse_to_fine` returns (fixed-size arrays).

    mask: (X, Y, Z) bool, the last round's mask; score: (X, Y, Z) float32 its
    fused probability; rounds: int32 rounds run; inter: (T+1,) float32
    inter-iteration DSC of rounds 1..T (index 0 and rounds not run: NaN);
    dsc: (T+1,) float32 DSC against the label of rounds 0..T (NaN when not
    run or no label); masks_at: (K, X, Y, Z) bool, the mask reported at each
    report threshold; round_at: (K,) int32 its round; overflow: int32 crops
    cut to the largest canvas (0 with the default canvas set). Per-round
    diagnostics (`diagnostics.py`; -1 / NaN for rounds not run): voxels
    (T+1,) int32 voxels in each round's mask; hits (T+1,) int32 of them in
    the label (-1 without label); boxes (T+1, P, 2) float32 per plane the
    mean (height, width) of the crop boxes round r cut (NaN at round 0 and
    for a plane without any box).
    """
    mask: jax.Array
    score: jax.Array
    rounds: jax.Array
    inter: jax.Array
    dsc: jax.Array
    masks_at: jax.Array
    round_at: jax.Array
    overflow: jax.Array
    voxels: jax.Array
    hits: jax.Array
    boxes: jax.Array


# --------------------------------------------------------------------------
# Plane views of a padded volume
# --------------------------------------------------------------------------

def valid_mask(shape: tuple[int, int, int], extent: jax.Array) -> jax.Array:
    """(X, Y, Z) bool: True inside the real volume of a padded bucket."""
    ax = [jnp.arange(n) < extent[i] for i, n in enumerate(shape)]
    return ax[0][:, None, None] & ax[1][None, :, None] & ax[2][None, None, :]


def _slice_extent(extent: jax.Array, plane: str) -> tuple[jax.Array, jax.Array]:
    """A padded volume's real size int32 (3,) -> (real slice count along the
    plane, int32 (2,) real size of its slices)."""
    a = PLANE_AXIS[plane]
    hw = jnp.stack([extent[i] for i in range(3) if i != a]).astype(jnp.int32)
    return extent[a], hw


def _plane_loop(view_fn, s: int, h: int, w: int, start: jax.Array,
                stop: jax.Array, n: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """Runs view_fn on window batches with centres in [start, stop].

    view_fn(j (B,), use (B,)) -> (prob (B, H, W, 3), overflow (B,)).
    Returns the window-averaged slices (S, H, W) float32 and overflow count.
    """
    chunks = jnp.maximum((stop - start + batch) // batch, 0)

    def body(state):
        c, acc, over = state
        j = start + c * batch + jnp.arange(batch)
        use = j <= stop
        prob, ov = view_fn(j, use)
        acc = add_windows(acc, prob, j, n, use)
        return c + 1, acc, over + jnp.sum(jnp.where(use, ov, 0.0)).astype(jnp.int32)

    init = (jnp.int32(0), jnp.zeros((s + 2, h, w), jnp.float32), jnp.int32(0))
    _, acc, over = lax.while_loop(lambda st: st[0] < chunks, body, init)
    return acc[1:s + 1] / window_counts(s, n)[:, None, None], over


# --------------------------------------------------------------------------
# Round 0
# --------------------------------------------------------------------------

def coarse_plane_prob(rstn: RSTN, params: Any, image: jax.Array, extent: jax.Array,
                      *, plane: str, batch_size: int = 8) -> jax.Array:
    """Coarse probability volume of one plane (reference 4.1).

    Args:
      rstn: the model structure; params: that plane's parameter tree.
      image: (X, Y, Z) float32 normalised volume, padded to a bucket.
      extent: int32 (3,) real size.

    Returns:
      (X, Y, Z) float32, each voxel the mean of the windows holding it; 0 in
      the padding.
    """
    view = plane_view(image, plane)
    s, h, w = view.shape
    n, hw = _slice_extent(extent, plane)
    # Each slice's real size: the network on the padded slice then equals the
    # network on the unpadded slice (FCN8s valid_hw masking).
    pix = extent_mask(hw, (h, w))  # (H, W) real pixels

    def run(j, use):
        del use
        win = gather_windows(view, j, n) * pix[None, :, :, None]
        valid_hw = jnp.broadcast_to(hw, (j.shape[0], 2))
        return rstn.coarse_prob(params, win, valid_hw), jnp.zeros(j.shape, jnp.float32)

    prob, _ = _plane_loop(run, s, h, w, jnp.int32(0), n - 1, n, batch_size)
    return from_plane_view(prob * pix[None], plane)


def coarse_probs(rstn: RSTN, params: Mapping[str, Any], image: jax.Array,
                 extent: jax.Array, *, spec: InferenceSpec) -> jax.Array:
    """(P, X, Y, Z) float32 coarse probabilities, planes in spec.planes order."""
    probs = [coarse_plane_prob(rstn, params[p], image, extent, plane=p,
                               batch_size=spec.batch_size) for p in spec.planes]
    probs = jnp.stack(probs)
    if spec.quantize_coarse:
        probs = jnp.round(probs * 255.0) / 255.0
    return probs


def fuse(probs: jax.Array, valid: jax.Array, *, method: str = "mean"
         ) -> tuple[jax.Array, jax.Array]:
    """Fuses per-plane probabilities (P, X, Y, Z) into round 0.

    Returns (score (X, Y, Z) float32 = mean over planes, mask (X, Y, Z)
    bool): "mean" (RSTN, reference 4.2 F2): score >= 0.5; "majority" (C2F):
    more than half of the planes' binary masks (p >= 0.5). No largest-
    component filter in round 0 (reference 4.3).
    """
    if method not in FUSIONS:
        raise InputError(f"method: expected one of {FUSIONS}, got {method!r}")
    score = jnp.mean(probs, axis=0)
    if method == "mean":
        mask = score >= 0.5
    else:
        mask = 2 * jnp.sum(probs >= 0.5, axis=0) > probs.shape[0]
    return score * valid, mask & valid


def round_zero(probs: jax.Array, extent: jax.Array, *, spec: InferenceSpec
               ) -> tuple[jax.Array, jax.Array]:
    """Round 0 from the per-plane coarse probabilities (P, X, Y, Z) float32
    of a volume whose real size is `extent` (3,) int32: `fuse` by
    `spec.fusion`, then, with `spec.coarse_lcc` (not in the reference), the
    largest-component filter of the fine rounds. Returns (score (X, Y, Z)
    float32, mask (X, Y, Z) bool), both 0 outside the extent."""
    score, mask = fuse(probs, valid_mask(probs.shape[1:], extent), method=spec.fusion)
    if spec.coarse_lcc:  # scattered false positives would widen every round-1 box
        mask = largest_components_jax(mask, threshold=spec.lcc_threshold,
                                      n_valid=jnp.prod(extent).astype(jnp.int32))
    return score, mask


# --------------------------------------------------------------------------
# Fine rounds
# --------------------------------------------------------------------------

def fine_plane_prob(rstn: RSTN, params: Any, image: jax.Array, score: jax.Array,
                    crop_ref: jax.Array, extent: jax.Array, *, plane: str,
                    spec: InferenceSpec) -> tuple[jax.Array, jax.Array]:
    """One plane of one fine round (reference mode 'F' over the volume).

    Args:
      image: (X, Y, Z) float32 padded volume; score: (X, Y, Z) float32 map
      for the saliency; crop_ref: (X, Y, Z) bool map for the crop boxes (the
      previous mask, or the label for the oracles); extent: int32 (3,).

    Returns:
      prob (X, Y, Z) float32 (0 in skipped windows' share, outside boxes and
      in the padding) and the overflow count.
    """
    img_v, sc_v, ref_v = (plane_view(v, plane) for v in (image, score, crop_ref))
    s, h, w = img_v.shape
    n, hw = _slice_extent(extent, plane)
    pix = extent_mask(hw, (h, w))
    has = jnp.any(ref_v, axis=(1, 2))
    lo = jnp.argmax(has).astype(jnp.int32)
    hi = (s - 1 - jnp.argmax(has[::-1])).astype(jnp.int32)
    start = jnp.maximum(lo - 1, 0)
    stop = jnp.where(jnp.any(has), jnp.minimum(hi + 1, n - 1), start - 1)

    def run(j, use):
        ref = gather_windows(ref_v, j, n).astype(jnp.float32) * use[:, None, None, None]
        img, sc = gather_windows(img_v, j, n), gather_windows(sc_v, j, n)
        return rstn.fine_round(params, img, sc, ref, hw=jnp.broadcast_to(hw, (j.shape[0], 2)),
                               use_saliency=spec.use_saliency)

    prob, over = _plane_loop(run, s, h, w, start, stop, n, spec.batch_size)
    return from_plane_view(prob * pix[None], plane), over


def fine_round(rstn: RSTN, params: Mapping[str, Any], image: jax.Array,
               score: jax.Array, crop_ref: jax.Array, extent: jax.Array, *,
               spec: InferenceSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """All planes of one round: (fused score, mask after the largest-
    component filter, overflow count)."""
    valid = valid_mask(image.shape, extent)
    probs, over = [], jnp.int32(0)
    for p in spec.planes:
        prob, ov = fine_plane_prob(rstn, params[p], image, score, crop_ref, extent,
                                   plane=p, spec=spec)
        probs.append(prob)
        over = over + ov
    fused = jnp.mean(jnp.stack(probs), axis=0)
    pred = (fused >= 0.5) & valid
    n_valid = jnp.prod(extent).astype(jnp.int32)
    pred = largest_components_jax(pred, threshold=spec.lcc_threshold, n_valid=n_valid)
    return fused, pred, over


class LoopState(NamedTuple):
    """Carry of the coarse-to-fine loop (see `C2FResult` for the fields);
    `hit` (K,) bool marks report thresholds already reached."""
    r: jax.Array
    score: jax.Array
    mask: jax.Array
    inter: jax.Array
    dsc: jax.Array
    masks_at: jax.Array
    round_at: jax.Array
    hit: jax.Array
    overflow: jax.Array
    voxels: jax.Array
    hits: jax.Array
    boxes: jax.Array


def init_state(score0: jax.Array, mask0: jax.Array, *, spec: InferenceSpec,
               label: jax.Array | None = None) -> LoopState:
    """Loop state at round 0 from the fused coarse map."""
    t_rounds, k = spec.max_rounds, len(spec.report_thresholds)
    nan = jnp.full((t_rounds + 1,), jnp.nan, jnp.float32)
    dsc0 = nan if label is None else nan.at[0].set(dsc_jax(mask0, label))
    mask0 = mask0.astype(bool)
    vox0, hit0 = diagnostics.overlap(mask0, label)
    none = jnp.full((t_rounds + 1,), -1, jnp.int32)
    boxes = jnp.full((t_rounds + 1, len(spec.planes), 2), jnp.nan, jnp.float32)
    return LoopState(jnp.int32(0), score0.astype(jnp.float32), mask0, nan, dsc0,
                     jnp.zeros((k,) + mask0.shape, bool), jnp.zeros((k,), jnp.int32),
                     jnp.zeros((k,), bool), jnp.int32(0), none.at[0].set(vox0),
                     none.at[0].set(hit0), boxes)


def saliency_map(st: LoopState, score0: jax.Array | None, *, spec: InferenceSpec
                 ) -> jax.Array:
    """The (X, Y, Z) float32 map that drives round st.r + 1's saliency
    (`spec.saliency_input`); score0 is the fused coarse map of round 0."""
    if spec.saliency_input == "mask":
        return st.mask.astype(jnp.float32)
    if spec.saliency_input == "coarse":
        if score0 is None:
            raise InputError('saliency_input="coarse" needs score0 (the round-0 fused map)')
        return score0.astype(jnp.float32)
    return st.score


def round_step(rstn: RSTN, params: Mapping[str, Any], image: jax.Array,
               extent: jax.Array, st: LoopState, *, spec: InferenceSpec,
               label: jax.Array | None = None, crop_label: bool = False,
               score0: jax.Array | None = None) -> LoopState:
    """One round r -> r + 1 of the iteration (the while_loop body).

    A round whose crop reference is empty is skipped (reference 4.3): score
    and mask stay, and its inter-iteration DSC is 1 (both masks empty).
    score0 (the round-0 fused map) is needed only when
    spec.saliency_input == "coarse".
    """
    ref = label if crop_label else st.mask
    sal = saliency_map(st, score0, spec=spec)
    new_score, new_mask, ov = lax.cond(
        jnp.any(ref),
        lambda: fine_round(rstn, params, image, sal, ref, extent, spec=spec),
        lambda: (st.score, st.mask, jnp.int32(0)))
    r = st.r + 1
    d_inter = dsc_jax(st.mask, new_mask, empty=1.0)
    dsc = st.dsc if label is None else st.dsc.at[r].set(dsc_jax(new_mask, label))
    newly = (~st.hit) & (d_inter >= jnp.asarray(spec.report_thresholds, jnp.float32))
    masks_at = jnp.where(newly[:, None, None, None], new_mask[None], st.masks_at)
    vox, hits = diagnostics.overlap(new_mask, label)
    boxes = diagnostics.box_sizes(ref, extent, planes=spec.planes, margin=rstn.margin)
    return LoopState(r, new_score, new_mask, st.inter.at[r].set(d_inter), dsc, masks_at,
                     jnp.where(newly, r, st.round_at), st.hit | newly, st.overflow + ov,
                     st.voxels.at[r].set(vox), st.hits.at[r].set(hits), st.boxes.at[r].set(boxes))


def should_continue(st: LoopState, t: jax.Array, *, spec: InferenceSpec) -> jax.Array:
    """True while fewer than T rounds ran and the last inter-DSC is below t."""
    last = st.inter[st.r]  # NaN at round 0: comparisons are False
    return (st.r < spec.max_rounds) & ~(last >= jnp.asarray(t, jnp.float32))


def finish(st: LoopState) -> C2FResult:
    """Result of a finished loop: thresholds never reached report the last
    round run."""
    masks_at = jnp.where(st.hit[:, None, None, None], st.masks_at, st.mask[None])
    return C2FResult(st.mask, st.score, st.r, st.inter, st.dsc, masks_at,
                     jnp.where(st.hit, st.round_at, st.r), st.overflow, st.voxels, st.hits,
                     st.boxes)


def coarse_to_fine(rstn: RSTN, params: Mapping[str, Any], image: jax.Array,
                   extent: jax.Array, score0: jax.Array, mask0: jax.Array,
                   t: jax.Array, *, spec: InferenceSpec, label: jax.Array | None = None,
                   crop_label: bool = False) -> C2FResult:
    """The coarse-to-fine iteration as one `lax.while_loop`.

    Args:
      rstn: model structure; params: {plane: params}.
      image: (X, Y, Z) float32 padded volume; extent: int32 (3,) real size.
      score0, mask0: round 0 from `fuse` ((X, Y, Z) float32 and bool).
      t: float32 scalar stopping threshold (traced); > 1 runs all rounds.
      label: optional (X, Y, Z) bool ground truth, for per-round DSC and
        for the weak oracle.
      crop_label: the paper's weak oracle: crop every round by the label's
        box (saliency still from the previous round); needs `label`.

    Returns:
      C2FResult.
    """
    if crop_label and label is None:
        raise InputError("crop_label: the weak oracle needs a label")
    st = init_state(score0, mask0, spec=spec, label=label)
    st = lax.while_loop(
        lambda s: should_continue(s, t, spec=spec),
        lambda s: round_step(rstn, params, image, extent, s, spec=spec, label=label,
                             crop_label=crop_label, score0=score0), st)
    return finish(st)


def strong_oracle(rstn: RSTN, params: Mapping[str, Any], image: jax.Array,
                  extent: jax.Array, label: jax.Array, *, spec: InferenceSpec
                  ) -> jax.Array:
    """The paper's strong oracle: the label drives both the crop box and the
    spatial weighting (saliency of the label map), one pass, fused and
    filtered. Returns (X, Y, Z) bool."""
    return fine_round(rstn, params, image, label.astype(jnp.float32), label, extent,
                      spec=spec)[1]


def gt_crop_oracle(rstn: RSTN, params: Mapping[str, Any], image: jax.Array,
                   extent: jax.Array, label: jax.Array, probs: jax.Array, *,
                   spec: InferenceSpec) -> jax.Array:
    """The reference's oracle test (4.4): per plane, saliency from that
    plane's own coarse map, crop from the label box, one pass; fused by the
    mean >= 0.5 without the component filter. probs: (P, X, Y, Z) coarse.
    Returns (X, Y, Z) bool."""
    valid = valid_mask(image.shape, extent)
    out = [fine_plane_prob(rstn, params[p], image, probs[i], label, extent, plane=p,
                           spec=spec)[0] for i, p in enumerate(spec.planes)]
    return (jnp.mean(jnp.stack(out), axis=0) >= 0.5) & valid


def report_threshold(spec: InferenceSpec, t: float) -> float:
    """The report threshold of `spec` equal to t (the loop keeps a mask for
    each report threshold only; equal means within 1e-9). Raises InputError
    naming infer.report_thresholds otherwise."""
    for tk in spec.report_thresholds:
        if abs(tk - float(t)) < 1e-9:
            return tk
    raise InputError(f"t: {t} is not among the report thresholds {spec.report_thresholds}; "
                     "add it to infer.report_thresholds")


def volume_bucket(shape: tuple[int, ...], buckets: tuple[int, ...]) -> tuple[int, int, int]:
    """Padded shape of a volume: each side up to the smallest bucket size
    that holds it; a side beyond the largest bucket rounds up to a multiple
    of 64 (documented; never truncated). Empty `buckets`: exact sizes."""
    if len(shape) != 3:
        raise InputError(f"volume: expected 3 dimensions, got shape {tuple(shape)}")
    if not buckets:
        return tuple(int(n) for n in shape)
    out = []
    for n in shape:
        fits = [b for b in sorted(buckets) if b >= n]
        out.append(fits[0] if fits else int(np.ceil(n / 64) * 64))
    return tuple(out)
