"""Training-time augmentation of slice windows (beyond the reference).

The reference trains on the slices as they are: with ~80 NIH volumes and
hours of training it needs nothing else. From a handful of volumes (the
real-CT CPU recipe trains on six BTCV cases) the networks see every
training slice dozens of times and learn the cases rather than the organ.
`augment_window` draws a small in-plane similarity transform (zoom,
rotation, shift) and a contrast/brightness change per sample, the same for
the three channels of a window and for its label, on the slice's real
extent (the padded area of a bucket stays zero). An optional smooth
elastic warp (a random displacement field on a coarse grid of control
points) adds the non-rigid variation between abdomens that a similarity
cannot.

No flips: left and right, front and back are anatomy (the pancreas lies
left of the spine, the liver right); a flipped abdomen is not a plausible
input.

All of it is off by default (`AugmentSpec()`, the reference). Each draw is
a pure function of the generator the sampler seeds from (seed, step,
global batch slot), so a batch is the same on one device or several.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from scipy import ndimage

from stnjax.checks import InputError

_LIMITS = {"scale": 0.5, "rotate": 45.0, "shift": 0.25, "intensity": 0.5, "gain": 1.0,
           "elastic": 32.0}
# Control points of the elastic warp lie this many pixels apart (48 mm at the
# real-CT recipe's 1.5 mm): organ-sized bends, not pixel noise.
ELASTIC_GRID = 32


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """The ranges of the random transform (the config's `data.augment.*`).

    Attributes:
      scale: zoom factor drawn log-uniformly in [1/(1+scale), 1+scale].
      rotate: in-plane rotation drawn uniformly in [-rotate, rotate] degrees.
      shift: translation per axis, uniform in [-shift, shift] x the side.
      intensity: contrast factor in [1-intensity, 1+intensity] about the
        window's middle (0.5) and brightness offset in [-intensity/2,
        intensity/2], then clipped to [0, 1] (the HU window's range).
      gain: factor drawn log-uniformly in [1/(1+gain), 1+gain] that
        multiplies the windowed image about the window's low end (0, i.e.
        -100 HU): fat and air stay where they are while every tissue above
        moves in proportion to its distance from fat, as contrast uptake
        varies between scans and phases (BTCV9's pancreas means range from
        11 to 168 HU between volumes; bench/RESULTS.md, session 14). Then
        clipped to [0, 1]. A seventh draw, made only when gain > 0, so the
        draws of specs without it are unchanged.
      elastic: how far, in pixels, the control points of a smooth random
        warp move: each point of a grid `ELASTIC_GRID` pixels apart moves
        by a uniform draw in [-elastic, elastic] per axis, and a cubic
        spline through them moves every pixel (`elastic_field`). Drawn
        after all the above, only when elastic > 0.
    All 0: no augmentation (the reference).
    """
    scale: float = 0.0
    rotate: float = 0.0
    shift: float = 0.0
    intensity: float = 0.0
    gain: float = 0.0
    elastic: float = 0.0

    def __post_init__(self):
        for name, hi in _LIMITS.items():
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= hi):
                raise InputError(f"data.augment.{name}: expected a number in [0, {hi}], got {v!r}")

    @property
    def active(self) -> bool:
        return any(getattr(self, n) > 0 for n in _LIMITS)

    @property
    def geometric(self) -> bool:
        return self.scale > 0 or self.rotate > 0 or self.shift > 0 or self.elastic > 0

    @classmethod
    def from_config(cls, section) -> "AugmentSpec":
        """From the `data.augment` mapping; absent (older configs): off."""
        d = dict(section or {})
        unknown = sorted(set(d) - set(_LIMITS))
        if unknown:
            raise InputError(f"data.augment: unknown field(s) {unknown}; expected {sorted(_LIMITS)}")
        return cls(**{k: float(v) for k, v in d.items()})


def draw_transform(rng: np.random.Generator, spec: AugmentSpec, hw: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A random similarity transform of an (h, w) slice about its centre.

    Returns (matrix (2, 2), offset (2,)) float64 that map an output pixel
    (row, col) to the input position matrix @ (row, col) + offset (scipy's
    `affine_transform` convention). Draws exactly four numbers from `rng`.
    """
    u = rng.uniform(-1.0, 1.0, size=4)
    zoom = math.exp(u[0] * math.log1p(spec.scale))
    angle = math.radians(u[1] * spec.rotate)
    c, s = math.cos(angle), math.sin(angle)
    # Output -> input: rotate by -angle and shrink by the zoom.
    matrix = np.array([[c, s], [-s, c]]) / zoom
    centre = (np.asarray(hw, np.float64) - 1.0) / 2.0
    shift = u[2:] * spec.shift * np.asarray(hw, np.float64)
    offset = centre - matrix @ centre - shift
    return matrix, offset


