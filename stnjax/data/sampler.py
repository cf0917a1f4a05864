"""Training slices and the batch sampler (reference sections 1.6, 1.7).

Only slices whose centre slice holds enough organ pixels are trained on
(`select_training_slices`); each sample is a 3-slice window (H, W, 3) of
image and label read from a `case_store.CaseStore`. `SliceSampler` pads windows at
the bottom/right to a shape bucket and yields fixed-shape batches with a
validity mask, as a pure function of (seed, step); `prefetch` assembles them
in a background thread.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from stnjax.data import preprocess
from stnjax.data.augment import AugmentSpec, augment_window
from stnjax.checks import InputError, check_int
from stnjax.data.store import CaseStore
from stnjax.data.manifest import DatasetError


# ------------------------------------------------------------------ training slices

def slice_organ_counts(store: CaseStore, case_ids: Iterable[str] | None, plane: str
                       ) -> dict[str, np.ndarray]:
    """Organ pixels of every slice of a plane: {case_id: int64 (S,)}, in
    the order of `case_ids` (default: store.case_ids)."""
    preprocess.check_plane(plane)
    axes = tuple(a for a in range(3) if a != preprocess.PLANE_AXIS[plane])
    ids = store.case_ids if case_ids is None else list(case_ids)
    return {cid: np.count_nonzero(store.label(cid), axis=axes).astype(np.int64) for cid in ids}


def select_training_slices(counts: Mapping[str, np.ndarray], train_ids: Iterable[str],
                           threshold: float = 0.98, *, plane: str | None = None,
                           fold: int | None = None) -> np.ndarray:
    """The reference's training-slice rule (section 1.6).

    P = the number of slices with organ pixels over ALL cases in `counts`
    (test folds included, as in the reference); min_pixels = the
    floor(threshold * P)-th largest count (at least the 1st); a slice is
    active when its count >= min_pixels and its case is in `train_ids`.
    A threshold > 1 is an absolute pixel count instead.

    Args:
      counts: {case_id: (S,) organ pixels per slice}, e.g. from
        `slice_organ_counts`; its order defines the case index.
      train_ids: the training cases (a subset of counts).
      threshold: fraction in (0, 1], or an absolute count > 1.
      plane, fold: only for the error message.

    Returns:
      int32 (N, 2) rows (case_index, slice_index), sorted; case_index indexes
      list(counts) (= store.case_ids for `slice_organ_counts(store, None, p)`).
    """
    ids = list(counts)
    train = set(train_ids)
    unknown = sorted(train - set(ids))
    if unknown:
        raise DatasetError(f"train_ids: not in counts: {', '.join(unknown[:10])}")
    if not np.isfinite(threshold) or threshold <= 0:
        raise InputError(f"threshold: expected > 0, got {threshold}")
    arrays = [np.asarray(counts[c]) for c in ids]
    for cid, a in zip(ids, arrays):
        if a.ndim != 1 or a.dtype.kind not in "iu" or (a.size and a.min() < 0):
            raise InputError(f"counts[{cid!r}]: expected a 1-D array of non-negative ints")
    where = f"plane {plane or '?'}, fold {'?' if fold is None else fold}"
    if threshold > 1:
        min_pixels = float(threshold)
    else:
        positive = np.sort(np.concatenate([a[a > 0] for a in arrays]))[::-1]
        if positive.size == 0:
            raise DatasetError(f"{where}: no slice holds any organ pixel")
        k = max(1, math.floor(threshold * positive.size))
        min_pixels = float(positive[k - 1])
    rows = [(i, j) for i, (cid, a) in enumerate(zip(ids, arrays)) if cid in train
            for j in np.nonzero(a >= min_pixels)[0]]
    if not rows:
        raise DatasetError(f"{where}: no training slice has >= {min_pixels:g} organ pixels "
                           f"(threshold {threshold}, {len(train)} training cases)")
    return np.asarray(rows, np.int32).reshape(-1, 2)


def add_negative_slices(counts: Mapping[str, np.ndarray], train_ids: Iterable[str],
                        rows: np.ndarray, ratio: float, *, seed: int = 0) -> np.ndarray:
    """Adds organ-free training slices (beyond the reference, `data.negatives`).

    The reference trains on organ slices only, so its networks never see a
    slice without the organ; with a few small networks from scratch that
    leaves most of a volume's false positives on slices far from the organ.
    This draws round(ratio x len(rows)) slices with no organ pixel from the
    training cases (all of them when there are fewer), without replacement,
    from `np.random.default_rng([seed, 3])`: a fixed set for a run.

    Args:
      counts, train_ids: as `select_training_slices`.
      rows: int32 (N, 2) its result (case_index, slice_index).
      ratio: organ-free slices per organ slice, >= 0 (0: rows unchanged).
      seed: the run's seed.

    Returns:
      int32 (N + M, 2) rows, sorted (case_index, slice_index).
    """
    if not (np.isfinite(ratio) and ratio >= 0):
        raise InputError(f"data.negatives: expected a number >= 0, got {ratio}")
    rows = np.asarray(rows, np.int32).reshape(-1, 2)
    n = int(round(ratio * len(rows)))
    if n == 0:
        return rows
    train = set(train_ids)
    pool = np.asarray([(i, j) for i, (cid, a) in enumerate(counts.items()) if cid in train
                       for j in np.nonzero(np.asarray(a) == 0)[0]], np.int32).reshape(-1, 2)
    if len(pool) > n:
        pick = np.random.default_rng([int(seed), 3]).choice(len(pool), size=n, replace=False)
        pool = pool[np.sort(pick)]
    both = np.concatenate([rows, pool])
    return both[np.lexsort((both[:, 1], both[:, 0]))].astype(np.int32)


# ------------------------------------------------------------------ sampler

def _fit(size: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= size (size itself with no buckets), or None."""
    if not buckets:
        return size
    for b in buckets:
        if b >= size:
            return b
    return None


