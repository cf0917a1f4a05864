"""Multi-host training on CPU: 2 processes x 2 devices == 1 process x 4 devices.

Three `launch.train` runs of the smoke config (global batch 4, stages J:2,
a checkpoint and a metrics line after every step), started together:
  M0, M1  two processes of one multi-host run (--coordinator on a free
          localhost port, --num_processes=2, --process_id=0/1), each with 2
          fake CPU devices, sharing one workdir as hosts share a file system;
          cross-process collectives are jax's CPU default, gloo over TCP;
  S       one process with 4 fake CPU devices, its own workdir.
Every host samples its own contiguous half of each global batch and the
gradients are averaged over all 4 devices of both hosts, so the two runs must
train the same model: every checkpoint (params, optimiser state, step, rng)
and every metrics line agree up to float32 summation order.

J alone trains all three networks (coarse, saliency, fine) with random crop
margins and dropout drawn per global sample index, so a host feeding the
wrong shard or a wrong global sample index shows up as a large relative
difference of the optimiser's velocity (the accumulated gradient): tried by
hand, process 1 reading shard 0 gave 2.3x a leaf's scale, global indices
starting at 0 on both hosts 7% (the tolerance is 0.01%). One mode keeps the
cost to one step compilation per process: the file takes about 40-45 s on 2
busy cores.

Each process runs launch/train.py as __main__ (what `python -m` does) behind
an audit hook that records every file it creates, writes, renames or
deletes under the shared workdir, so the test also checks that only process
0 writes the run's shared outputs.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from multiproc import _env, _free_port, _gloo_available, _wait_all

ROOT = Path(__file__).resolve().parents[1]

# Relative tolerance of the multi-host vs single-host comparison, per
# checkpoint leaf: max|a - b| <= RTOL * max|b| (a leaf's largest magnitude is
# its scale; zero leaves must stay exactly zero). Both runs compute the same
# per-device float32 gradients; only the 4-way all-reduce adds them in a
# different order (gloo across processes vs XLA's in-process reduction), an
# error of a few float32 ulp (eps = 1.2e-7) that 2 steps of SGD carry along.
# Measured: at most 2.8e-7 of a leaf's scale (in the velocity). 1e-4 leaves a
# 300x margin for other CPUs and XLA versions, while a wrong data shard or
# sample index changes velocity leaves by 7% to 230% of their scale.
RTOL = 1e-4
STEPS = 2
TIMEOUT_S = 240  # a hung coordinator or collective fails the test, never CI

OVERRIDES = ("--config.data.batch_size=4", f"--config.train.stages=J:{STEPS}",
             "--config.train.log_every=1", "--config.train.checkpoint_every=1")

# Runs launch/train.py as __main__ (as `python -m launch.train` does) after
# installing an audit hook that appends one JSON line [kind, path relative to
# the workdir] to the audit file for every file-system write under the
# workdir: opens for writing, mkdir, rename/replace targets, removals. The log is written with os.write on a descriptor opened before
# the hook, so recording raises no audit event of its own.
DRIVER = r"""
import json, os, runpy, sys
log_path, watch = sys.argv[1], os.path.realpath(sys.argv[2])
sys.argv = ["launch/train.py"] + sys.argv[3:]
fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def record(kind, path):
    if isinstance(path, int):
        return
    path = os.path.realpath(os.fsdecode(path))
    if path == watch or path.startswith(watch + os.sep):
        os.write(fd, (json.dumps([kind, os.path.relpath(path, watch)]) + "\n").encode())

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (mode is not None and any(c in mode for c in "wax+")) or \
                (mode is None and isinstance(flags, int) and flags & WRITE):
            record("write", path)
    elif event in ("os.rename", "os.replace"):
        record("rename", args[1])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        record(event, args[0])