def elastic_field(rng: np.random.Generator, elastic: float, hw: tuple[int, int]
                  ) -> np.ndarray:
    """A smooth random displacement field over an (h, w) slice.

    Control points sit on a grid of gh x gw = (ceil((h-1)/G) + 1) x
    (ceil((w-1)/G) + 1) nodes spread evenly over the slice, G =
    `ELASTIC_GRID`, corners included; each moves by a uniform draw in
    [-elastic, elastic] pixels per axis (2 x gh x gw draws from `rng`). A
    cubic spline through the nodes gives every pixel's displacement: it
    equals the drawn values at the nodes and is smooth between them.

    Returns (2, h, w) float64: the (row, col) displacement of each output
    pixel's sample position.
    """
    gh, gw = (max(-(-(n - 1) // ELASTIC_GRID) + 1, 2) for n in hw)
    nodes = rng.uniform(-elastic, elastic, size=(2, gh, gw))
    # The 2-D spline is the tensor product of 1-D ones: rows @ nodes @ cols.T.
    rows, cols = _spline_matrix(hw[0], gh), _spline_matrix(hw[1], gw)
    return np.stack([rows @ nodes[k] @ cols.T for k in range(2)])


@functools.lru_cache(maxsize=64)
def _spline_matrix(n: int, g: int) -> np.ndarray:
    """(n, g) float64: row p holds the weights of the g nodes in the cubic
    spline through them at pixel p; pixel p sits at node coordinate
    p (g-1)/(n-1), so the first and last pixels are nodes."""
    pos = np.linspace(0.0, g - 1.0, n)[None]
    return np.stack([ndimage.map_coordinates(e, pos, order=3, mode="nearest")
                     for e in np.eye(g)], axis=1)


def _warp(image: np.ndarray, label: np.ndarray, matrix: np.ndarray, offset: np.ndarray,
          field: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Resamples (h, w, C) image (linear) and label (nearest) at matrix @ p +
    offset (+ field(p)) for every output pixel p; 0 outside the slice."""
    if field is None:
        warp = lambda a, k, order: ndimage.affine_transform(
            a[..., k], matrix, offset, order=order, mode="constant", cval=0.0)
    else:
        grid = np.mgrid[:image.shape[0], :image.shape[1]].astype(np.float64)
        coords = np.einsum("ij,jhw->ihw", matrix, grid) + offset[:, None, None] + field
        warp = lambda a, k, order: ndimage.map_coordinates(
            a[..., k], coords, order=order, mode="constant", cval=0.0)
    img = np.stack([warp(image, k, 1) for k in range(image.shape[2])], axis=-1)
    lab = np.stack([warp(label, k, 0) for k in range(label.shape[2])], axis=-1)
    return img, lab


def augment_window(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                   spec: AugmentSpec) -> tuple[np.ndarray, np.ndarray]:
    """One random transform of a training window, image and label alike.

    Args:
      image: (h, w, 3) float32 in [0, 1] (the real extent, no padding).
      label: (h, w, 3) float32 in {0, 1}.
      rng: the sample's generator (six draws; one more with a gain, then the
        elastic nodes).
      spec: the ranges; an inactive spec returns the inputs unchanged.

    Returns:
      (image, label): new (h, w, 3) float32 arrays. Geometry: bilinear for
      the image, nearest for the label (it stays binary); pixels that come
      from outside the slice are 0 in both (below the HU window, no organ).
    """
    if image.shape != label.shape or image.ndim != 3:
        raise InputError(f"augment_window: image {image.shape} and label {label.shape} must "
                         "be equal (h, w, C) shapes")
    if not spec.active:
        return image, label
    # Every draw first, in a fixed order, so a spec's samples never depend on
    # how the transform is applied.
    matrix, offset = draw_transform(rng, spec, image.shape[:2])
    a, b = rng.uniform(-1.0, 1.0, size=2)
    gain = math.exp(rng.uniform(-1.0, 1.0) * math.log1p(spec.gain)) if spec.gain > 0 else 1.0
    field = elastic_field(rng, spec.elastic, image.shape[:2]) if spec.elastic > 0 else None
    if spec.geometric:
        img, lab = _warp(image, label, matrix, offset, field)
    else:
        img, lab = image.copy(), label.copy()
    if spec.intensity > 0:
        img = (img - 0.5) * (1.0 + a * spec.intensity) + 0.5 + b * spec.intensity / 2.0
        np.clip(img, 0.0, 1.0, out=img)
    if spec.gain > 0:
        img = img * gain
        np.clip(img, 0.0, 1.0, out=img)
    return img.astype(np.float32), lab.astype(np.float32)
