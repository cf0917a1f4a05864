"""The training loop: runs, stages, logging, the convergence guard, resume.

`train(spec, workdir)` trains one model per (fold, plane) of a `TrainSpec`
(`spec.py`, made from the config by the launcher), sequentially, each in
`<workdir>/fold<f>/<plane>` (see `workdir.py`), and `train_run` trains one
of them:

- the stages of `spec.loop.stages` run one after the other with one
  optimiser state (reference 3.2 / 3.3); every step is the step of its mode
  (`steps.py`), pmapped over several devices or jitted on one
  (`placement.py`), fed by the data sampler, a pure function of (seed,
  step), through a background prefetch thread;
- metrics are fetched from the devices every `log_every` steps (not every
  step, which would stall the device queue), written as one JSON line per
  logged step to `metrics.jsonl` and logged with the progress and an ETA
  (`reporting.py`);
- a non-finite loss (or non-finite parameters at a checkpoint) stops the run
  with `TrainingDivergedError`; checkpoints are only written after the
  losses up to them were checked, so the latest checkpoint is always good;
- checkpoints every `checkpoint_every` steps and at each stage end; a run
  that finds checkpoints resumes from the newest readable one and repeats
  exactly the steps an uninterrupted run would have taken;
- the convergence guard (reference 7, lesson 1): at the end of S, if the mean
  coarse loss over its last `guard_window` steps is above
  `guard_coarse_loss` (the coarse net never started to predict the organ,
  loss stuck near 0.95), S restarts from the initial state with the next
  attempt number folded into the keys and the sampler seed, at most
  `guard_max_restarts` times; restarts are logged and written to the metrics
  (`guard.py`).

`train_run` is built of small parts: `_open_run` (schedule, data, devices,
steps, checkpointer), `_restore` (resume or a fresh start), `_train_steps`
(the loop), `_one_step`, `_save`, `_diverged` and `_finish`; the state they
share is explicit (`_Run`, what does not change; `_Progress`, the
iteration, step and attempt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from stnjax.data.store import CaseStore
from stnjax.checks import InputError, TrainingDivergedError
from stnjax.fileio import atomic_write_text
from stnjax.models.rstn import RSTN
from stnjax.data.sampler import prefetch
from stnjax.train import inputs
from stnjax.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from stnjax.train.progress import FILE_NAME as PROGRESS_FILE
from stnjax.train.progress import ProgressPicture
from stnjax.train.guard import ConvergenceGuard
from stnjax.train.lock import RunLock
from stnjax.train.reporting import Pending, StepReporter, fmt_duration
from stnjax.train.schedule import stage_at, total_steps
from stnjax.train.spec import TrainSpec
from stnjax.train.placement import placement_for
from stnjax.train.steps import fine_rounds
from stnjax.train.state import init_key, init_train_state, sampler_seed, tree_all_finite
from stnjax.train.workdir import MetricsWriter, check_workdir, run_dir, write_workdir_files

log = logging.getLogger("stnjax.train")

INIT_HW = (32, 32)  # parameter shapes do not depend on the image size
_COMPILED: set = set()  # (id of a cached step function, bucket) already run in this process


def initialize_distributed(multihost: bool, *, coordinator: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           heartbeat_timeout_s: int | None = None,
                           recoverable: bool = False) -> None:
    """jax.distributed.initialize() when `multihost` (train.multihost or a
    launcher flag).

    Must run before anything else touches the devices. Without arguments the
    coordinator and process ids are detected (Cloud TPU pods, SLURM, Open MPI,
    Kubernetes); elsewhere give all three (the coordinator address may also
    come from JAX_COORDINATOR_ADDRESS). `heartbeat_timeout_s`: seconds after
    which jax counts a silent process as dead (None: jax's default);
    `recoverable`: jax's recoverable mode, in which a dead process does not
    end the others (evaluation and segmentation, which notice it themselves).
    """
    if not multihost:
        return
    if recoverable:
        try:
            jax.config.update("jax_enable_recoverability", True)
        except (AttributeError, KeyError) as e:  # an older jax
            log.warning("jax has no recoverable mode (%s): a lost process ends the others", e)
    kwargs = {} if heartbeat_timeout_s is None else {
        "heartbeat_timeout_seconds": int(heartbeat_timeout_s)}
    jax.distributed.initialize(coordinator_address=coordinator or None,
                               num_processes=num_processes, process_id=process_id, **kwargs)
    log.info("distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())


@functools.lru_cache(maxsize=8)
def _jitted_init(rstn: RSTN):
    return jax.jit(rstn.init_params, static_argnums=1)


def _init_params(rstn: RSTN, seed: int) -> Any:
    """Fresh params (the same for every attempt); jitted for the "he" init,
    on the host for "pretrained" (it reads the weights file)."""
    key = init_key(seed)
    if rstn.init == "he":
        return _jitted_init(rstn)(key, INIT_HW)
    return rstn.init_params(key, INIT_HW)


@dataclasses.dataclass
class _Progress:
    """Where a run stands: the checkpoint index (iterations run, restarts
    included), the step in the schedule, and the guard's attempt."""
    iteration: int = 0
    step: int = 0
    attempt: int = 0


@dataclasses.dataclass
class _Run:
    """What the parts of one run share; built once by `_open_run`."""
    tag: str
    fold: int
    plane: str
    rdir: Path
    chash: str
    stages: list
    total: int
    method: str
    place: Any
    step_fns: dict
    ck: Checkpointer
    writer: MetricsWriter | None  # None on hosts other than the first
    picture: ProgressPicture | None  # progress.png, drawn from the writer's records
    fresh_state: Callable[[int], Any]
    make_batches: Callable[[int, int], Any]  # (first step, attempt) -> prefetched batches
    per_host: int
    pid: int
    checkpoint_every: int
    log_every: int


def _open_run(spec: TrainSpec, workdir: str | os.PathLike, fold: int, plane: str, *,
              store: CaseStore | None, ds_dir: Path | None, tag: str
              ) -> tuple[_Run, Any, int]:
    """The run's schedule, data, devices, step functions, checkpointer and
    metrics file; returns (run, plane data, device count)."""
    lp, data, rstn, seed = spec.loop, spec.data, spec.model, spec.seed
    stages = lp.stage_list
    total = total_steps(stages)
    pid, nproc = jax.process_index(), jax.process_count()
    rdir = run_dir(workdir, fold, plane)
    ds_dir = ds_dir or inputs.dataset_dir(data, workdir)
    store = store or inputs.open_store(data, ds_dir, workdir)
    pdata = inputs.plane_data(data, store, ds_dir, fold, plane, seed=seed)
    devices = inputs.choose_devices(data.batch_size, lp.devices)
    # pmap over several devices (all devices of all hosts when there are
    # several), jit on a single one (placement.py says why).
    place = placement_for(devices, process_count=nproc)
    modes = list(dict.fromkeys(st.mode for st in stages))
    step_fns = {m: place.step(rstn, m, spec.optimizer, lp.coarse_weight, lp.bce_weight,
                              fine_rounds(m, lp.unroll_rounds))
                for m in modes}

    def fresh_state(attempt: int):
        return init_train_state(_init_params(rstn, seed), spec.optimizer.optimizer(), seed,
                                attempt)

    def make_batches(step0: int, attempt: int):
        sampler = inputs.make_sampler(data, pdata, sampler_seed(seed, attempt))
        return prefetch(sampler, range(step0, total), shard=pid, num_shards=nproc)

    writer = MetricsWriter(rdir / "metrics.jsonl") if pid == 0 else None
    picture = (ProgressPicture(rdir / PROGRESS_FILE, writer.records,
                               title=f"{lp.method} fold {fold} plane {plane}")
               if writer else None)
    run = _Run(tag=tag, fold=int(fold), plane=plane, rdir=rdir, chash=spec.config_hash,
               stages=stages, total=total, method=lp.method, place=place, step_fns=step_fns,
               ck=Checkpointer(rdir / CHECKPOINT_DIR, keep=lp.keep_checkpoints),
               writer=writer, picture=picture,
               fresh_state=fresh_state, make_batches=make_batches,
               per_host=data.batch_size // nproc, pid=pid,
               checkpoint_every=lp.checkpoint_every, log_every=lp.log_every)
    return run, pdata, len(devices)


def _restore(run: _Run, guard_args: dict) -> tuple[_Progress, Any, ConvergenceGuard]:
    """The newest readable checkpoint of this config (progress, host state and
    guard state), or a fresh start; trims metrics.jsonl to what it covers."""
    got = run.ck.restore_latest(None)
    if got is None:
        if run.writer:
            run.writer.keep_only(lambda r: False)
        return _Progress(), run.fresh_state(0), ConvergenceGuard(**guard_args)
    iteration, host_state, meta = got
    if meta.get("config_hash") != run.chash:
        raise InputError(
            f"workdir: {run.rdir} holds checkpoints of another config (hash "
            f"{meta.get('config_hash')} vs {run.chash}); use another workdir or --overwrite")
    prog = _Progress(iteration, int(np.asarray(host_state["step"])), int(meta["attempt"]))
    guard = ConvergenceGuard(**guard_args, history=meta.get("guard_history", []),
                             restarts=meta.get("restarts", []))
    if run.writer:
        run.writer.keep_only(lambda r: int(r.get("iteration", 0)) <= iteration)
    log.info("%s: resuming from checkpoint %d (step %d of %d, attempt %d)",
             run.tag, iteration, prog.step, run.total, prog.attempt)
    return prog, host_state, guard


def _diverged(run: _Run, prog: _Progress, what: str) -> TrainingDivergedError:
    """The error (and the metrics event) of a non-finite loss or parameter,
    naming the last good checkpoint once its pending save finished."""
    try:
        run.ck.wait()  # let the last good checkpoint finish writing
    except Exception:  # noqa: BLE001 - the divergence is the error to report
        log.exception("%s: a pending checkpoint save failed", run.tag)
    good = run.ck.steps()
    where = (f"the last good checkpoint is iteration {good[-1]} in {run.ck.directory}"
             if good else "no checkpoint was written")
    if run.writer:
        run.writer.write({"event": "diverged", "iteration": prog.iteration, "step": prog.step,
                          "attempt": prog.attempt, "what": what})
    return TrainingDivergedError(
        f"{run.tag}: {what}; training stopped ({where}). The run is deterministic: rerunning "
        "the command resumes there and meets the same values again; lower train.base_lr "
        "(in a new workdir, or with --overwrite) or check the data")


def _save(run: _Run, prog: _Progress, guard: ConvergenceGuard, state: Any) -> None:
    """A checkpoint of `state` at the current progress, after checking its params."""
    if not tree_all_finite(state["params"]):
        raise _diverged(run, prog, f"non-finite parameters after step {prog.step}")
    meta = {"config_hash": run.chash, "fold": run.fold, "plane": run.plane,
            "attempt": prog.attempt, "step": int(prog.step), "total_steps": run.total,
            "method": run.method,
            "stage": stage_at(run.stages, min(prog.step, run.total - 1)).mode,
            **guard.checkpoint_state()}
    run.ck.save(prog.iteration, run.place.host_state(state), meta)


def _one_step(run: _Run, prog: _Progress, state: Any, batch: tuple[int, dict],
              compile_s: dict[str, float]) -> tuple[Any, Pending, Any]:
    """Runs the step of the current stage on one batch; the first call per
    (mode, bucket) in this process compiles, timed apart (rates and the ETA
    exclude it). Returns (state, the step's pending metrics, the stage)."""
    stage = stage_at(run.stages, prog.step)
    got_step, host_batch = batch
    assert got_step == prog.step, (got_step, prog.step)
    hw = tuple(host_batch["image"].shape[1:3])
    key = (id(run.step_fns[stage.mode]), hw)
    new = key not in _COMPILED
    if new:
        _COMPILED.add(key)
        log.info("%s: compiling step %s for bucket %dx%d", run.tag, stage.mode, *hw)
        t_compile = time.time()
    dev_batch = run.place.put_batch(host_batch, global_offset=run.pid * run.per_host)
    state, metrics = run.step_fns[stage.mode](state, dev_batch)
    if new:
        jax.block_until_ready(metrics)
        secs = time.time() - t_compile
        log.info("%s: step %s for bucket %dx%d compiled and ran once in %.1f s",
                 run.tag, stage.mode, *hw, secs)
        compile_s[f"{stage.mode} {hw[0]}x{hw[1]}"] = round(secs, 2)
    return state, Pending(prog.iteration, prog.step, stage.mode, metrics, new), stage


def _train_steps(run: _Run, prog: _Progress, guard: ConvergenceGuard, state: Any,
                 reporter: StepReporter) -> dict[str, float]:
    """The loop over the remaining steps: log, guard and checkpoint as they
    fall due; returns the compile seconds per (mode, bucket)."""

    def check(step: int, mode: str, per: dict, mets: dict) -> None:
        if not all(math.isfinite(per[k]) for k in ("loss", "loss_coarse", "loss_fine")
                   if float(mets[k][1]) > 0):
            raise _diverged(run, prog, f"non-finite loss at step {step} (stage {mode}): "
                            f"coarse {per['loss_coarse']}, fine {per['loss_fine']}")
        guard.observe(mode, per["loss_coarse"])

    batches = run.make_batches(prog.step, prog.attempt)
    compile_s: dict[str, float] = {}
    try:
        while prog.step < run.total:
            state, item, stage = _one_step(run, prog, state, next(batches), compile_s)
            reporter.add(item)
            prog.step += 1
            prog.iteration += 1
            stage_end = prog.step == stage.end
            ckpt_due = stage_end or prog.step % run.checkpoint_every == 0
            if ckpt_due or prog.step % run.log_every == 0:
                reporter.flush(prog.attempt, check)
            if stage_end and stage.mode == "S" and guard.end_of_s(
                    iteration=prog.iteration, step=prog.step, attempt=prog.attempt):
                prog.attempt, prog.step = prog.attempt + 1, 0
                state = run.place.put_state(run.fresh_state(prog.attempt))
                batches.close()
                batches = run.make_batches(0, prog.attempt)
                _save(run, prog, guard, state)
                continue
            if ckpt_due:
                _save(run, prog, guard, state)
                if run.picture:  # at most once a minute: never slows training
                    run.picture.update()
        run.ck.wait()
    finally:
        batches.close()
        try:
            run.ck.close()
        except Exception:  # noqa: BLE001 - do not mask the error being raised
            log.exception("%s: closing the checkpoint manager failed", run.tag)
    return compile_s


def train_run(spec: TrainSpec, workdir: str | os.PathLike, fold: int, plane: str, *,
              store: CaseStore | None = None, ds_dir: Path | None = None,
              run_label: str = "", steps_after: int = 0) -> dict:
    """Trains (or resumes, or finds complete) the model of one fold and plane.

    Args:
      spec: the run's settings (`TrainSpec.from_config`).
      workdir: the workdir; the run lives in <workdir>/fold<fold>/<plane>.
      store, ds_dir: an open CaseStore and its dataset folder (default: from
        spec.data).
      run_label: a prefix for log lines, e.g. "run 2/3".
      steps_after: training steps of the job's runs after this one, for the
        job's ETA in the log (0: this run is the last or alone).

    Returns:
      A summary dict: fold, plane, run_dir, steps, iterations, restarts,
      the last logged losses, wall seconds, complete.

    Raises:
      TrainingDivergedError on a non-finite loss; InputError on bad config or
      data (no training slice for the plane, a run folder of another config,
      a run folder another live process is training: `lock.RunLock`).
    """
    tag = f"{run_label + ' ' if run_label else ''}fold {fold} plane {plane}"
    # One writer per run folder (lock.py); on several hosts the first one
    # writes the files, so it holds the lock.
    lock = (RunLock(run_dir(workdir, fold, plane), tag) if jax.process_index() == 0
            else contextlib.nullcontext())
    with lock:
        return _train_run_locked(spec, workdir, fold, plane, store=store, ds_dir=ds_dir,
                                 tag=tag, steps_after=steps_after)


def _train_run_locked(spec: TrainSpec, workdir: str | os.PathLike, fold: int, plane: str, *,
                      store: CaseStore | None, ds_dir: Path | None, tag: str,
                      steps_after: int = 0) -> dict:
    """`train_run` once its run folder is locked."""
    lp = spec.loop
    run, pdata, n_devices = _open_run(spec, workdir, fold, plane, store=store,
                                      ds_dir=ds_dir, tag=tag)
    write = run.writer.write if run.writer else None  # metrics.jsonl: first host only
    guard_args = dict(on=lp.guard_on, window=lp.guard_window, threshold=lp.guard_coarse_loss,
                      max_restarts=lp.guard_max_restarts, tag=tag, write=write)
    prog, host_state, guard = _restore(run, guard_args)
    summary = {"fold": fold, "plane": plane, "run_dir": str(run.rdir), "total_steps": run.total,
               "slices": int(len(pdata.slices)), "devices": n_devices}
    if prog.step >= run.total:
        run.ck.close()
        log.info("%s: already complete (%d steps)", tag, run.total)
        return dict(summary, steps=prog.step, iterations=prog.iteration,
                    restarts=guard.restarts, complete=True)
    log.info("%s: %d training slices, buckets %s, %d device(s), global batch %d, stages %s",
             tag, len(pdata.slices), inputs.make_sampler(spec.data, pdata, spec.seed).buckets(),
             n_devices, spec.data.batch_size, lp.stages)
    state = run.place.put_state(host_state)
    del host_state
    reporter = StepReporter(host_metrics=run.place.host_metrics, write=write,
                            tag=tag, fold=fold, plane=plane, stages=run.stages, total=run.total,
                            base_lr=spec.optimizer.base_lr,
                            j_halving_every=spec.optimizer.j_halving_every,
                            steps_after=steps_after)
    compile_s = _train_steps(run, prog, guard, state, reporter)
    return _finish(run, prog, guard, reporter, summary, compile_s)


def _finish(run: _Run, prog: _Progress, guard: ConvergenceGuard, reporter: StepReporter,
            summary: dict, compile_s: dict[str, float]) -> dict:
    """The run's summary, written as run.json (first host) and logged."""
    wall = time.time() - reporter.t_start
    rec = reporter.last_record or {}
    out = dict(summary, steps=prog.step, iterations=prog.iteration, restarts=guard.restarts,
               complete=True, wall_s=round(wall, 2), loss=rec.get("loss"),
               loss_coarse=rec.get("loss_coarse"), loss_fine=rec.get("loss_fine"),
               config_hash=run.chash, compile_s=compile_s)
    if run.picture:
        run.picture.update(force=True)
    if run.writer:
        atomic_write_text(run.rdir / "run.json", json.dumps(out, indent=2, default=str) + "\n")
    log.info("%s: done in %s (%d steps, %d restarts); final loss %.4f", run.tag,
             fmt_duration(wall), prog.step, len(guard.restarts),
             out["loss"] if out["loss"] is not None else float("nan"))
    return out


def train(spec: TrainSpec, workdir: str | os.PathLike, *, overwrite: bool = False
          ) -> list[dict]:
    """Trains every (fold, plane) of spec.data in turn; see `train_run`.

    Refuses a workdir holding checkpoints of another config unless
    `overwrite` (the spec was checked when it was made), and writes the
    resolved config and package versions into the workdir. Returns one
    summary per run.
    """
    workdir = Path(workdir)
    if jax.process_index() == 0:
        check_workdir(workdir, spec.record, overwrite=overwrite)
        write_workdir_files(workdir, spec.record)
    ds_dir = inputs.dataset_dir(spec.data, workdir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("stnjax: dataset ready")
    store = inputs.open_store(spec.data, ds_dir, workdir)
    runs = [(f, p) for f in spec.data.folds for p in spec.data.planes]
    out = []
    per_run = total_steps(spec.loop.stage_list)
    for i, (fold, plane) in enumerate(runs):
        out.append(train_run(spec, workdir, fold, plane, store=store, ds_dir=ds_dir,
                             run_label=f"run {i + 1}/{len(runs)}",
                             steps_after=per_run * (len(runs) - i - 1)))
    return out