sys.addaudithook(hook)
runpy.run_module("launch.train", run_name="__main__", alter_sys=True)
"""


def _start(workdir: Path, devices: int, audit: Path, *extra: str) -> subprocess.Popen:
    args = [f"--config={ROOT / 'launch/configs/smoke.py'}", f"--workdir={workdir}",
            *OVERRIDES, *extra]
    cmd = [sys.executable, "-c", DRIVER, str(audit), str(workdir), *args]
    with open(audit.with_suffix(".out"), "w") as out:  # the child keeps its own copy
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=out,
                                stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not _gloo_available():
        pytest.skip("this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives), "
                    "so two CPU processes cannot all-reduce")
    base = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    multi = ("--coordinator", f"localhost:{port}", "--num_processes=2")
    t0 = time.monotonic()
    procs = {
        "m0": _start(base / "multi", 2, base / "m0.audit", *multi, "--process_id=0"),
        "m1": _start(base / "multi", 2, base / "m1.audit", *multi, "--process_id=1"),
        "single": _start(base / "single", 4, base / "single.audit"),
    }
    codes = _wait_all(procs, t0 + TIMEOUT_S)
    logs = {n: (base / f"{n}.out").read_text() for n in procs}
    for n in procs:
        assert codes[n] == 0, (
            f"{n} exited with {codes[n]}"
            + (f" (killed: not finished {TIMEOUT_S} s after the start, or a peer failed; a hung "
               "coordinator or collective?)" if codes.get("timeout") else "")
            + "".join(f"\n--- {m} ---\n{logs[m][-2500:]}" for m in procs))
    audits = {n: [tuple(json.loads(l)) for l in (base / f"{n}.audit").read_text().splitlines()]
              for n in procs}
    return {"base": base, "logs": logs, "audits": audits,
            "wall_s": time.monotonic() - t0}


def _checkpoints(run_dir: Path):
    from stnjax.train.checkpoint import Checkpointer
    ck = Checkpointer(run_dir / "checkpoints", keep=1, async_save=False, read_only=True)
    try:
        steps = ck.steps()
        return steps, [ck.restore(i, None) for i in steps]
    finally:
        ck.close()


def _records(run_dir: Path) -> list[dict]:
    volatile = {"examples_per_s", "steps_per_s", "time_s", "compiled"}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k not in volatile} for l in lines]


def test_two_hosts_train_like_one_host_with_all_devices(runs):
    import jax

    m_run = runs["base"] / "multi" / "fold0" / "Z"
    s_run = runs["base"] / "single" / "fold0" / "Z"
    assert "distributed: process 0 of 2, 2 local / 4 global devices" in runs["logs"]["m0"]
    assert "4 device(s), global batch 4" in runs["logs"]["single"]
    m_steps, m_ckpts = _checkpoints(m_run)
    s_steps, s_ckpts = _checkpoints(s_run)
    assert m_steps == s_steps == list(range(1, STEPS + 1))
    worst = 0.0
    for it, ((ms, mm), (ss, sm)) in zip(m_steps, zip(m_ckpts, s_ckpts)):
        assert mm == sm, f"checkpoint {it}: meta differs"
        assert int(ms["step"]) == it
        m_leaves = jax.tree_util.tree_flatten_with_path(ms)[0]
        s_leaves, s_tree = jax.tree_util.tree_flatten(ss)
        assert jax.tree.structure(ms) == s_tree
        for (path, a), b in zip(m_leaves, s_leaves):
            a, b = np.asarray(a), np.asarray(b)
            name = f"checkpoint {it} {jax.tree_util.keystr(path)}"
            assert a.shape == b.shape and a.dtype == b.dtype, name
            if not np.issubdtype(a.dtype, np.floating):  # step, rng key, counts
                np.testing.assert_array_equal(a, b, err_msg=name)
                continue
            diff = float(np.max(np.abs(a.astype(np.float64) - b)))
            scale = float(np.max(np.abs(b)))
            assert diff <= RTOL * scale, f"{name}: max diff {diff:.3g}, scale {scale:.3g}"
            worst = max(worst, diff / scale if scale else 0.0)
    print(f"\nmulti-host vs single-host: max |diff| / leaf scale = {worst:.3g} "
          f"(tolerance {RTOL}); wall {runs['wall_s']:.1f} s")

    m_recs, s_recs = _records(m_run), _records(s_run)
    assert [r["step"] for r in s_recs if r["event"] == "train"] == list(range(1, STEPS + 1))
    assert len(m_recs) == len(s_recs)  # process 1 adds no line of its own
    for mr, sr in zip(m_recs, s_recs):
        assert mr.keys() == sr.keys()
        for k, sv in sr.items():
            if isinstance(sv, float) and k != "lr":
                assert mr[k] == pytest.approx(sv, rel=RTOL), (sr["step"], k)
            else:
                assert mr[k] == sv, (sr["step"], k)
        # 4 real samples per step: both hosts' halves are counted once.
        assert mr["examples"] == 4.0


def test_only_process_0_writes_shared_outputs(runs):
    def top(audit):  # written paths cut to their first part (fold0/Z/<file> for a run's)
        return {"/".join(Path(p).parts[:3 if p.startswith("fold0") else 1])
                for _, p in audit}

    w0, w1 = top(runs["audits"]["m0"]), top(runs["audits"]["m1"])
    shared = {"train.log", "config.json", "versions.json", "fold0/Z/metrics.jsonl",
              "fold0/Z/run.json", "fold0/Z/progress.png"}
    # Process 0 writes the run's outputs and the built-in dataset ...
    assert shared <= w0, shared - w0
    assert any(p.startswith("phantom-") for p in w0)
    # ... process 1 none of them: at most its own slice cache (both hosts
    # fill it, atomically, as hosts without a shared file system must).
    assert not w1 & shared, w1 & shared
    assert not any(p.startswith("phantom-") for p in w1), w1
    assert w1 <= {"cache", "jax_cache"}, w1
    # One train.log, from process 0 only: every progress line appears once.
    log = (runs["base"] / "multi" / "train.log").read_text()
    assert log.count(f"J step {STEPS}/{STEPS}") == 1
    assert f"J step {STEPS}/{STEPS}" not in runs["logs"]["m1"]
