"""Crop around a map, static-canvas crop with a validity mask, paste back.

The fine network of an RSTN sees the (saliency-weighted) image cropped to
the bounding box of a reference map plus a margin (reference section 2.4)
and its logits are written back into a full-size map pre-filled with a
large negative number (section 2.5). Boxes vary in size, but jitted code
needs static shapes, so a crop goes into a fixed **canvas** chosen from a
configured set:

* the box content lands at the canvas's top-left corner, so the pixel grid
  of an FCN run on the canvas (its pooling and upsampling phases) is the
  grid of the same FCN run on a variable-size crop of the box;
* pixels of the canvas beyond the box are zero and marked invalid;
* one canvas per batch is chosen by `lax.switch` (the smallest that holds
  every box of the batch), so a step compiles once per canvas set and runs
  only the branch that fits;
* a box larger than the largest canvas is cut to a canvas-sized window
  around its centre, flagged and counted (never silent).

Each sample has its own box (not the reference's union-over-batch box,
reference section 7, issue #12).

Conventions (DESIGN.md): images NHWC; a box is int32 (4,) `[r0, r1, c0, c1]`
half-open in full-slice pixels; margins are int32 (4,) `[top, bottom, left,
right]`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from stnjax.checks import InputError, check_array, is_concrete

# Reference section 2.5: logits outside the box; sigmoid(FILL) == 0 in float32.
FILL = -9999999.0

# Where the J-mode box came from (`box_with_fallback`).
SOURCE_PREDICTION = 0
SOURCE_LABEL = 1
SOURCE_NONE = 2  # both maps empty: whole image; the caller skips the fine branch

Canvases = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------
# Box from a map
# --------------------------------------------------------------------------

def _first_last(flags: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and last index of True in a 1-D bool array (0, n-1 if none)."""
    n = flags.shape[0]
    first = jnp.argmax(flags)
    last = n - 1 - jnp.argmax(flags[::-1])
    return first.astype(jnp.int32), last.astype(jnp.int32)


