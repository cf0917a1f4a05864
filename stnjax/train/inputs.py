"""Training inputs: the dataset folder, folds and planes, slices, samplers, devices.

Host-side set-up between the data spec (`stnjax.data.spec.DataSpec`) and the
training loop or an evaluation. The built-in synthetic dataset is written
under the workdir when `data.dir` is empty (`<workdir>/phantom-<hash of
data.phantom>`); decoded volumes are cached in `data.cache_dir` (default
`<workdir>/cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from stnjax.data import manifest
from stnjax.data.store import CaseStore
from stnjax.data import sampler
from stnjax.checks import InputError
from stnjax.data.spec import DataSpec, PhantomSpec

log = logging.getLogger("stnjax.train")

def _phantom_config(ph: PhantomSpec):
    from stnjax.phantom.volumes import PhantomConfig
    return PhantomConfig(shape=ph.shape, spacing=ph.spacing)


def dataset_dir(data: DataSpec, workdir: str | os.PathLike) -> Path:
    """The dataset folder: data.dir, or the built-in phantom dataset.

    The phantom dataset is written once (by process 0) into
    `<workdir>/phantom-<hash>`, the hash covering data.phantom and n_folds,
    and reused afterwards.
    """
    if data.dir:
        d = Path(data.dir).expanduser()
        if not (d / manifest.MANIFEST_FILE).is_file():
            raise InputError(f"data.dir: {d} holds no {manifest.MANIFEST_FILE}")
        return d
    from stnjax.phantom.dataset import write_phantom_dataset
    ph = data.phantom
    spec = json.dumps({"phantom": ph.to_dict(), "n_folds": data.n_folds},
                      sort_keys=True, default=list)
    out = Path(workdir) / f"phantom-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    if jax.process_index() == 0 and not (out / manifest.MANIFEST_FILE).is_file():
        log.info("writing the built-in phantom dataset (%d cases, shape %s) to %s",
                 ph.num_cases, ph.shape, out)
    if jax.process_index() == 0:
        write_phantom_dataset(out, num_cases=ph.num_cases, seed=ph.seed,
                              config=_phantom_config(ph), n_folds=data.n_folds)
    return out


@dataclasses.dataclass
class PlaneData:
    """The training slices of one (fold, plane)."""

    store: CaseStore
    slices: np.ndarray          # int32 (N, 2) (case_index, slice_index)
    plane: str
    fold: int
    train_ids: list[str]


def open_store(data: DataSpec, ds_dir: Path, workdir: str | os.PathLike) -> CaseStore:
    """The CaseStore of the dataset (organ id(s) per `data.organ`, grid per
    data.spacing, voxel order per data.orientation), cached in
    data.cache_dir or <workdir>/cache: training and evaluation read it."""
    man = manifest.load_manifest(ds_dir)
    organ = data.organ(man.organ_id)
    if organ != man.organ_id:
        man = dataclasses.replace(man, organ_id=organ)
    cache = Path(data.cache_dir) if data.cache_dir else Path(workdir) / "cache"
    return CaseStore(man, cache, hu_window=data.hu_window, spacing=data.spacing,
                     orientation=data.orientation)


def fold_split(data: DataSpec, ds_dir: Path, store: CaseStore, fold: int
               ) -> tuple[list[str], list[str]]:
    """(training ids, test ids) of a fold (folds.json, made once by data.fold_rule)."""
    table = manifest.load_or_create_fold_table(ds_dir, store.case_ids, n_folds=data.n_folds,
                                             rule=data.fold_rule)
    return manifest.split(table, fold, store.case_ids)


def plane_data(data: DataSpec, store: CaseStore, ds_dir: Path, fold: int,
               plane: str, *, seed: int = 0) -> PlaneData:
    """Selects the training slices of one fold and plane (reference 1.6),
    plus `data.negatives` organ-free slices per organ slice drawn with `seed`.

    Raises InputError naming the dataset, plane and fold when no slice
    qualifies (e.g. a dataset without any labelled organ in that view).
    """
    train_ids, _ = fold_split(data, ds_dir, store, fold)
    train_ids = [c for c in train_ids if store.has_label(c)]
    if not train_ids:
        raise InputError(f"data.dir: {ds_dir} has no labelled training case in fold {fold}")
    # The pixel-count threshold is taken over every labelled case, test
    # folds included, as the reference does; then restricted to training cases.
    labelled = [c for c in store.case_ids if store.has_label(c)]
    counts = sampler.slice_organ_counts(store, labelled, plane)
    store.check_organ_ids(labelled)
    try:
        slices = sampler.select_training_slices(
            counts, train_ids, data.slice_threshold, plane=plane, fold=fold)
    except InputError as e:
        raise InputError(f"data.dir: {ds_dir}: no training slice for plane {plane} in fold "
                         f"{fold} ({e})") from e
    slices = sampler.add_negative_slices(counts, train_ids, slices, data.negatives, seed=seed)
    # select_training_slices indexes list(counts); the sampler indexes store.case_ids.
    ids = list(counts)
    remap = np.asarray([store.case_ids.index(c) for c in ids], np.int32)
    slices = np.stack([remap[slices[:, 0]], slices[:, 1]], axis=1).astype(np.int32)
    return PlaneData(store=store, slices=slices, plane=plane, fold=fold, train_ids=train_ids)


def make_sampler(data: DataSpec, pd: PlaneData, seed: int) -> sampler.SliceSampler:
    """The slice sampler of a (fold, plane) with the given seed."""
    return sampler.SliceSampler(pd.store, pd.slices, plane=pd.plane,
                               batch_size=data.batch_size, buckets=data.buckets,
                               seed=int(seed), order=data.order, augment=data.augment)


def choose_devices(batch_size: int, requested: int = 0) -> list[Any]:
    """The local devices a step runs on.

    The global batch splits evenly over every device of every host. With
    `requested` = 0 on one host, the largest number of local devices that
    divides the batch is used (batch 1 on 8 GPUs: 1 device, with a warning).
    With several hosts every local device is used and the batch must split
    evenly (pmap collectives span all hosts' devices).

    Raises InputError naming data.batch_size / train.devices otherwise.
    """
    local = jax.local_devices()
    nproc = jax.process_count()
    if batch_size % nproc:
        raise InputError(f"data.batch_size: {batch_size} does not split over {nproc} hosts")
    per_host = batch_size // nproc
    if requested < 0 or requested > len(local):
        raise InputError(f"train.devices: expected 0..{len(local)}, got {requested}")
    if nproc > 1:
        if requested not in (0, len(local)) or per_host % len(local):
            raise InputError(
                f"data.batch_size: with {nproc} hosts every local device is used; the per-host "
                f"batch {per_host} must be a multiple of {len(local)} local devices")
        return list(local)
    if requested:
        if per_host % requested:
            raise InputError(f"train.devices: {requested} does not divide data.batch_size {per_host}")
        return list(local[:requested])
    n = max(d for d in range(1, len(local) + 1) if per_host % d == 0)
    if n < len(local):
        log.warning("data.batch_size %d uses %d of %d local devices (a sample is never split); "
                    "raise the batch size to use them all", per_host, n, len(local))
    return list(local[:n])
