"""Imported models as finished training runs (the official RSTN snapshots).

`write_imported_run` puts a parameter tree made elsewhere (the official
PyTorch RSTN's, converted by `stnjax.models.weights.convert_official_rstn`)
into a workdir exactly where and how `launch.train` leaves a finished run:

    <workdir>/config.json, config.txt, train_config.json, versions.json
    <workdir>/fold<f>/<plane>/checkpoints/<N>/   state {'params', 'step'}, meta
    <workdir>/fold<f>/<plane>/provenance.json    source file, sha256, keys mapped

The checkpoint's meta says step = total_steps (complete) with the config's
hash, so `stnjax.eval.runs.load_models` (`launch.evaluate`,
`launch.segment`, the Python API) loads it like a trained run, and
`launch.train` on the same workdir finds the run complete and leaves it.
Its state holds no optimiser slots: it is for inference, not for resuming.

Refusals happen before anything is written: params whose structure or
shapes do not fit the config's model; a workdir of another config (unless
`overwrite`, which deletes its runs, as for training); a run folder that
already holds another model (a trained run, or an import of another file;
unless `overwrite`, which replaces that run only). The run folder is built
beside its place and renamed in, so a failed write leaves the old run or
none, never half of one. Importing the same file again changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from stnjax import fileio
from stnjax.checks import InputError
from stnjax.train import workdir as wd
from stnjax.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from stnjax.train.schedule import total_steps
from stnjax.train.spec import TrainSpec

PROVENANCE = "provenance.json"


def expected_shapes(spec: TrainSpec) -> dict[str, Any]:
    """{'coarse', 'saliency', 'fine'} trees of the shapes (tuples) the spec's
    model holds (abstract: nothing is computed)."""
    rstn = spec.model
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    key = jax.random.PRNGKey(0)
    fcn = jax.eval_shape(lambda a: rstn.fcn.init({"params": key}, a), x)["params"]
    sal = jax.eval_shape(lambda a: rstn.saliency.init(key, a), x)["params"]
    tree = {"coarse": fcn, "saliency": sal, "fine": fcn}
    return jax.tree.map(lambda s: tuple(s.shape), tree)


def check_params(spec: TrainSpec, params: Mapping[str, Any], where: str) -> None:
    """InputError naming every leaf of `params` that the spec's model lacks,
    lacks in `params`, or holds with another shape."""
    want = {"/".join(str(getattr(k, "key", k)) for k in path): s for path, s in
            jax.tree_util.tree_flatten_with_path(
                expected_shapes(spec), is_leaf=lambda v: isinstance(v, tuple))[0]}
    got = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(a))
           for path, a in jax.tree_util.tree_flatten_with_path(dict(params))[0]}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = [f"{k}: {got[k]} vs the model's {want[k]}" for k in sorted(set(want) & set(got))
           if got[k] != want[k]]
    problems = [p for p in (missing and f"missing {missing}", extra and f"not in the model {extra}",
                            bad and "shape mismatches " + "; ".join(bad)) if p]
    if problems:
        raise InputError(f"{where}: the params do not fit the config's model: "
                         + " | ".join(problems))


def _run_planes(workdir: Path) -> tuple[set[int], set[str]]:
    """Folds and planes of the run folders that hold checkpoints."""
    runs = [p for p in workdir.glob("fold*/*") if (p / CHECKPOINT_DIR).is_dir()]
    return ({int(p.parent.name[4:]) for p in runs if p.parent.name[4:].isdigit()},
            {p.name for p in runs})


def _existing_model(rdir: Path, sha256: str, overwrite: bool) -> bool:
    """True when `rdir` already holds the import of the file with `sha256`;
    InputError when it holds another model and not `overwrite`."""
    if not (rdir / CHECKPOINT_DIR).exists():
        return False
    prov = rdir / PROVENANCE
    try:
        old = fileio.read_json(prov, "provenance record") if prov.exists() else {}
    except ValueError:
        old = {}
    if old.get("source_sha256") == sha256 and any((rdir / CHECKPOINT_DIR).iterdir()):
        return True
    if overwrite:
        return False
    what = (f"the import of {old.get('source')!r} (sha256 {old.get('source_sha256')})"
            if old else "a model of another origin (a trained run, or an interrupted import)")
    raise InputError(f"workdir: {rdir} already holds {what}; use another workdir, or "
                     "--overwrite to replace it")


def _same_file_elsewhere(workdir: Path, rdir: Path, sha256: str) -> None:
    """InputError when another run of the workdir is the import of the same
    file (one snapshot per plane: a file given for a second plane is a mistake)."""
    for prov in sorted(workdir.glob(f"fold*/*/{PROVENANCE}")):
        if prov.parent == rdir:
            continue
        try:
            old = fileio.read_json(prov, "provenance record")
        except ValueError:
            continue
        if old.get("source_sha256") == sha256:
            raise InputError(f"workdir: {prov.parent} already holds this file "
                             f"({old.get('source')!r}); each plane has its own snapshot")


def _resolved_record(spec: TrainSpec, workdir: Path, fold: int, plane: str) -> dict:
    """The spec's record with data.planes / data.folds covering the runs the
    workdir holds plus this one (fields outside the models' identity)."""
    folds, planes = _run_planes(workdir)
    record = json.loads(json.dumps(spec.record))
    record["data"]["planes"] = "".join(p for p in "XYZ" if p in planes | {plane})
    record["data"]["folds"] = ",".join(str(f) for f in sorted(folds | {int(fold)}))
    return record


def _write_run(spec: TrainSpec, rdir: Path, fold: int, plane: str, params: Mapping[str, Any],
               provenance: Mapping[str, Any]) -> None:
    """Builds the run folder next to `rdir` and renames it into place."""
    rdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fileio.make_temp_dir(rdir)
    try:
        total = total_steps(spec.loop.stage_list)
        meta = {"config_hash": spec.config_hash, "fold": int(fold), "plane": plane,
                "attempt": 0, "step": total, "total_steps": total,
                "method": spec.loop.method, "stage": spec.loop.stage_list[-1].mode,
                "guard_history": [], "restarts": [], "imported": dict(provenance)}
        state = {"params": jax.tree.map(lambda a: np.asarray(a, np.float32), dict(params)),
                 "step": np.asarray(total, np.int32)}
        ck = Checkpointer(tmp / CHECKPOINT_DIR, keep=1, async_save=False)
        try:
            ck.save(total, state, meta)
            ck.wait()
        finally:
            ck.close()
        fileio.atomic_write_text(tmp / PROVENANCE, json.dumps(dict(provenance), indent=2) + "\n")
        old = None
        if rdir.exists():
            old = fileio.make_temp_dir(rdir)
            os.replace(rdir, old / "run")
        os.replace(tmp, rdir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_imported_run(spec: TrainSpec, workdir: str | os.PathLike, fold: int, plane: str,
                       params: Mapping[str, Any], provenance: Mapping[str, Any], *,
                       overwrite: bool = False) -> bool:
    """Writes `params` as the finished run (fold, plane) of `spec` in `workdir`.

    Args:
      spec: the config that describes the imported models (its record is
        written as the workdir's config; data.planes and data.folds are set
        to the runs the workdir then holds).
      workdir: the workdir (created if needed).
      fold, plane: the run.
      params: {'coarse', 'saliency', 'fine'} NumPy trees of the spec's model.
      provenance: JSON-able record of the source, at least 'source_sha256'
        (written as provenance.json and into the checkpoint's meta).
      overwrite: replace a run folder holding another model, and (as
        `launch.train --overwrite`) delete the runs of another config.

    Returns:
      True when written; False when the run already held the import of the
      same file (nothing changed).

    Raises:
      InputError (nothing written): params that do not fit the model, a
      workdir of another config, a run of another model (without
      `overwrite`), a run folder being trained by a live process.
    """
    if plane not in ("X", "Y", "Z"):
        raise InputError(f"plane: expected X, Y or Z, got {plane!r}")
    check_params(spec, params, f"fold {fold} plane {plane}")
    if "source_sha256" not in provenance:
        raise InputError("write_imported_run: provenance needs 'source_sha256'")
    workdir = Path(workdir)
    rdir = wd.run_dir(workdir, fold, plane)
    wd.check_workdir(workdir, spec.record, overwrite=overwrite)
    _same_file_elsewhere(workdir, rdir, provenance["source_sha256"])
    if _existing_model(rdir, provenance["source_sha256"], overwrite):
        return False
    from stnjax.train.lock import check_unlocked
    check_unlocked([rdir] if rdir.exists() else [])
    wd.write_workdir_files(workdir, _resolved_record(spec, workdir, fold, plane))
    _write_run(spec, rdir, fold, plane, params, provenance)
    return True
