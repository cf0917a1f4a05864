"""The typed data settings of a run: which dataset, folds, planes and batches.

`DataSpec` is what the library reads; a launcher makes it from the config's
`data` section once, at the top (`DataSpec.from_config`), where every field
is checked and a bad one raises InputError naming `data.<field>`. Nothing
below the launchers reads the config itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from stnjax.checks import InputError, check_range
from stnjax.data.augment import AugmentSpec
from stnjax.data.orientation import check_orientation
from stnjax.data.preprocess import HU_WINDOW, PLANES
from stnjax.data.resample import check_spacing
from stnjax.data.volume_io import organ_ids

ORDERS = ("uniform", "epoch")
FOLD_RULES = ("position", "nih_pancreas")


def resolve_planes(spec: Any) -> tuple[str, ...]:
    """"XYZ", "Z", "X,Z" ... -> ordered unique planes; InputError naming data.planes."""
    planes = [p for p in str(spec).upper().replace(",", "") if not p.isspace()]
    bad = [p for p in planes if p not in PLANES]
    if not planes or bad:
        raise InputError(f"data.planes: expected letters from 'XYZ', got {spec!r}")
    return tuple(p for p in PLANES if p in planes)


def resolve_folds(spec: Any, n_folds: int) -> tuple[int, ...]:
    """"0", "0,2" or "all" -> sorted fold numbers; InputError naming data.folds."""
    s = str(spec).strip().lower()
    if s == "all":
        return tuple(range(int(n_folds)))
    try:
        folds = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise InputError(f"data.folds: expected 'all' or comma-separated ints, got {spec!r}") from None
    if not folds or any(not 0 <= f < n_folds for f in folds):
        raise InputError(f"data.folds: expected folds in [0, {n_folds}), got {spec!r}")
    return tuple(folds)


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
    """The built-in synthetic dataset (used when DataSpec.dir is empty)."""
    num_cases: int = 8
    shape: tuple[int, int, int] = (128, 128, 64)
    spacing: tuple[float, float, float] | None = (0.8, 0.8, 2.5)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The fields as the config spells them (the phantom folder's hash)."""
        return {"num_cases": self.num_cases, "seed": self.seed, "shape": list(self.shape),
                "spacing": None if self.spacing is None else list(self.spacing)}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Dataset, folds, planes, slice selection and batching of a run.

    Attributes (the config's `data.*` fields, launch/configs/common.py):
      dir: dataset folder with dataset.json; "" for the built-in phantoms.
      organ_id: the label value of the organ; -1 takes dataset.json's.
      organ_ids: several label values merged into one organ (e.g. MSD
        Task07's pancreas 1 and tumour 2); () = organ_id. Overrides it.
      spacing: (3,) mm per canonical axis that every case is resampled to
        (images linearly, labels by nearest neighbour; `data.resample`), or
        None for the native grid (the reference).
      orientation: the voxel order the models see (`stnjax.data.orientation`):
        "canonical" (PLS) or "official" (the official RSTN pipeline's storage
        order: DICOM rows, columns, InstanceNumber; a NIfTI's stored array
        transposed (1, 0, 2)); "official" takes neither `spacing` nor the
        built-in phantoms.
      hu_window: (low, high) HU window.
      planes, folds: resolved, e.g. ("X", "Y", "Z") and (0,).
      n_folds, fold_rule: the fold table made when folds.json is absent.
      slice_threshold: training slice selection (reference 1.6).
      negatives: organ-free training slices added per organ slice
        (`sampler.add_negative_slices`; 0 = none, the reference).
      buckets: padded slice sides; batch_size: the global batch.
      order: "uniform" (Caffe) or "epoch" (PyTorch) sampling.
      cache_dir: decoded volumes ("" : <workdir>/cache).
      phantom: the built-in dataset's settings.
      augment: random zoom, rotation, shift and contrast of training samples
        (`stnjax.data.augment`); all 0 = none (the reference).
    """
    dir: str = ""
    organ_id: int = -1
    organ_ids: tuple[int, ...] = ()
    spacing: tuple[float, float, float] | None = None
    orientation: str = "canonical"
    hu_window: tuple[float, float] = HU_WINDOW
    planes: tuple[str, ...] = PLANES
    folds: tuple[int, ...] = (0,)
    n_folds: int = 4
    fold_rule: str = "position"
    slice_threshold: float = 0.98
    negatives: float = 0.0
    buckets: tuple[int, ...] = (512,)
    batch_size: int = 1
    order: str = "uniform"
    cache_dir: str = ""
    phantom: PhantomSpec = PhantomSpec()
    augment: AugmentSpec = AugmentSpec()

    def __post_init__(self):
        lo, hi = self.hu_window
        if not lo < hi:
            raise InputError(f"data.hu_window: expected low < high, got {self.hu_window}")
        check_range(self.slice_threshold, "data.slice_threshold", 0.0, lo_open=True)
        check_range(self.negatives, "data.negatives", 0.0)
        if self.spacing is not None:
            check_spacing(self.spacing)
        self._check_orientation()
        if self.n_folds < 2:
            raise InputError(f"data.n_folds: expected >= 2, got {self.n_folds}")
        if not self.dir and self.phantom.num_cases < self.n_folds:
            raise InputError(f"data.phantom.num_cases: expected >= data.n_folds "
                             f"({self.n_folds}), got {self.phantom.num_cases}")
        if self.batch_size < 1:
            raise InputError(f"data.batch_size: expected >= 1, got {self.batch_size}")
        if not self.buckets or min(self.buckets) < 1:
            raise InputError(f"data.buckets: expected positive sizes, got {self.buckets}")
        if self.order not in ORDERS:
            raise InputError(f"data.order: expected one of {ORDERS}, got {self.order!r}")
        if self.fold_rule not in FOLD_RULES:
            raise InputError(f"data.fold_rule: expected one of {FOLD_RULES}, "
                             f"got {self.fold_rule!r}")
        if any(not 0 <= f < self.n_folds for f in self.folds) or not self.folds:
            raise InputError(f"data.folds: expected folds in [0, {self.n_folds}), "
                             f"got {self.folds}")
        if tuple(resolve_planes("".join(self.planes))) != tuple(self.planes):
            raise InputError(f"data.planes: expected ordered planes from {PLANES}, "
                             f"got {self.planes}")

    def _check_orientation(self) -> None:
        """InputError naming data.orientation: an unknown value, or "official"
        with a resampled grid or the built-in phantoms."""
        check_orientation(self.orientation, "data.orientation")
        if self.orientation != "official":
            return
        if self.spacing is not None:
            raise InputError(
                f"data.orientation: 'official' feeds each volume in its own storage order, "
                f"never resampled (as the official pipeline), but data.spacing is "
                f"{list(self.spacing)} (mm per canonical axis); set data.spacing=() or "
                "data.orientation='canonical'")
        if not self.dir:
            raise InputError(
                "data.orientation: 'official' is the storage order of the official "
                "pipeline's DICOM / NIfTI inputs; the built-in phantoms (data.dir='') "
                "have none: use data.orientation='canonical' or give data.dir")

    @classmethod
    def from_config(cls, data: Any) -> "DataSpec":
        """The spec of a config's `data` section (a ConfigDict or a mapping)."""
        d = data if isinstance(data, Mapping) else data.to_dict()
        ph = d["phantom"]
        n_folds = int(d["n_folds"])
        phantom = PhantomSpec(num_cases=int(ph["num_cases"]),
                              shape=tuple(int(s) for s in ph["shape"]),
                              spacing=None if ph["spacing"] is None else
                              tuple(float(s) for s in ph["spacing"]),
                              seed=int(ph["seed"]))
        if d["dir"] is None:  # a config's placeholder: the dataset must be given
            raise InputError("data.dir: this config needs a dataset folder "
                             "(--config.data.dir=<folder with dataset.json>)")
        organ = d["organ_id"]
        ids = tuple(d.get("organ_ids") or ())
        return cls(dir=str(d["dir"] or ""), organ_id=-1 if organ is None else int(organ),
                   organ_ids=organ_ids(ids, "data.organ_ids") if ids else (),
                   spacing=check_spacing(d.get("spacing")),
                   # Absent from configs written before the field existed.
                   orientation=check_orientation(d.get("orientation", "canonical"),
                                                 "data.orientation"),
                   hu_window=tuple(float(v) for v in d["hu_window"]),
                   planes=resolve_planes(d["planes"]), folds=resolve_folds(d["folds"], n_folds),
                   n_folds=n_folds, fold_rule=str(d["fold_rule"]),
                   slice_threshold=float(d["slice_threshold"]),
                   negatives=float(d.get("negatives", 0.0)),
                   buckets=tuple(int(b) for b in d["buckets"]),
                   batch_size=int(d["batch_size"]), order=str(d["order"]),
                   cache_dir=str(d["cache_dir"] or ""), phantom=phantom,
                   # Absent from configs written before the field existed: off.
                   augment=AugmentSpec.from_config(d.get("augment")))

    def organ(self, manifest_organ_id: int | tuple[int, ...]) -> int | tuple[int, ...]:
        """The organ label(s) of the run: organ_ids, else organ_id, else the
        manifest's when organ_id is -1 (the one home of the override)."""
        if self.organ_ids:
            return self.organ_ids[0] if len(self.organ_ids) == 1 else tuple(self.organ_ids)
        if self.organ_id >= 0:
            return int(self.organ_id)
        return manifest_organ_id if isinstance(manifest_organ_id, tuple) else int(manifest_organ_id)