class SliceSampler:
    """Fixed-shape training batches of one plane, a pure function of (seed, step).

    Each active slice gives a window (H, W, 3) of image and label, padded at
    the bottom/right with zeros to its bucket (Hb, Wb) = (smallest bucket >=
    H, smallest bucket >= W); a batch holds one bucket only, so a jitted step
    compiles once per bucket (see `buckets()`).

    order="uniform" (Caffe-like): the bucket is drawn with probability
    proportional to its number of slices, then batch_size slices uniformly
    with replacement inside it. order="epoch" (PyTorch-like): every epoch is a
    seeded permutation of all active slices in same-bucket batches, the
    batches in a seeded order; a bucket's last partial batch is filled with
    padding slots of weight 0 (nothing dropped). `steps_per_epoch` batches
    make one epoch.

    Args:
      store: the CaseStore; case_index refers to store.case_ids.
      slices: int (N, 2) rows (case_index, slice_index), e.g. from
        `select_training_slices`.
      plane: "X", "Y" or "Z".
      batch_size: global batch size.
      buckets: sizes for both H and W (sorted here); () = exact sizes.
      seed: a non-negative int.
      order: "uniform" or "epoch".
      augment: random transforms of each sample (`stnjax.data.augment`);
        None or an inactive spec: the slices as stored (the reference).
    """

    def __init__(self, store: CaseStore, slices: Any, *, plane: str, batch_size: int,
                 buckets: Sequence[int] = (), seed: int = 0, order: str = "uniform",
                 augment: AugmentSpec | None = None):
        self.plane = preprocess.check_plane(plane)
        slices = np.asarray(slices)
        if (slices.ndim != 2 or slices.shape[1] != 2 or slices.shape[0] == 0
                or slices.dtype.kind not in "iu"):
            raise InputError(f"slices: expected a non-empty int (N, 2) array, got {slices.dtype} "
                             f"{slices.shape}")
        check_int(batch_size, "batch_size", 1)
        check_int(seed, "seed", 0)
        if order not in ("uniform", "epoch"):
            raise InputError(f"order: expected 'uniform' or 'epoch', got {order!r}")
        bks = tuple(sorted(int(b) for b in buckets))
        if any(b < 1 for b in bks) or len(set(bks)) != len(bks):
            raise InputError(f"buckets: expected distinct positive sizes, got {tuple(buckets)}")
        self.store, self.order = store, order
        self.augment = augment if augment is not None and augment.active else None
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.bucket_sizes = bks
        self.slices = slices.astype(np.int32)
        ids = store.case_ids
        groups: dict[tuple[int, int], list[int]] = {}
        self._img, self._lab = {}, {}
        for c in np.unique(self.slices[:, 0]):
            if not 0 <= c < len(ids):
                raise InputError(f"slices: case_index {c} out of range [0, {len(ids)})")
            img = store.plane(ids[c], plane, "image")
            self._img[int(c)], self._lab[int(c)] = img, store.plane(ids[c], plane, "label")
            s, h, w = img.shape
            rows = np.nonzero(self.slices[:, 0] == c)[0]
            bad = self.slices[rows, 1]
            bad = bad[(bad < 0) | (bad >= s)]
            if bad.size:
                raise InputError(f"slices: case {ids[c]!r} plane {plane} has {s} slices, "
                                 f"got slice {bad[0]}")
            hb, wb = _fit(h, bks), _fit(w, bks)
            if hb is None or wb is None:
                raise DatasetError(f"case {ids[c]!r} plane {plane}: slice {h} x {w} exceeds the "
                                   f"largest bucket {bks[-1]}; add a larger bucket (slices are "
                                   "never truncated)")
            groups.setdefault((hb, wb), []).extend(rows.tolist())
        self._keys = sorted(groups)
        self._groups = [np.asarray(sorted(groups[k]), np.int64) for k in self._keys]
        self._counts = np.array([len(g) for g in self._groups], np.float64)
        self._epoch_cache: tuple[int, list] | None = None

    def buckets(self) -> dict[tuple[int, int], int]:
        """{(Hb, Wb): number of active slices}: one compilation per key."""
        return {k: len(g) for k, g in zip(self._keys, self._groups)}

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch with order="epoch" (partial batches padded)."""
        return int(sum(math.ceil(len(g) / self.batch_size) for g in self._groups))

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 1])
            plan = []
            for k, g in enumerate(self._groups):
                perm = rng.permutation(g)
                pad = -len(perm) % self.batch_size
                perm = np.concatenate([perm, np.full(pad, -1, np.int64)])
                plan += [(k, b) for b in perm.reshape(-1, self.batch_size)]
            self._epoch_cache = (epoch, [plan[i] for i in rng.permutation(len(plan))])
        return self._epoch_cache[1]

    def plan(self, step: int) -> tuple[tuple[int, int], np.ndarray]:
        """The global batch of a step: ((Hb, Wb), rows (B,) into `slices`,
        -1 for a padding slot). Cheap: no pixel is read."""
        check_int(step, "step", 0)
        if self.order == "uniform":
            rng = np.random.default_rng([self.seed, int(step)])
            k = int(rng.choice(len(self._keys), p=self._counts / self._counts.sum()))
            rows = self._groups[k][rng.integers(0, len(self._groups[k]), self.batch_size)]
        else:
            epoch, i = divmod(int(step), self.steps_per_epoch)
            k, rows = self._epoch_plan(epoch)[i]
        return self._keys[k], rows

    def batch(self, step: int, *, shard: int = 0, num_shards: int = 1) -> dict[str, np.ndarray]:
        """This host's part of the global batch of `step`.

        Returns NumPy arrays, B = batch_size // num_shards (the contiguous
        slots [shard*B, (shard+1)*B) of the global batch):
          image (B, Hb, Wb, 3) float32 in [0, 1]; label (B, Hb, Wb, 3) float32
          in {0, 1}; hw (B, 2) int32 real size of each slice (its top-left
          region holds it; (0, 0) for padding slots); weight (B,) float32
          (1 real, 0 padding slot); case_index, slice_index (B,) int32 (-1 for
          padding slots).
        """
        check_int(num_shards, "num_shards", 1)
        if self.batch_size % num_shards:
            raise InputError(f"num_shards: {num_shards} does not divide batch_size "
                             f"{self.batch_size}")
        check_int(shard, "shard", 0, num_shards - 1)
        (hb, wb), rows = self.plan(step)
        per = self.batch_size // num_shards
        rows = rows[shard * per:(shard + 1) * per]
        out = {"image": np.zeros((per, hb, wb, 3), np.float32),
               "label": np.zeros((per, hb, wb, 3), np.float32),
               "hw": np.zeros((per, 2), np.int32), "weight": np.zeros(per, np.float32),
               "case_index": np.full(per, -1, np.int32), "slice_index": np.full(per, -1, np.int32)}
        for b, r in enumerate(rows):
            if r < 0:
                continue
            c, j = (int(v) for v in self.slices[r])
            img, lab = self._img[c], self._lab[c]
            _, h, w = img.shape
            # The same windows as the case store's and inference's (one
            # implementation), decoded straight into the padded batch.
            preprocess.decode_window(preprocess.gather_windows(img, j),
                                     out=out["image"][b, :h, :w])
            out["label"][b, :h, :w] = preprocess.gather_windows(lab, j)
            if self.augment is not None:
                # Keyed by the global slot: the same sample on any number of shards.
                rng = np.random.default_rng([self.seed, int(step), shard * per + b, 2])
                out["image"][b, :h, :w], out["label"][b, :h, :w] = augment_window(
                    out["image"][b, :h, :w], out["label"][b, :h, :w], rng, self.augment)
            out["hw"][b] = h, w
            out["weight"][b], out["case_index"][b], out["slice_index"][b] = 1.0, c, j
        return out


def prefetch(sampler: SliceSampler, steps: Iterable[int], *, shard: int = 0, num_shards: int = 1,
             depth: int = 2) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yields (step, batch) for `steps`, assembling up to `depth` batches
    ahead in a background thread (reading overlaps the device step)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def work():
        try:
            for step in steps:
                if stop.is_set():
                    return
                q.put((step, sampler.batch(step, shard=shard, num_shards=num_shards)))
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
            return
        q.put(done)

    thread = threading.Thread(target=work, daemon=True, name="slice-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)
