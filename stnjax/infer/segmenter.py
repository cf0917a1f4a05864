"""Host-side driver of inference: buckets, compilation, timing, checks.

`Segmenter` wraps the pure functions of `stnjax.infer`: it windows and pads
a volume to its bucket, compiles each function once per bucket (ahead of
time, so timings exclude compilation and the number of compilations can be
reported), runs them, and returns NumPy arrays cropped to the real volume.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from stnjax.infer import compile_log
from stnjax.infer import rounds as infer
from stnjax.infer.devices import load_on_device
from stnjax import metrics
from stnjax.checks import InputError, check_array
from stnjax.models.rstn import RSTN
from stnjax.data.preprocess import HU_WINDOW, model_input

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CaseResult:
    """Inference result of one volume (arrays on its model grid and layout).

    mask: (X, Y, Z) bool, the mask at the main threshold t; score: float32
    fused probability of the last round run; coarse_mask: round 0; rounds:
    rounds run; inter: (T+1,) inter-iteration DSC (index 0 NaN); dsc: (T+1,)
    DSC against the label per round (None without label); masks_at: {t_k:
    mask}, round_at: {t_k: round} for the report thresholds; plane_dsc:
    {plane: DSC of that plane's coarse mask} (with label); oracles: {name:
    DSC} (with label and oracles=True); times in seconds (compilation
    excluded): time_rounds_s per round when timed one by one
    (`per_round_timing`), else empty and time_loop_s the loop's total;
    bucket: the padded shape; overflow: crops cut to the largest canvas (0
    by default); main_round: the round whose mask is `mask` (the first with
    inter-DSC >= t, else the last run); voxels, hits (T+1,) and boxes
    (T+1, P, 2): the per-round diagnostics of `C2FResult`, P the planes in
    `planes` order.
    """
    mask: np.ndarray
    score: np.ndarray
    coarse_mask: np.ndarray
    rounds: int
    inter: np.ndarray
    dsc: np.ndarray | None
    masks_at: dict[float, np.ndarray]
    round_at: dict[float, int]
    plane_dsc: dict[str, float]
    oracles: dict[str, float]
    time_coarse_s: float
    time_rounds_s: list[float]
    bucket: tuple[int, int, int]
    overflow: int
    main_round: int = 0
    voxels: np.ndarray | None = None
    hits: np.ndarray | None = None
    boxes: np.ndarray | None = None
    planes: tuple[str, ...] = ()
    time_loop_s: float = 0.0


class Segmenter:
    """Coarse-to-fine segmentation of whole volumes with one RSTN per plane.

    Args:
      rstn: the model structure (shared by the planes).
      params: {plane: params} for every plane in spec.planes.
      spec: static inference settings.
      volume_buckets: allowed padded side lengths (see infer.volume_bucket).
      hu_window: the HU window of training.
      per_round_timing: run the rounds from the host, one jitted round at a
        time, to time each (same arithmetic as the while_loop; a host sync
        per round).

    `on_device(d)` gives the same segmenter on device `d` (cohort
    inference: one case per device at a time, each from its own thread);
    the segmenters of one family compile each program once, on the first
    device that needs it, and load that executable onto the others
    (`stnjax.infer.devices`), so every device runs the same binary.
    """

    def __init__(self, rstn: RSTN, params: Mapping[str, Any], spec: infer.InferenceSpec,
                 *, volume_buckets: tuple[int, ...] = (), hu_window=HU_WINDOW,
                 per_round_timing: bool = False):
        missing = [p for p in spec.planes if p not in params]
        if missing:
            raise InputError(f"params: no parameters for plane(s) {missing}")
        self.rstn, self.spec = rstn, spec
        self.params = {p: params[p] for p in spec.planes}
        self.volume_buckets = tuple(int(b) for b in volume_buckets)
        self.hu_window = tuple(hu_window)
        self.per_round_timing = per_round_timing
        self._compiled: dict[tuple, Callable] = {}
        #: seconds each compilation took, by (function name, bucket); case
        #: times (`CaseResult.time_*`) exclude them. Shared by `on_device` copies.
        self.compile_seconds: dict[tuple, float] = {}
        #: None: jit's default device; else the device every array is put on.
        self.device = None
        self._family = _Family()
        #: the (function name, bucket) keys the persistent cache served
        self.cache_loaded: set[tuple] = set()
        #: called with (stage, seconds) as a case runs: "coarse stage", then
        #: "round <r>" per round, or "rounds 1-<n>" for the jitted loop
        #: (progress lines, `stnjax.eval.progress`); None: no calls
        self.on_stage: Callable[[str, float], None] | None = None
        r, s = rstn, spec
        self._fns = {
            "coarse": lambda p, im, ex: _coarse_with_check(r, p, im, ex, spec=s),
            "c2f": lambda p, im, ex, sc, m, t, lab: infer.coarse_to_fine(
                r, p, im, ex, sc, m, t, spec=s, label=lab),
            "c2f_nolabel": lambda p, im, ex, sc, m, t: infer.coarse_to_fine(
                r, p, im, ex, sc, m, t, spec=s),
            "init": lambda sc, m, lab: infer.init_state(sc, m, spec=s, label=lab),
            "step": lambda p, im, ex, st, lab, sc: infer.round_step(
                r, p, im, ex, st, spec=s, label=lab, score0=sc),
            "strong": lambda p, im, ex, lab: infer.strong_oracle(r, p, im, ex, lab, spec=s),
            "weak": lambda p, im, ex, sc, m, lab: infer.coarse_to_fine(
                r, p, im, ex, sc, m, jnp.float32(2.0), spec=s, label=lab, crop_label=True).mask,
            "gt_crop": lambda p, im, ex, lab, pr: infer.gt_crop_oracle(r, p, im, ex, lab, pr,
                                                                       spec=s),
        }

    # ---------------------------------------------------------------- compile
    @property
    def compile_count(self) -> int:
        """Number of executables compiled so far (one per function and bucket)."""
        return len(self._compiled)

    def compile_summary(self) -> str:
        """One line: how many programs this segmenter and its `on_device`
        copies compiled and how many the persistent compilation cache served
        (`compile_log`)."""
        n, loaded = len(self.compile_seconds), len(self.cache_loaded)
        if n and loaded == n:
            return f"compiled nothing: all {n} programs loaded from the compilation cache"
        return f"compiled {n - loaded} programs ({loaded} loaded from the compilation cache)"

    def compiled_buckets(self) -> list[tuple]:
        """(function name, padded shape) of every compilation."""
        return sorted((k[0], k[1]) for k in self._compiled)

    def on_device(self, device: Any) -> "Segmenter":
        """The same models and settings on `device` (parameters copied there);
        it shares this segmenter's compilations (see the class docstring)."""
        other = copy.copy(self)
        other.device = device
        other.params = jax.device_put(self.params, device)
        other._compiled = {}
        return other

    def _compile(self, name: str, bucket: tuple, *args) -> None:
        """Compiles function `name` for `bucket` once (logged with its time),
        so that the timed calls measure running only; on a device of a
        family that compiled it already, loads that executable instead."""
        key = (name, bucket)
        if key in self._compiled:
            return
        with self._family.lock(key):
            first = self._family.first.get(key)
            # With the persistent compilation cache on, the other devices read
            # the program from it instead: an XLA:CPU executable that came from
            # that cache loses kernels when serialized again ("Function
            # multiply_concatenate_fusion not found" when run on the other
            # device).
            if first is not None and self.device is not None and not _persistent_cache_on():
                try:
                    self._compiled[key] = load_on_device(first, self.device)
                    return
                except Exception as e:  # noqa: BLE001 - an unsupported JAX: compile instead
                    self._family.warn_once(e)
            t0 = time.perf_counter()
            with compile_log.watch() as seen:
                compiled = jax.jit(self._fns[name]).lower(*args).compile()
            self._compiled[key] = compiled
            self._family.first.setdefault(key, compiled)
            if key not in self.compile_seconds:  # the family's first compilation
                self.compile_seconds[key] = time.perf_counter() - t0
                if seen.loaded:
                    self.cache_loaded.add(key)
                log.info("%s %s for bucket %s in %.1f s",
                         "loaded from the compilation cache:" if seen.loaded else "compiled",
                         name, "x".join(map(str, bucket)), self.compile_seconds[key])

    def _put(self, x):
        """An array on this segmenter's device (jit's default without one)."""
        return jnp.asarray(x) if self.device is None else jax.device_put(x, self.device)

    def _call(self, name: str, bucket: tuple, *args):
        self._compile(name, bucket, *args)
        return self._compiled[(name, bucket)](*args)

    # -------------------------------------------------------------- prepare
    def prepare(self, image: np.ndarray, label: np.ndarray | None = None):
        """Pads a network-input volume (`preprocess.model_input`, float32 in
        [0, 1]) to its bucket; returns (image, extent, label, bucket) as
        device arrays (label None if not given)."""
        check_array(image, "volume", rank=3, dtype_kind="iuf", finite=True)
        short = [p for p in self.spec.planes if image.shape[infer.PLANE_AXIS[p]] < 2]
        if short:
            raise InputError(f"volume: shape {tuple(image.shape)} has a single slice along "
                             f"plane(s) {short}; 3-slice windows need at least 2")
        bucket = infer.volume_bucket(image.shape, self.volume_buckets)
        pad = [(0, b - n) for b, n in zip(bucket, image.shape)]
        padded = np.pad(np.asarray(image, np.float32), pad)
        lab = None
        if label is not None:
            if tuple(label.shape) != tuple(image.shape):
                raise InputError(f"label: shape {tuple(label.shape)} differs from the "
                                 f"volume's {tuple(image.shape)}")
            lab = self._put(np.pad(np.asarray(label, bool), pad))
        return self._put(padded), self._put(np.array(image.shape, np.int32)), lab, bucket

    # ------------------------------------------------------------------ run
    def _report_key(self, t: float) -> float:
        """The report threshold equal to t (its mask is kept by the loop)."""
        return infer.report_threshold(self.spec, t)

    def segment(self, hu: np.ndarray, *, label: np.ndarray | None = None,
                t: float = 0.99, run_all_rounds: bool = True,
                oracles: bool = False) -> CaseResult:
        """Segments one volume of Hounsfield units.

        Args:
          hu: (X, Y, Z) Hounsfield units in the models' voxel order (canonical
            PLS, or the official storage order: `data.orientation`); windowed
            with the training's HU window and precision (`preprocess.model_input`).
          label: optional (X, Y, Z) bool organ mask (per-round DSC, oracles).
          t: the main stopping threshold.
          run_all_rounds: run all T rounds and read every report threshold
            exactly (the reference); False stops at t.
          oracles: also run the strong, weak and ground-truth-crop oracles.
        """
        check_array(hu, "volume", rank=3, dtype_kind="iuf", finite=True)
        return self.segment_image(model_input(hu, *self.hu_window), label=label, t=t,
                                  run_all_rounds=run_all_rounds, oracles=oracles)

    def segment_image(self, image: np.ndarray, *, label: np.ndarray | None = None,
                      t: float = 0.99, run_all_rounds: bool = True,
                      oracles: bool = False) -> CaseResult:
        """`segment` of a volume already windowed: image (X, Y, Z) float32 in
        [0, 1], as `preprocess.model_input` or `CaseStore.image` give it."""
        image, extent, lab, bucket = self.prepare(image, label)
        ex = tuple(int(v) for v in extent)
        crop = lambda a: np.asarray(a)[:ex[0], :ex[1], :ex[2]]
        t_loop = 2.0 if run_all_rounds else float(t)
        self._report_key(t)  # fail before any work

        self._compile("coarse", bucket, self.params, image, extent)  # not timed
        t0 = time.perf_counter()
        probs, score0, mask0, finite = self._call("coarse", bucket, self.params, image, extent)
        finite = bool(finite)
        time_coarse = time.perf_counter() - t0
        self._stage_done("coarse stage", time_coarse)
        if not finite:
            raise InputError("coarse probabilities contain NaN or infinite values: the "
                             "parameters (checkpoint) are broken")
        t_arr = self._put(np.float32(t_loop))
        time_loop = 0.0
        if self.per_round_timing:
            res, times = self._stepwise(bucket, image, extent, score0, mask0, t_arr, lab)
        else:
            name, args = (("c2f_nolabel", (self.params, image, extent, score0, mask0, t_arr))
                          if lab is None else
                          ("c2f", (self.params, image, extent, score0, mask0, t_arr, lab)))
            self._compile(name, bucket, *args)  # not timed
            t0 = time.perf_counter()
            res = jax.block_until_ready(self._call(name, bucket, *args))
            # One loop: its total, not a made-up split over the rounds.
            times, time_loop = [], time.perf_counter() - t0
            self._stage_done(f"rounds 1-{int(res.rounds)} (one loop)", time_loop)
        rounds = int(res.rounds)
        inter, dsc = np.asarray(res.inter), np.asarray(res.dsc)
        thresholds = self.spec.report_thresholds
        masks_at = {tk: crop(res.masks_at[i]) for i, tk in enumerate(thresholds)}
        round_at = {tk: int(res.round_at[i]) for i, tk in enumerate(thresholds)}
        t_key = self._report_key(t)
        main = masks_at[t_key]
        plane_dsc, orc = {}, {}
        if label is not None:
            lab_np = np.asarray(label, bool)
            for i, p in enumerate(self.spec.planes):
                plane_dsc[p] = metrics.dsc(crop(probs[i]) >= 0.5, lab_np)
            if oracles:
                orc = self._oracles(bucket, image, extent, probs, score0, mask0, lab, crop,
                                    lab_np)
        return CaseResult(
            mask=main, score=crop(res.score), coarse_mask=crop(mask0), rounds=rounds,
            inter=inter, dsc=None if label is None else dsc, masks_at=masks_at,
            round_at=round_at, plane_dsc=plane_dsc, oracles=orc,
            time_coarse_s=time_coarse, time_rounds_s=times, time_loop_s=time_loop,
            bucket=bucket,
            overflow=int(res.overflow), main_round=round_at[t_key],
            voxels=np.asarray(res.voxels), hits=np.asarray(res.hits),
            boxes=np.asarray(res.boxes), planes=tuple(self.spec.planes))

    def _stepwise(self, bucket, image, extent, score0, mask0, t, lab):
        """The loop from the host, one compiled round at a time (timing)."""
        st = self._call("init", bucket, score0, mask0, lab)
        self._compile("step", bucket, self.params, image, extent, st, lab, score0)  # not timed
        times = []
        while bool(infer.should_continue(st, t, spec=self.spec)):
            t0 = time.perf_counter()
            st = jax.block_until_ready(
                self._call("step", bucket, self.params, image, extent, st, lab, score0))
            times.append(time.perf_counter() - t0)
            self._stage_done(f"round {len(times)}", times[-1])
        return infer.finish(st), times

    def _stage_done(self, stage: str, seconds: float) -> None:
        if self.on_stage is not None:
            self.on_stage(stage, seconds)

    def _oracles(self, bucket, image, extent, probs, score0, mask0, lab, crop,
                 lab_np) -> dict[str, float]:
        strong = self._call("strong", bucket, self.params, image, extent, lab)
        weak = self._call("weak", bucket, self.params, image, extent, score0, mask0, lab)
        gtc = self._call("gt_crop", bucket, self.params, image, extent, lab, probs)
        return {name: metrics.dsc(crop(m), lab_np)
                for name, m in (("strong", strong), ("weak", weak), ("gt_crop", gtc))}


def _persistent_cache_on() -> bool:
    """Whether JAX's persistent compilation cache is in use (a cache folder set)."""
    return bool(jax.config.jax_compilation_cache_dir)


class _Family:
    """What the `on_device` copies of one Segmenter share: the first
    executable of each (function, bucket), and a lock per key so that two
    device threads do not compile the same program at once."""

    def __init__(self):
        self.first: dict[tuple, Any] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self._warned = False

    def lock(self, key: tuple) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def warn_once(self, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("cannot load a compiled program onto another device (%s: %s); "
                        "compiling it for every device", type(e).__name__, e)


def _coarse_with_check(rstn, params, image, extent, *, spec):
    """Round 0: per-plane probabilities, their fusion, and a finiteness flag."""
    probs = infer.coarse_probs(rstn, params, image, extent, spec=spec)
    score0, mask0 = infer.round_zero(probs, extent, spec=spec)
    return probs, score0, mask0, jnp.all(jnp.isfinite(probs))
