"""The training loop: runs, stages, logging, the convergence guard, resume.

`train(config, workdir)` trains one model per (fold, plane) of the config,
sequentially, each in `<workdir>/fold<f>/<plane>` (see `workdir.py`), and
`train_run` trains one of them:

- the stages of `config.train.stages` run one after the other with one
  optimiser state (reference 3.2 / 3.3); every step is the step of its mode
  (`steps.py`), pmapped over several devices or jitted on one
  (`placement.py`), fed by the data sampler, a pure function of (seed,
  step), through a background prefetch thread;
- metrics are fetched from the devices every `log_every` steps (not every
  step, which would stall the device queue), written as one JSON line per
  logged step to `metrics.jsonl` and logged with the progress and an ETA;
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
  `guard_max_restarts` times; restarts are logged and written to the metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from stnjax.data.store import CaseStore
from stnjax.checks import InputError, TrainingDivergedError
from stnjax.fileio import atomic_write_text
from stnjax.models.rstn import RSTN
from stnjax.data.sampler import prefetch
from stnjax.train import inputs
from stnjax.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from stnjax.train.schedule import lr_at, parse_stages, stage_at, total_steps
from stnjax.train.placement import placement_for
from stnjax.train.state import init_key, init_train_state, sampler_seed, tree_all_finite
from stnjax.train.steps import OptimizerSpec
from stnjax.train.workdir import (MetricsWriter, check_workdir, config_hash, run_dir,
                                  write_workdir_files)

log = logging.getLogger("stnjax.train")

INIT_HW = (32, 32)  # parameter shapes do not depend on the image size
_COMPILED: set = set()  # (id of a cached step function, bucket) already run in this process


@dataclasses.dataclass(frozen=True)
class GuardDecision:
    """restart: S must restart; mean: mean coarse loss over the last n steps."""

    restart: bool
    mean: float
    n: int
    threshold: float


def guard_decision(coarse_losses: Sequence[float], *, window: int,
                   threshold: float) -> GuardDecision:
    """The convergence guard's decision at the end of S.

    Args:
      coarse_losses: the per-step (global batch) coarse losses of this S
        attempt, oldest first.
      window: how many of the last steps count (all of them if fewer).
      threshold: restart when their mean is above this.

    Returns:
      GuardDecision; never a restart without any step, and a non-finite mean
      is a restart.
    """
    vals = np.asarray(list(coarse_losses)[-int(window):] if window > 0 else [], np.float64)
    if vals.size == 0:
        return GuardDecision(False, float("nan"), 0, float(threshold))
    mean = float(vals.mean())
    return GuardDecision(not mean <= threshold, mean, int(vals.size), float(threshold))


def fmt_duration(seconds: float) -> str:
    """Seconds as '1h02m', '3m05s' or '12s' ('?' when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def initialize_distributed(config: Any, force: bool = False, *,
                           coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize() when config.train.multihost (or force).

    Must run before anything else touches the devices. Without arguments the
    coordinator and process ids are detected (Cloud TPU pods, SLURM, Open MPI,
    Kubernetes); elsewhere give all three (the coordinator address may also
    come from JAX_COORDINATOR_ADDRESS).
    """
    if not (force or bool(config.train.multihost)):
        return
    jax.distributed.initialize(coordinator_address=coordinator or None,
                               num_processes=num_processes, process_id=process_id)
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


def train_run(config: Any, workdir: str | os.PathLike, fold: int, plane: str, *,
              store: CaseStore | None = None, ds_dir: Path | None = None,
              rstn: RSTN | None = None, run_label: str = "") -> dict:
    """Trains (or resumes, or finds complete) the model of one fold and plane.

    Args:
      config: the resolved config (launch/configs/common.py schema).
      workdir: the workdir; the run lives in <workdir>/fold<fold>/<plane>.
      store, ds_dir: an open CaseStore and its dataset folder (default: from
        the config).
      rstn: the model structure (default: RSTN.from_config(config.model)).
      run_label: a prefix for log lines, e.g. "run 2/3".

    Returns:
      A summary dict: fold, plane, run_dir, steps, iterations, restarts,
      the last logged losses, wall seconds, complete.

    Raises:
      TrainingDivergedError on a non-finite loss; InputError on bad config or
      data (no training slice for the plane, a run folder of another config).
    """
    tc = config.train
    stages = parse_stages(tc.stages, tc.method)
    total = total_steps(stages)
    modes = list(dict.fromkeys(st.mode for st in stages))
    rdir = run_dir(workdir, fold, plane)
    chash = config_hash(config)
    seed = int(config.seed)
    pid, nproc = jax.process_index(), jax.process_count()
    primary = pid == 0
    tag = f"{run_label + ' ' if run_label else ''}fold {fold} plane {plane}"

    ds_dir = ds_dir or inputs.dataset_dir(config, workdir)
    store = store or inputs.open_store(config, ds_dir, workdir)
    pdata = inputs.plane_data(config, store, ds_dir, fold, plane)
    rstn = rstn or RSTN.from_config(config.model)
    batch_size = int(config.data.batch_size)
    devices = inputs.choose_devices(batch_size, int(tc.devices))
    per_host = batch_size // nproc

    spec = OptimizerSpec.from_config(tc)
    # pmap over several devices (all devices of all hosts when there are
    # several), jit on a single one (placement.py says why).
    place = placement_for(devices, process_count=nproc)
    step_fns = {m: place.step(rstn, m, spec, float(tc.coarse_weight), float(tc.bce_weight))
                for m in modes}

    def fresh_state(attempt: int):
        return init_train_state(_init_params(rstn, seed), spec.optimizer(), seed, attempt)

    ck = Checkpointer(rdir / CHECKPOINT_DIR, keep=int(tc.keep_checkpoints))
    writer = MetricsWriter(rdir / "metrics.jsonl") if primary else None
    guard_on = tc.method == "rstn" and int(tc.guard_max_restarts) > 0
    window = int(tc.guard_window)

    got = ck.restore_latest(None)
    if got is not None:
        iteration, host_state, meta = got
        if meta.get("config_hash") != chash:
            raise InputError(
                f"workdir: {rdir} holds checkpoints of another config (hash "
                f"{meta.get('config_hash')} vs {chash}); use another workdir or --overwrite")
        attempt, step = int(meta["attempt"]), int(np.asarray(host_state["step"]))
        guard_hist, restarts = list(meta.get("guard_history", [])), list(meta.get("restarts", []))
        if writer:
            writer.keep_only(lambda r: int(r.get("iteration", 0)) <= iteration)
        log.info("%s: resuming from checkpoint %d (step %d of %d, attempt %d)",
                 tag, iteration, step, total, attempt)
    else:
        iteration, attempt, step, guard_hist, restarts = 0, 0, 0, [], []
        host_state = fresh_state(0)
        if writer:
            writer.keep_only(lambda r: False)
    summary = {"fold": fold, "plane": plane, "run_dir": str(rdir), "total_steps": total,
               "slices": int(len(pdata.slices)), "devices": len(devices)}
    if step >= total:
        ck.close()
        log.info("%s: already complete (%d steps)", tag, total)
        return dict(summary, steps=step, iterations=iteration, restarts=restarts, complete=True)

    log.info("%s: %d training slices, buckets %s, %d device(s), global batch %d, stages %s",
             tag, len(pdata.slices), inputs.make_sampler(config, pdata, seed).buckets(),
             len(devices), batch_size, tc.stages)
    state = place.put_state(host_state)
    del host_state
    t_start = time.time()
    pending: list[tuple[int, int, str, Any, bool]] = []
    last = {"t": time.time(), "sec_per_step": float("nan"), "record": None}

    def batches_from(step0: int, attempt: int):
        sampler = inputs.make_sampler(config, pdata, sampler_seed(seed, attempt))
        return prefetch(sampler, range(step0, total), shard=pid, num_shards=nproc)

    def save(it: int, state: Any, step: int) -> None:
        if not tree_all_finite(state["params"]):
            raise _diverged(f"non-finite parameters after step {step}")
        meta = {"config_hash": chash, "fold": int(fold), "plane": plane, "attempt": attempt,
                "step": int(step), "total_steps": total, "method": tc.method,
                "stage": stage_at(stages, min(step, total - 1)).mode,
                "guard_history": [float(v) for v in guard_hist[-window:]],
                "restarts": restarts}
        ck.save(it, place.host_state(state), meta)

    def _diverged(what: str) -> TrainingDivergedError:
        try:
            ck.wait()  # let the last good checkpoint finish writing
        except Exception:  # noqa: BLE001 - the divergence is the error to report
            log.exception("%s: a pending checkpoint save failed", tag)
        good = ck.steps()
        where = (f"the last good checkpoint is iteration {good[-1]} in {ck.directory}"
                 if good else "no checkpoint was written")
        if writer:
            writer.write({"event": "diverged", "iteration": iteration, "step": step,
                          "attempt": attempt, "what": what})
        return TrainingDivergedError(
            f"{tag}: {what}; training stopped ({where}). The run is deterministic: rerunning "
            "the command resumes there and meets the same values again; lower train.base_lr "
            "(in a new workdir, or with --overwrite) or check the data")

    def flush() -> None:
        nonlocal guard_hist
        if not pending:
            return
        host = [place.host_metrics(m) for _, _, _, m, _ in pending]
        now = time.time()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for (it, st, mode, _, _), mets in zip(pending, host):
            per = {k: float(s) / float(c) if c > 0 else float("nan") for k, (s, c) in mets.items()}
            if not all(math.isfinite(per[k]) for k in ("loss", "loss_coarse", "loss_fine")
                       if float(mets[k][1]) > 0):
                pending.clear()
                raise _diverged(f"non-finite loss at step {st} (stage {mode}): "
                                f"coarse {per['loss_coarse']}, fine {per['loss_fine']}")
            if mode == "S" and guard_on:
                guard_hist = (guard_hist + [per["loss_coarse"]])[-window:]
            for k, (s, c) in mets.items():
                sums[k] = sums.get(k, 0.0) + float(s)
                counts[k] = counts.get(k, 0.0) + float(c)
        it, st, mode = pending[-1][0], pending[-1][1], pending[-1][2]
        n = len(pending)
        fresh_compile = any(p[4] for p in pending)
        dt = max(now - last["t"], 1e-9)
        if not fresh_compile:
            sps = dt / n
            last["sec_per_step"] = sps if not math.isfinite(last["sec_per_step"]) else \
                0.7 * last["sec_per_step"] + 0.3 * sps
        examples = counts.get("loss", 0.0)
        rec = {"event": "train", "fold": int(fold), "plane": plane, "iteration": it + 1,
               "step": st + 1, "attempt": attempt, "stage": mode,
               "loss": _mean(sums, counts, "loss"), "loss_coarse": _mean(sums, counts, "loss_coarse"),
               "loss_fine": _mean(sums, counts, "loss_fine"),
               "lr": lr_at(stages, float(tc.base_lr), int(tc.j_halving_every), st),
               "examples_per_s": examples / dt, "steps_per_s": n / dt, "steps": n,
               "examples": examples, "compiled": fresh_compile,
               "time_s": round(now - t_start, 3)}
        if "loss_bce" in sums:
            rec["loss_bce"] = _mean(sums, counts, "loss_bce")
        for k in sums:
            if k.startswith("stat_"):
                name = k[5:]
                rec[f"mean_{name}" if name == "box_area" else f"count_{name}"] = (
                    _mean(sums, counts, k) if name == "box_area" else sums[k])
        if writer:
            writer.write(rec)
        last["record"] = rec
        remaining = total - (st + 1)
        log.info("%s | %s step %d/%d | loss %.4f (coarse %.4f, fine %.4f) | lr %.3g | "
                 "%.1f ex/s | ETA %s", tag, mode, st + 1, total, rec["loss"],
                 rec["loss_coarse"], rec["loss_fine"], rec["lr"], rec["examples_per_s"],
                 fmt_duration(remaining * last["sec_per_step"]))
        pending.clear()
        last["t"] = time.time()

    batches = batches_from(step, attempt)
    compile_s: dict[str, float] = {}  # first call per (mode, bucket) in this process
    try:
        while step < total:
            stage = stage_at(stages, step)
            got_step, host_batch = next(batches)
            assert got_step == step, (got_step, step)
            hw = tuple(host_batch["image"].shape[1:3])
            key = (id(step_fns[stage.mode]), hw)
            new = key not in _COMPILED
            if new:  # the step compiles on the first call with these shapes
                _COMPILED.add(key)
                log.info("%s: compiling step %s for bucket %dx%d", tag, stage.mode, *hw)
                t_compile = time.time()
            dev_batch = place.put_batch(host_batch, global_offset=pid * per_host)
            state, metrics = step_fns[stage.mode](state, dev_batch)
            if new:  # compile time reported apart (rates and the ETA exclude it)
                jax.block_until_ready(metrics)
                secs = time.time() - t_compile
                log.info("%s: step %s for bucket %dx%d compiled and ran once in %.1f s",
                         tag, stage.mode, *hw, secs)
                compile_s[f"{stage.mode} {hw[0]}x{hw[1]}"] = round(secs, 2)
            pending.append((iteration, step, stage.mode, metrics, new))
            step += 1
            iteration += 1
            stage_end = step == stage.end
            ckpt_due = stage_end or step % int(tc.checkpoint_every) == 0
            if ckpt_due or step % int(tc.log_every) == 0:
                flush()
            if stage_end and stage.mode == "S" and guard_on:
                dec = guard_decision(guard_hist, window=window, threshold=float(tc.guard_coarse_loss))
                event = {"iteration": iteration, "step": step, "attempt": attempt,
                         "mean_coarse": dec.mean, "window": dec.n, "threshold": dec.threshold}
                if dec.restart and attempt < int(tc.guard_max_restarts):
                    log.warning("%s: convergence guard: mean coarse loss %.4f over the last %d "
                                "steps of S is above %.3f; restarting S (attempt %d of %d)",
                                tag, dec.mean, dec.n, dec.threshold, attempt + 2,
                                int(tc.guard_max_restarts) + 1)
                    restarts.append(dict(event))
                    if writer:
                        writer.write(dict(event, event="guard_restart", next_attempt=attempt + 1))
                    attempt, step, guard_hist = attempt + 1, 0, []
                    state = place.put_state(fresh_state(attempt))
                    batches.close()
                    batches = batches_from(0, attempt)
                    save(iteration, state, step)
                    continue
                kind = "guard_gave_up" if dec.restart else "guard_passed"
                if dec.restart:
                    log.warning("%s: convergence guard: S still stuck after %d restarts (mean "
                                "coarse loss %.4f > %.3f); continuing", tag, attempt,
                                dec.mean, dec.threshold)
                else:
                    log.info("%s: convergence guard: S converged (mean coarse loss %.4f <= %.3f)",
                             tag, dec.mean, dec.threshold)
                if writer:
                    writer.write(dict(event, event=kind))
            if ckpt_due:
                save(iteration, state, step)
        ck.wait()
    finally:
        batches.close()
        try:
            ck.close()
        except Exception:  # noqa: BLE001 - do not mask the error being raised
            log.exception("%s: closing the checkpoint manager failed", tag)
    wall = time.time() - t_start
    rec = last["record"] or {}
    out = dict(summary, steps=step, iterations=iteration, restarts=restarts, complete=True,
               wall_s=round(wall, 2), loss=rec.get("loss"), loss_coarse=rec.get("loss_coarse"),
               loss_fine=rec.get("loss_fine"), config_hash=chash, compile_s=compile_s)
    if primary:
        atomic_write_text(rdir / "run.json", json.dumps(out, indent=2, default=str) + "\n")
    log.info("%s: done in %s (%d steps, %d restarts); final loss %.4f", tag, fmt_duration(wall),
             step, len(restarts), out["loss"] if out["loss"] is not None else float("nan"))
    return out


def _mean(sums: dict, counts: dict, k: str) -> float:
    c = counts.get(k, 0.0)
    return sums[k] / c if c > 0 else float("nan")


def train(config: Any, workdir: str | os.PathLike, *, overwrite: bool = False) -> list[dict]:
    """Trains every (fold, plane) of the config in turn; see `train_run`.

    Checks the config (stages, folds, planes) before any work, refuses a
    workdir holding checkpoints of another config unless `overwrite`, and
    writes the resolved config and package versions into the workdir.
    Returns one summary per run.
    """
    parse_stages(config.train.stages, config.train.method)
    for name in ("log_every", "checkpoint_every", "keep_checkpoints", "guard_window"):
        if int(config.train[name]) < 1:
            raise InputError(f"train.{name}: must be >= 1, got {config.train[name]}")
    folds = inputs.resolve_folds(config.data.folds, int(config.data.n_folds))
    planes = inputs.resolve_planes(config.data.planes)
    workdir = Path(workdir)
    if jax.process_index() == 0:
        check_workdir(workdir, config, overwrite=overwrite)
        write_workdir_files(workdir, config)
    ds_dir = inputs.dataset_dir(config, workdir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("stnjax: dataset ready")
    store = inputs.open_store(config, ds_dir, workdir)
    rstn = RSTN.from_config(config.model)
    runs = [(f, p) for f in folds for p in planes]
    out = []
    for i, (fold, plane) in enumerate(runs):
        out.append(train_run(config, workdir, fold, plane, store=store, ds_dir=ds_dir, rstn=rstn,
                             run_label=f"run {i + 1}/{len(runs)}"))
    return out