def extent_mask(hw: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Pixel mask of real sizes: hw int32 (..., 2) -> bool (..., H, W).

    The real content of a padded slice is its top-left `hw` region (the
    padding convention of DESIGN.md: arrays carry sizes, and a mask is made
    only where a loss or a reduction needs one).
    """
    hw = jnp.asarray(hw)
    rows = jnp.arange(shape[0]) < hw[..., 0:1]
    cols = jnp.arange(shape[1]) < hw[..., 1:2]
    return rows[..., :, None] & cols[..., None, :]


def _check_hw(hw: jax.Array, name: str, lead: tuple[int, ...]) -> None:
    check_array(hw, name, dtype_kind="iu")
    if tuple(hw.shape) != lead + (2,):
        raise InputError(f"{name}: expected shape {lead + (2,)}, got {tuple(hw.shape)}")


def box_from_map(
    ref: jax.Array,
    margins: jax.Array,
    *,
    hw: jax.Array | None = None,
    threshold: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Bounding box of `ref >= threshold` (any channel) plus margins.

    Args:
      ref: (H, W, C) map (probability or label) of one sample.
      margins: int (4,) `[top, bottom, left, right]`, >= 0.
      hw: optional int32 (2,) real size (Hv, Wv) of a padded bucket, whose
        real image is the top-left region. Pixels outside it never activate
        and the box is clamped to it. None: the whole map is real.
      threshold: activation threshold (reference: 0.5).

    Returns:
      box: int32 (4,) `[r0, r1, c0, c1]` =
        `[max(minr - top, 0), min(maxr + bottom + 1, Hv))` x
        `[max(minc - left, 0), min(maxc + right + 1, Wv))`. For an empty
        map, the whole real image.
      nonempty: bool scalar, False when no pixel is activated.
    """
    check_array(ref, "ref", rank=3)
    check_array(margins, "margins", rank=1, dtype_kind="iu")
    if margins.shape[0] != 4:
        raise InputError(f"margins: expected shape (4,), got {tuple(margins.shape)}")
    h, w = ref.shape[0], ref.shape[1]
    act = jnp.any(ref >= threshold, axis=-1)
    if hw is not None:
        _check_hw(hw, "hw", ())
        hv, wv = (jnp.minimum(jnp.asarray(hw[i], jnp.int32), n) for i, n in enumerate((h, w)))
        act = act & extent_mask(jnp.stack([hv, wv]), (h, w))
    else:
        hv, wv = jnp.int32(h), jnp.int32(w)
    rows = jnp.any(act, axis=1)
    cols = jnp.any(act, axis=0)
    nonempty = jnp.any(rows)
    minr, maxr = _first_last(rows)
    minc, maxc = _first_last(cols)
    m = margins.astype(jnp.int32)
    box = jnp.stack([
        jnp.maximum(minr - m[0], 0),
        jnp.minimum(maxr + m[1] + 1, hv),
        jnp.maximum(minc - m[2], 0),
        jnp.minimum(maxc + m[3] + 1, wv),
    ])
    whole = jnp.stack([jnp.int32(0), hv, jnp.int32(0), wv])
    return jnp.where(nonempty, box, whole).astype(jnp.int32), nonempty


def boxes_from_maps(
    refs: jax.Array,
    margins: jax.Array,
    *,
    hw: jax.Array | None = None,
    threshold: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """`box_from_map` for a batch: refs (B, H, W, C), margins (4,) or (B, 4),
    hw int32 (B, 2) or None -> boxes int32 (B, 4), nonempty bool (B,)."""
    check_array(refs, "refs", rank=4)
    check_array(margins, "margins", rank=(1, 2), dtype_kind="iu")
    b = refs.shape[0]
    if margins.ndim == 1:
        margins = jnp.broadcast_to(margins, (b, margins.shape[0]))
    fn = lambda r, m, v: box_from_map(r, m, hw=v, threshold=threshold)
    if hw is None:
        return jax.vmap(lambda r, m: fn(r, m, None))(refs, margins)
    _check_hw(hw, "hw", (b,))
    return jax.vmap(fn)(refs, margins, hw)


def fixed_margins(margin: int = 20) -> jax.Array:
    """The test-time margins: int32 (4,) all equal to `margin`."""
    if int(margin) < 0:
        raise InputError(f"margin: must be >= 0, got {margin}")
    return jnp.full((4,), int(margin), jnp.int32)


def random_margins(
    key: jax.Array, *, margin: int = 20, prob_fixed: float = 0.5
) -> jax.Array:
    """Training margins (reference section 2.4): int32 (4,).

    With probability `prob_fixed` all four sides are `margin`; otherwise each
    side is an independent uniform integer in [0, 2 * margin].
    """
    if int(margin) < 0:
        raise InputError(f"margin: must be >= 0, got {margin}")
    k_fixed, k_sides = jax.random.split(key)
    fixed = jax.random.uniform(k_fixed) < prob_fixed
    sides = jax.random.randint(k_sides, (4,), 0, 2 * int(margin) + 1, jnp.int32)
    return jnp.where(fixed, jnp.int32(margin), sides).astype(jnp.int32)


def box_with_fallback(
    pred_ref: jax.Array,
    label_ref: jax.Array,
    margins: jax.Array,
    hw: jax.Array | None = None,
    *,
    threshold: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """J-mode box of one sample: from the prediction, else from the label.

    Args:
      pred_ref: (H, W, C) coarse probability.
      label_ref: (H, W, C) label.
      margins: int (4,).
      hw: optional int32 (2,) real size of a padded bucket.

    Returns:
      box: int32 (4,); the whole valid image when both maps are empty.
      source: int32 scalar, SOURCE_PREDICTION, SOURCE_LABEL or SOURCE_NONE
        (both empty: the caller skips or zeros the fine branch).
    """
    box_p, ok_p = box_from_map(pred_ref, margins, hw=hw, threshold=threshold)
    box_l, ok_l = box_from_map(label_ref, margins, hw=hw, threshold=threshold)
    box = jnp.where(ok_p, box_p, box_l)  # box_l is the whole image if empty
    source = jnp.where(ok_p, SOURCE_PREDICTION,
                       jnp.where(ok_l, SOURCE_LABEL, SOURCE_NONE))
    return box, source.astype(jnp.int32)


# --------------------------------------------------------------------------
# Canvas crop and paste back
# --------------------------------------------------------------------------

def _check_box(box: jax.Array, name: str, hw: tuple[int, int]) -> None:
    """Shape/dtype check; range check when the box is concrete."""
    check_array(box, name, dtype_kind="iu")
    if box.shape[-1:] != (4,):
        raise InputError(f"{name}: expected last axis of size 4, got {tuple(box.shape)}")
    if is_concrete(box):
        b = np.asarray(box).reshape(-1, 4)
        h, w = hw
        bad = ((b[:, 0] < 0) | (b[:, 0] > b[:, 1]) | (b[:, 1] > h)
               | (b[:, 2] < 0) | (b[:, 2] > b[:, 3]) | (b[:, 3] > w))
        if bad.any():
            raise InputError(
                f"{name}: box {b[np.argmax(bad)].tolist()} is not a half-open "
                f"[r0, r1, c0, c1] inside an image of size {hw}")


def _window(lo: jax.Array, hi: jax.Array, size: int, extent: int):
    """Kept [start, stop) of a box side [lo, hi) in a canvas side of `size`.

    If the box fits, it is kept whole; otherwise a `size`-long window centred
    on the box centre, clamped inside [0, extent) (it then lies in the box).
    """
    over = (hi - lo) > size
    centre = (lo + hi) // 2
    start_over = jnp.clip(centre - size // 2, 0, max(extent - size, 0))
    start = jnp.where(over, start_over, lo)
    stop = jnp.where(over, start_over + size, hi)
    return start.astype(jnp.int32), stop.astype(jnp.int32), over


def crop_to_canvas(
    image: jax.Array, box: jax.Array, canvas_hw: tuple[int, int]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Copies the box content of one image to the top-left of a canvas.

    Args:
      image: (H, W, C) float.
      box: int (4,) `[r0, r1, c0, c1]` inside the image.
      canvas_hw: static (Hc, Wc).

    Returns:
      crop: (Hc, Wc, C), image dtype; the (possibly cut) box content at the
        top-left, zero elsewhere.
      crop_valid: (Hc, Wc) bool, True on the box content.
      origin: int32 (2,), the image pixel of crop[0, 0].
      overflow: bool scalar, True when the box was larger than the canvas
        in a dimension and was cut to a centred window.
    """
    check_array(image, "image", rank=3, finite=True, dtype_kind="f")
    hc, wc = _canvas_hw(canvas_hw)
    h, w, c = image.shape
    _check_box(box, "box", (h, w))
    box = box.astype(jnp.int32)
    r0, r1, ov_r = _window(box[0], box[1], hc, h)
    c0, c1, ov_c = _window(box[2], box[3], wc, w)
    # Zero padding bottom/right by the canvas size: the slice start (<= H, W)
    # is then never clamped by dynamic_slice, and reads past the image are 0.
    padded = jnp.pad(image, ((0, hc), (0, wc), (0, 0)))
    window = lax.dynamic_slice(padded, (r0, c0, jnp.int32(0)), (hc, wc, c))
    crop_valid = ((jnp.arange(hc)[:, None] < (r1 - r0))
                  & (jnp.arange(wc)[None, :] < (c1 - c0)))
    crop = jnp.where(crop_valid[..., None], window, jnp.zeros((), image.dtype))
    return crop, crop_valid, jnp.stack([r0, c0]), ov_r | ov_c


def paste_logits(
    canvas_logits: jax.Array,
    crop_valid: jax.Array,
    origin: jax.Array,
    out_hw: tuple[int, int],
    *,
    fill: float = FILL,
) -> jax.Array:
    """Writes canvas logits back into a full-size map (reference section 2.5).

    Args:
      canvas_logits: (Hc, Wc, C) logits of the canvas.
      crop_valid: (Hc, Wc) bool from `crop_to_canvas`.
      origin: int32 (2,) from `crop_to_canvas`.
      out_hw: static (H, W) of the full image.
      fill: value outside the box (sigmoid(fill) = 0, no gradient there).

    Returns:
      (H, W, C) float32: the logits on the (possibly cut) box, `fill` elsewhere.
    """
    check_array(canvas_logits, "canvas_logits", rank=3, dtype_kind="f")
    hc, wc, c = canvas_logits.shape
    if tuple(crop_valid.shape) != (hc, wc):
        raise InputError(
            f"crop_valid: expected shape {(hc, wc)}, got {tuple(crop_valid.shape)}")
    h, w = int(out_hw[0]), int(out_hw[1])
    vals = jnp.where(crop_valid[..., None], canvas_logits.astype(jnp.float32),
                     jnp.float32(fill))
    # Same padding trick as the crop: the update never gets its start clamped.
    big = jnp.full((h + hc, w + wc, c), fill, jnp.float32)
    origin = origin.astype(jnp.int32)
    big = lax.dynamic_update_slice(big, vals, (origin[0], origin[1], jnp.int32(0)))
    return big[:h, :w]


# --------------------------------------------------------------------------
# Canvas buckets
# --------------------------------------------------------------------------

def _canvas_hw(canvas_hw: Sequence[int]) -> tuple[int, int]:
    try:
        hc, wc = (int(v) for v in canvas_hw)
    except (TypeError, ValueError):
        raise InputError(f"canvas: expected a pair (h, w) of ints, got {canvas_hw!r}") from None
    if hc < 1 or wc < 1:
        raise InputError(f"canvas: sizes must be >= 1, got {(hc, wc)}")
    return hc, wc


def check_canvases(
    canvases: Sequence[Sequence[int]],
    *,
    image_hw: tuple[int, int] | None = None,
    margin: int | None = None,
) -> Canvases:
    """Validates a canvas set and returns it as a tuple of (h, w) int pairs.

    The set must be non-empty and sorted by area (non-decreasing). With
    `margin`, every canvas must hold the smallest box a map can give with
    that margin on all sides: min(2 * margin + 1, image side) per dimension.
    """
    if not isinstance(canvases, (tuple, list)) or not canvases:
        raise InputError(f"canvases: expected a non-empty sequence of (h, w), got {canvases!r}")
    out = tuple(_canvas_hw(cv) for cv in canvases)
    areas = [h * w for h, w in out]
    if any(a > b for a, b in zip(areas, areas[1:])):
        raise InputError(f"canvases: must be sorted by area, got {out}")
    if margin is not None:
        need_h = need_w = 2 * int(margin) + 1
        if image_hw is not None:
            need_h, need_w = min(need_h, int(image_hw[0])), min(need_w, int(image_hw[1]))
        for hc, wc in out:
            if hc < need_h or wc < need_w:
                raise InputError(
                    f"canvas {(hc, wc)} cannot hold a box with margin {int(margin)} "
                    f"(needs at least {(need_h, need_w)})")
    return out


def canvases_for(
    image_hw: tuple[int, int],
    sizes: Sequence[int | Sequence[int]],
    *,
    margin: int | None = None,
) -> Canvases:
    """A canvas set for images of `image_hw`: the given sizes clamped to the
    image, de-duplicated, sorted by area, ending with the full image size
    (so a box never overflows). `sizes` holds ints (square) or (h, w)."""
    h, w = _canvas_hw(image_hw)
    cands = set()
    for s in sizes:
        hc, wc = _canvas_hw((s, s) if isinstance(s, (int, np.integer)) else s)
        cands.add((min(hc, h), min(wc, w)))
    cands.add((h, w))
    out = tuple(sorted(cands, key=lambda hw: (hw[0] * hw[1], hw)))
    return check_canvases(out, image_hw=(h, w), margin=margin)


def select_canvas(box_hw: jax.Array, canvases: Sequence[Sequence[int]]) -> tuple[jax.Array, jax.Array]:
    """Picks the smallest canvas (first in area order) holding every box.

    Args:
      box_hw: int (B, 2) box heights and widths of the batch.
      canvases: static canvas set sorted by area.

    Returns:
      index: int32 scalar into `canvases`; the last (largest) if none fits.
      overflow: bool scalar, True when no canvas holds every box.
    """
    cv = check_canvases(canvases)
    check_array(box_hw, "box_hw", rank=2, dtype_kind="iu")
    arr = jnp.asarray(np.array(cv, np.int32))                      # (K, 2)
    fits = jnp.all(box_hw[:, None, :] <= arr[None, :, :], axis=(0, 2))  # (K,)
    any_fit = jnp.any(fits)
    index = jnp.where(any_fit, jnp.argmax(fits), len(cv) - 1)
    return index.astype(jnp.int32), ~any_fit


def _check_fine_inputs(image: jax.Array, boxes: jax.Array, canvases: Sequence[Sequence[int]],
                       active: jax.Array | None, margin: int | None
                       ) -> tuple[list[tuple[int, int]], jax.Array, jax.Array]:
    """`fine_on_canvas`'s argument checks; returns (canvases, int32 boxes, bool active)."""
    check_array(image, "image", rank=4, finite=True, dtype_kind="f")
    b, h, w, _ = image.shape
    cv = check_canvases(canvases, image_hw=(h, w), margin=margin)
    check_array(boxes, "boxes", rank=2, dtype_kind="iu")
    if boxes.shape[0] != b:
        raise InputError(f"boxes: expected shape ({b}, 4), got {tuple(boxes.shape)}")
    _check_box(boxes, "boxes", (h, w))
    if active is None:
        return cv, boxes.astype(jnp.int32), jnp.ones((b,), bool)
    check_array(active, "active", rank=1)
    if active.shape[0] != b:
        raise InputError(f"active: expected shape ({b},), got {tuple(active.shape)}")
    return cv, boxes.astype(jnp.int32), active.astype(bool)


def _canvas_branch(fn: Callable, canvas_hw: tuple[int, int], image_hw: tuple[int, int], *,
                   fill: float, pass_hw: bool) -> Callable:
    """The `lax.switch` branch of one canvas: crop every sample into it, run
    `fn`, paste the logits back; returns (logits (B, H, W, Co), overflow count)."""
    h, w = image_hw

    def run(image, boxes, active):
        crops, valid, origin, over = jax.vmap(
            lambda im, bx: crop_to_canvas(im, bx, canvas_hw))(image, boxes)
        valid = valid & active[:, None, None]
        crops = jnp.where(valid[..., None], crops, jnp.zeros((), crops.dtype))
        hw = jnp.stack([valid.any(axis=2).sum(axis=1),       # rows kept
                        valid.any(axis=1).sum(axis=1)], -1)  # cols kept
        out = fn(crops, hw.astype(jnp.int32)) if pass_hw else fn(crops)
        if out.ndim != 4 or out.shape[:3] != crops.shape[:3]:
            raise InputError(
                f"fn: expected logits of shape {crops.shape[:3]} + (C,), "
                f"got {tuple(out.shape)} for canvas {canvas_hw}")
        logits = jax.vmap(lambda lg, v, o: paste_logits(lg, v, o, (h, w), fill=fill))(
            out, valid, origin)
        return logits, jnp.sum(over & active).astype(jnp.int32)
    return run


def fine_on_canvas(
    fn: Callable[[jax.Array], jax.Array],
    image: jax.Array,
    boxes: jax.Array,
    canvases: Sequence[Sequence[int]],
    *,
    fill: float = FILL,
    active: jax.Array | None = None,
    margin: int | None = None,
    pass_hw: bool = False,
    remat_full: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs `fn` on per-sample box crops of a batch and pastes the logits back.

    Every sample is cropped into one canvas, chosen for the whole batch by
    `select_canvas`; `lax.switch` then runs only that branch. The index must
    be a batch-level scalar: do not `vmap` this function over the batch axis
    (under vmap the switch turns into a select that runs every branch). Under
    `pmap`/`shard_map` each device picks its own canvas, which is fine.

    Gradients flow to `image` (and hence to a saliency map multiplied into
    it) inside each box, and are zero outside it. Boxes are integers and get
    no gradient.

    Args:
      fn: crops (B, Hc, Wc, C) -> logits (B, Hc, Wc, Co); shape-polymorphic
        in (Hc, Wc), e.g. a Flax `apply` with bound parameters. With
        `pass_hw`, fn(crops, crop_hw) also gets int32 (B, 2), the height and
        width of each sample's content (0 for inactive samples), so a network
        can mask its activations to the extent a variable-size crop would
        have (see the note below).
      image: (B, H, W, C) float.
      boxes: int (B, 4).
      canvases: static canvas set sorted by area (see `canvases_for`).
      fill: logit outside the boxes.
      active: optional bool (B,); inactive samples (e.g. both maps empty)
        take no part in the canvas choice, see a zero crop and get `fill`
        everywhere (probability 0, reference's skipped windows).
      margin: optional; checks that every canvas holds a box of this margin.
      pass_hw: call fn(crops, crop_hw) instead of fn(crops).
      remat_full: recompute the last (full-image) canvas's forward in its
        backward (`jax.checkpoint`). Why: JAX's forward switch returns the
        residuals of every branch, each branch writing zeros for the others',
        so every step wrote the largest canvas's; with remat they are the
        branch's inputs, shared by all. A step that takes the full canvas
        runs its forward twice. Same values; no effect with one canvas.

    Note on equivalence with a variable-size crop: the crop itself is exact
    (same pixels, same top-left grid). A network run on the canvas sees the
    canvas's zeros beyond the box where the same network run on the box
    alone sees its own padding and array edge, so a plain fn(crops) differs
    inside the box: along its bottom/right edge for a shallow network, and
    everywhere in it for FCN-8s with nonzero biases (receptive field ~400
    px; up to ~6 % of the logit scale for "reference" and ~50 % for "pad32"
    at width 1/16, tests/test_crop.py). With `pass_hw=True` and an fn that
    hands `crop_hw` to the network as `FCN8s.__call__(..., valid_hw=crop_hw)`,
    every layer is masked to the extent it has on the box alone, and the
    logits inside each box EQUAL those of FCN8s run on the variable-size crop
    (both variants, float rounding; asserted to 1e-5 in tests/test_crop.py).
    An inactive sample (crop_hw 0) gets zero logits from the network and
    `fill` here; a cut (overflowing) box equals the network on the cut window.

    Returns:
      logits: (B, H, W, Co) float32.
      info: dict of int32 scalars: 'canvas_index', 'canvas_h', 'canvas_w',
        'overflow_count' (active samples whose box was cut; count these).
    """
    cv, boxes, active = _check_fine_inputs(image, boxes, canvases, active, margin)
    h, w = image.shape[1:3]
    box_hw = jnp.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], -1)
    box_hw = jnp.where(active[:, None], box_hw, 0)
    index, _ = select_canvas(box_hw, cv)
    branches = [_canvas_branch(fn, c, (h, w), fill=fill, pass_hw=pass_hw) for c in cv]
    if remat_full and len(branches) > 1:
        branches[-1] = jax.checkpoint(branches[-1])
    logits, n_over = lax.switch(index, branches, image, boxes, active)
    sizes = jnp.asarray(np.array(cv, np.int32))
    info = {"canvas_index": index, "canvas_h": sizes[index, 0],
            "canvas_w": sizes[index, 1], "overflow_count": n_over}
    return logits, info
