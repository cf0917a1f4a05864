"""Synthetic abdominal CT phantoms: the built-in dataset.

A phantom is a contrast-enhanced (portal-venous) abdominal CT volume with a
multi-class label map, drawn from a seeded random virtual patient. This module
holds the generator's settings (`PhantomConfig`), the rendered case
(`Phantom`) and the public generator (`render_phantom`, `make_phantom`): it
lays out the anatomy, then turns tissue classes into HU with per-case contrast,
texture, the scanner blur and noise. The anatomy and the label / tissue
catalogue (`LABELS`, `PANCREAS_ID`, `TISSUES`, `TISSUE_ID`, re-exported here)
live in `stnjax.phantom.anatomy`; grid, canvas and shape helpers (and
`REFERENCE_FOV_MM`, re-exported here) in `stnjax.phantom.geometry`.

The task is meant to be hard in the ways that matter for the method: the
pancreas is well under 1.5 % of every axial slice, and its HU (about 60-110)
overlaps the duodenum, the chyme-filled bowel loops, lymph nodes, the stomach
wall and the partial-volume rim of the vessels next to it.

Geometry: the virtual patient is laid out in millimetres inside a reference
field of view `REFERENCE_FOV_MM` (320 x 320 x 256 mm, canonical PLS axes:
axis 0 anterior -> posterior, axis 1 right -> left, axis 2 inferior ->
superior) and sampled on the configured grid, so any shape shows the whole
abdomen. The default grid, 128 x 128 x 64, has the true spacing 2.5 x 2.5 x
4.0 mm (an abdominal CT downsampled about 3-4x, anisotropic like the real
data). An explicit `spacing` only changes the voxel size written to file.

Label ids follow TotalSegmentator v2 ("total" task), see `LABELS`; the pancreas
is 7.

Intensities (HU after blur and noise; the tests hold the means to these
ranges, big structures eroded by one voxel): subcutaneous fat -120..-85,
muscle 35..65, liver 75..110, spleen 85..125, kidney cortex 140..215,
pancreas 55..110 (parenchyma ~100 with fatty clefts and partial volume),
aorta 150..215, portal/splenic vein 130..200, vertebrae 380..700 (cortex
~700, marrow ~330), lung -900..-780, air -1000; the stomach holds gas
(-1000) over fluid or chyme; bowel mixes fluid (~15), chyme (~65) and gas. Everything is vectorised
NumPy/SciPy: one default case takes a fraction of a second. The same seed
gives the same case on every machine.

Dataset folders of phantoms (NIfTI files, manifest, folds) and their
summaries are written by `stnjax.phantom.dataset`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage

from stnjax.checks import InputError
from stnjax.phantom.anatomy import LABELS, PANCREAS_ID, TISSUE_ID, TISSUES, paint_anatomy
from stnjax.phantom.geometry import REFERENCE_FOV_MM, Canvas, Grid, coarse_noise, smooth_noise

__all__ = ["LABELS", "PANCREAS_ID", "REFERENCE_FOV_MM", "TISSUES", "TISSUE_ID", "Phantom",
           "PhantomConfig", "make_phantom", "render_phantom"]

_T = TISSUE_ID


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """How phantoms are sampled.

    Attributes:
      shape: voxels per canonical axis (P, L, S).
      spacing: mm per voxel written to file; None = REFERENCE_FOV_MM / shape.
      noise_hu: std of the (slightly correlated) Gaussian noise, HU.
      blur_mm: std of the Gaussian point-spread function, mm of the patient.
      pancreas_scale: scales the pancreas radii (1 = adult-like).
      max_pancreas_fraction: the pancreas is shrunk until no axial slice holds
        more than this fraction of pancreas voxels.
      num_bowel_loops: small-bowel loops besides the duodenum.
    """
    shape: tuple[int, int, int] = (128, 128, 64)
    spacing: tuple[float, float, float] | None = None
    noise_hu: float = 12.0
    blur_mm: float = 1.2
    pancreas_scale: float = 1.0
    max_pancreas_fraction: float = 0.012
    num_bowel_loops: int = 9

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 16:
            raise InputError(f"PhantomConfig.shape: need 3 sizes >= 16, got {self.shape}")
        object.__setattr__(self, "shape", shape)
        if self.spacing is not None:
            spacing = tuple(float(s) for s in self.spacing)
            if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
                raise InputError(f"PhantomConfig.spacing: need 3 positive mm, got {self.spacing}")
            object.__setattr__(self, "spacing", spacing)
        for name in ("noise_hu", "blur_mm"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise InputError(f"PhantomConfig.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.3 <= self.pancreas_scale <= 2.0:
            raise InputError("PhantomConfig.pancreas_scale: must be in [0.3, 2], "
                             f"got {self.pancreas_scale}")
        if not 0.001 <= self.max_pancreas_fraction <= 0.05:
            raise InputError("PhantomConfig.max_pancreas_fraction: must be in [0.001, 0.05], "
                             f"got {self.max_pancreas_fraction}")
        if not 0 <= self.num_bowel_loops <= 40:
            raise InputError("PhantomConfig.num_bowel_loops: must be in [0, 40], "
                             f"got {self.num_bowel_loops}")

    @property
    def voxel_spacing(self) -> np.ndarray:
        """(3,) float64 mm per voxel as written to file."""
        if self.spacing is not None:
            return np.asarray(self.spacing, np.float64)
        return np.asarray(REFERENCE_FOV_MM) / np.asarray(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (the spacing resolved)."""
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["spacing"] = [float(s) for s in self.voxel_spacing]
        return d


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One rendered case: hu float32 (X,Y,Z), labels uint8 (X,Y,Z) with
    `LABELS` ids, tissue uint8 (X,Y,Z) indexing `TISSUES`, spacing (3,) mm."""
    hu: np.ndarray
    labels: np.ndarray
    tissue: np.ndarray
    spacing: np.ndarray


def _case_means(rng):
    """Per-case tissue means: contrast enhancement and parenchyma vary."""
    means = np.array([m for _, m, _ in TISSUES], np.float32)
    enhance = rng.uniform(0.85, 1.1)  # contrast timing scales vessel enhancement
    for name in ("artery", "portal_vein", "ivc", "liver_vessel", "kidney_cortex"):
        means[_T[name]] = 40 + (means[_T[name]] - 40) * enhance
    for name in ("liver", "spleen", "pancreas", "gut_wall", "gut_chyme", "lymph_node"):
        means[_T[name]] += rng.uniform(-8, 8)
    return means



def render_phantom(seed: int, config: PhantomConfig = PhantomConfig()) -> Phantom:
    """Renders one synthetic case, deterministic in (seed, config).

    Returns a `Phantom`: hu float32 (X,Y,Z) integral HU in [-1024, 3071],
    labels uint8 (X,Y,Z) with `LABELS` ids, tissue uint8 (X,Y,Z) indexing
    `TISSUES`, spacing float64 (3,) mm. X,Y,Z = config.shape, canonical PLS.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed: expected a non-negative int, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    g, cv = Grid(config.shape), Canvas(config.shape)
    mm = lambda x: x / g.step  # noqa: E731  mm -> voxels per axis
    wob = coarse_noise(rng, g.shape, mm(12.0))   # low-frequency organ outline wobble
    tex = smooth_noise(rng, g.shape, mm(2.5))    # tissue texture / content mottling
    lob = smooth_noise(rng, g.shape, mm(3.0))    # pancreas lobulation
    paint_anatomy(rng, g, cv, wob, tex, lob, config)
    means = _case_means(rng)
    stds = np.array([s for _, _, s in TISSUES], np.float32)
    hu = means[cv.tissue] + stds[cv.tissue] * tex
    if config.blur_mm > 0:  # scanner point-spread function (partial volume)
        hu = ndimage.gaussian_filter(hu, mm(config.blur_mm), mode="nearest")
    if config.noise_hu > 0:  # quantum noise, slightly correlated like reconstructed CT
        hu += config.noise_hu * smooth_noise(rng, g.shape, 0.6)
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.float32)
    return Phantom(hu=hu, labels=cv.label, tissue=cv.tissue, spacing=config.voxel_spacing)


def make_phantom(seed: int, config: PhantomConfig = PhantomConfig()
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: (hu float32 (X,Y,Z), labels uint8 (X,Y,Z),
    spacing float64 (3,) mm); see `render_phantom`."""
    p = render_phantom(seed, config)
    return p.hu, p.labels, p.spacing
