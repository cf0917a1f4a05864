"""Checkpoints of a training run with orbax's CheckpointManager.

A checkpoint holds two items:
  - 'state': the train state as host NumPy arrays (params, optimiser state,
    step, rng), saved with `StandardSave`;
  - 'meta': JSON with what the host loop needs to continue exactly (the
    iteration counter, the S attempt, the convergence-guard history, the
    config hash, fold and plane).

Checkpoints are numbered by the *iteration*: the number of training steps
executed so far, counting the steps of S attempts that the convergence guard
threw away. It only grows (orbax refuses a step number lower than the latest),
while the schedule position `state['step']` goes back to 0 on a restart.

Saves are asynchronous: `save` returns once the arrays are copied to the
host, and the files are written in a background thread. Orbax writes each
checkpoint into a temporary folder and renames it when complete, so a save
that fails or is killed leaves no folder that looks complete; `restore_latest`
additionally falls back to older checkpoints when the newest cannot be read
(a damaged folder: truncated arrays, missing metadata, flipped bytes),
logging why, and a training run moves the damaged folder aside (to
`checkpoints-damaged/`, never deleted) and retrains the lost steps.
Evaluation never moves anything: it uses the newest readable checkpoint if
that one completes the run, and otherwise stops with an error naming the
damaged checkpoint and the fix (rerun the training command).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from stnjax.checks import CheckpointError, InputError

log = logging.getLogger("stnjax.train")

CHECKPOINT_DIR = "checkpoints"



def _to_numpy(tree: Any) -> Any:
    # 0-d values become 0-d arrays: orbax rejects NumPy scalars.
    return jax.tree.map(lambda x: np.asarray(x), tree)


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_notice():
    """Drops orbax's "Given directory is read only" warning, which a
    read-only manager (what `read_only=True` asks for) logs on creation."""
    f = _DropReadOnlyNotice()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(f)
    try:
        yield
    finally:
        absl_logger.removeFilter(f)


class Checkpointer:
    """A CheckpointManager for one run (one fold, one plane)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int,
                 async_save: bool = True, read_only: bool = False):
        """Opens (or creates) the checkpoint folder.

        Args:
          directory: the folder that holds one sub-folder per checkpoint.
          keep: how many checkpoints to keep (the oldest are deleted).
          async_save: write files in a background thread.
          read_only: open for restoring only (inference).
        """
        if keep < 1:
            raise InputError(f"train.keep_checkpoints: must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self._read_only = bool(read_only)
        self.damaged: list[tuple[int, str, Path | None]] = []
        options = ocp.CheckpointManagerOptions(
            # Read-only: the values orbax would otherwise set itself, with a
            # warning each (three lines a plane on every model load).
            max_to_keep=None if read_only else int(keep),
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=bool(async_save),
            # Leftovers of a killed save are removed when the run resumes.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        with _quiet_read_only_notice():
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        """The iterations of all complete-looking checkpoints, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, iteration: int, state: Any, meta: dict) -> None:
        """Saves `state` (a tree of arrays, copied to host now) and `meta`.

        The files are written in the background; an error of an earlier
        background write surfaces here or in `wait`.

        Raises:
          CheckpointError naming the folder and the newest complete
          checkpoint when the save (or an earlier pending one) fails, or when
          orbax declines the iteration (not newer than the latest).
        """
        host = _to_numpy(jax.device_get(state))
        meta = dict(meta, iteration=int(iteration))
        try:
            ok = self._manager.save(
                int(iteration),
                args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                        meta=ocp.args.JsonSave(meta)),
                force=True)
        except Exception as e:  # noqa: BLE001 - reported with the folder and fallback
            raise self._error(f"saving iteration {iteration}", e) from e
        if not ok:
            raise CheckpointError(
                f"checkpoint: orbax did not save iteration {iteration} in {self.directory} "
                f"(existing: {self.steps()})")

    def _error(self, what: str, e: BaseException) -> CheckpointError:
        try:
            good = self.steps()
        except Exception:  # noqa: BLE001
            good = []
        fallback = (f"the newest complete checkpoint is iteration {good[-1]}; a rerun resumes "
                    f"from it" if good else "there is no complete checkpoint yet")
        return CheckpointError(f"checkpoint: {what} in {self.directory} failed "
                               f"({type(e).__name__}: {e}); {fallback}")

    def restore(self, iteration: int, abstract_state: Any | None) -> tuple[Any, dict]:
        """Restores one checkpoint: (state as NumPy arrays, meta dict).

        abstract_state: a tree of arrays or ShapeDtypeStructs with the expected
        structure, shapes and dtypes (None: whatever was saved).
        """
        args = ocp.args.StandardRestore(abstract_state) if abstract_state is not None \
            else ocp.args.StandardRestore()
        out = self._manager.restore(
            int(iteration), args=ocp.args.Composite(state=args, meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def restore_latest(self, abstract_state: Any | None) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that can be read: (iteration, state, meta).

        Checkpoints that fail to restore (damaged files) are skipped, newest
        first, and recorded in `self.damaged` as (iteration, reason, where).
        A writable checkpointer moves each one aside, to
        `<directory>-damaged/<iteration>[-n]` (renamed, never deleted), so
        the run can save that iteration again when it retrains it; a
        read-only one (inference) leaves them in place. Returns None when
        there is no usable checkpoint.
        """
        self.damaged: list[tuple[int, str, Path | None]] = []
        for it in reversed(self.steps()):
            try:
                state, meta = self.restore(it, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure: try an older one
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                where = None if self._read_only else self._move_aside(it)
                self.damaged.append((it, reason, where))
                log.warning("checkpoint %d in %s cannot be read (%s); %s; trying an older one",
                            it, self.directory, reason,
                            f"moved aside to {where}" if where else "left in place")
                continue
            return it, state, meta
        return None

    def _move_aside(self, iteration: int) -> Path | None:
        """Renames a damaged checkpoint folder out of the manager's folder."""
        src = self.directory / str(iteration)
        if not src.exists():
            return None
        aside = Path(f"{self.directory}-damaged")
        aside.mkdir(exist_ok=True)
        dest, n = aside / str(iteration), 1
        while dest.exists():
            dest, n = aside / f"{iteration}-{n}", n + 1
        os.replace(src, dest)
        self._manager.reload()
        return dest

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written.

        Raises CheckpointError when a background write failed.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._error("a background save", e) from e

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()


def load_trained_params(run_dir: str | os.PathLike, *,
                        require_complete: bool = True) -> tuple[Any, dict]:
    """Params of the newest checkpoint of a training run, for inference.

    Args:
      run_dir: the run folder `<workdir>/fold<f>/<plane>` (holds `checkpoints/`).
      require_complete: refuse a run whose schedule has not finished.

    Returns:
      (params as a NumPy tree {'coarse', 'saliency', 'fine'}, meta dict with
      'fold', 'plane', 'config_hash', 'step', 'total_steps', ...).

    Raises:
      InputError naming the folder when there is no readable checkpoint or
      the run is not complete.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        raise InputError(f"run_dir: no checkpoint folder {ckpt_dir}")
    ck = Checkpointer(ckpt_dir, keep=1, async_save=False, read_only=True)
    try:
        got = ck.restore_latest(None)
    finally:
        ck.close()
    damaged = "".join(f"; checkpoint {it} is damaged ({why})" for it, why, _ in ck.damaged)
    if got is None:
        raise InputError(f"run_dir: no readable checkpoint in {ckpt_dir}{damaged}")
    it, state, meta = got
    if require_complete and meta.get("step") != meta.get("total_steps"):
        fix = ("rerun the training command: it moves the damaged checkpoint aside and "
               "retrains from the newest good one" if damaged else "resume training")
        raise InputError(
            f"run_dir: the run in {run_dir} is not complete (newest readable checkpoint "
            f"{it}: step {meta.get('step')} of {meta.get('total_steps')}){damaged}; {fix}, "
            "or pass require_complete=False")
    if damaged:  # an older, still complete checkpoint (e.g. a damaged extra save)
        log.warning("run_dir %s: using checkpoint %d%s", run_dir, it, damaged)
    return state["params"], meta
