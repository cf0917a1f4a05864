"""Checkpoints, the workdir identity check, the metrics file, the guard's
decision, and input set-up errors (no model compilation here)."""

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest

from launch.configs import smoke
from stnjax.checks import InputError
from stnjax.data.spec import DataSpec, resolve_folds, resolve_planes
from stnjax.train import inputs, workdir
from stnjax.train.spec import LoopSpec
from stnjax.train.checkpoint import CheckpointError, Checkpointer, load_trained_params
from stnjax.train.guard import guard_decision
from stnjax.train.reporting import fmt_duration


def _state(v):
    return {"params": {"coarse": {"c": {"kernel": np.full((2, 3), v, np.float32)}}},
            "step": np.int32(v), "rng": np.array([0, v], np.uint32)}


# Restoring the damaged checkpoint leaves an orbax/tensorstore callback on a
# closed event loop (an unraisable warning from orbax, not from this code).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_interrupted_and_failed_saves_leave_the_latest_complete_checkpoint(tmp_path, caplog):
    from orbax.checkpoint._src.serialization import type_handlers as th
    ck = Checkpointer(tmp_path / "ck", keep=5)
    ck.save(10, _state(1), {"step": 1})
    ck.save(20, _state(2), {"step": 2})
    ck.wait()
    # A write that fails in the background (e.g. a full disk): the error
    # names the folder and the checkpoint that stays usable.
    orig = th.NumpyHandler.serialize

    async def failing(self, *a, **k):
        raise OSError("No space left on device (injected)")

    th.NumpyHandler.serialize = failing
    try:
        with pytest.raises(CheckpointError, match=r"newest complete checkpoint is iteration 20"):
            ck.save(30, _state(3), {"step": 3})
            ck.wait()
    finally:
        th.NumpyHandler.serialize = orig
    assert ck.steps() == [10, 20]
    # What a SIGKILL during a save leaves: a temporary folder, never listed.
    (tmp_path / "ck" / "40.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    ck.close()
    ck = Checkpointer(tmp_path / "ck", keep=5)
    assert ck.steps() == [10, 20]
    it, state, meta = ck.restore_latest(None)
    assert it == 20 and meta == {"step": 2, "iteration": 20}
    np.testing.assert_array_equal(state["params"]["coarse"]["c"]["kernel"], _state(2)["params"]["coarse"]["c"]["kernel"])
    # A damaged newest checkpoint (files lost after it was complete): resume
    # falls back to the previous one, saying why.
    shutil.rmtree(tmp_path / "ck" / "20" / "state" / "d")
    with caplog.at_level(logging.WARNING, logger="stnjax.train"):
        it, state, _ = ck.restore_latest(None)
    assert it == 10 and int(state["step"]) == 1
    assert "checkpoint 20" in caplog.text and "cannot be read" in caplog.text
    # Training goes on after a failed save.
    ck.save(50, _state(5), {"step": 5})
    ck.wait()
    assert 50 in ck.steps()
    ck.close()


def test_load_trained_params_checks_completeness(tmp_path, caplog):
    run = tmp_path / "fold0" / "Z"
    ck = Checkpointer(run / "checkpoints", keep=2)
    ck.save(4, _state(4), {"step": 4, "total_steps": 8, "plane": "Z"})
    ck.close()
    with pytest.raises(InputError, match="not complete"):
        load_trained_params(run)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        params, meta = load_trained_params(run, require_complete=False)
    # A model load is quiet: none of orbax's read-only notices (three a plane).
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
        [r.getMessage() for r in caplog.records]
    assert meta["plane"] == "Z" and params["coarse"]["c"]["kernel"].shape == (2, 3)
    with pytest.raises(InputError, match="no checkpoint folder"):
        load_trained_params(tmp_path / "nothing")


def test_guard_decision_on_synthetic_histories():
    stuck = [0.99, 0.97, 0.96, 0.95, 0.96, 0.97]  # the v1-log failure: coarse ~0.95
    d = guard_decision(stuck, window=4, threshold=0.9)
    assert d.restart and d.n == 4 and d.mean == pytest.approx(np.mean(stuck[-4:]))
    learning = [0.99, 0.9, 0.7, 0.5, 0.45, 0.42]
    assert not guard_decision(learning, window=4, threshold=0.9).restart
    # Only the last `window` steps count: an early plateau does not matter.
    assert not guard_decision([0.99] * 50 + [0.4] * 10, window=10, threshold=0.9).restart
    # Shorter history than the window: all of it; nothing at all: no restart.
    assert guard_decision([0.95, 0.96], window=200, threshold=0.9).n == 2
    assert not guard_decision([], window=200, threshold=0.9).restart
    assert guard_decision([0.5, float("nan")], window=2, threshold=0.9).restart
    assert not guard_decision([0.9], window=1, threshold=0.9).restart  # "above" is strict


def test_workdir_identity_check(tmp_path):
    c = smoke.get_config().to_dict()
    wd = tmp_path / "w"
    workdir.write_workdir_files(wd, c)
    (wd / "fold0" / "Z" / "checkpoints").mkdir(parents=True)
    workdir.check_workdir(wd, c)  # same config: fine
    c2 = smoke.get_config()
    c2.train.log_every = 7  # logging, saving, selection, inference: not identity
    c2.train.checkpoint_every = 3
    c2.data.planes = "XYZ"
    c2.infer.threshold = 0.5
    c2 = c2.to_dict()
    assert workdir.config_hash(c2) == workdir.config_hash(c)
    workdir.check_workdir(wd, c2)
    c3 = smoke.get_config()
    c3.model.width = 0.5
    c3 = c3.to_dict()
    with pytest.raises(InputError, match=r"another config.*model.width: 0.03125 -> 0.5"):
        workdir.check_workdir(wd, c3)
    workdir.check_workdir(wd, c3, overwrite=True)
    assert not (wd / "fold0").exists() and not (wd / "train_config.json").exists()
    rec = json.loads((wd / "versions.json").read_text())
    assert rec["jax"] and rec["local_devices"] == 8


def test_metrics_writer_keep_only_and_torn_lines(tmp_path):
    w = workdir.MetricsWriter(tmp_path / "m.jsonl")
    w.write_many([{"iteration": i, "loss": 1.0 / (i + 1)} for i in range(6)])
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')  # a line cut by a kill
    assert [r["iteration"] for r in w.records()] == list(range(6))
    w.keep_only(lambda r: r["iteration"] <= 3)
    assert [r["iteration"] for r in w.records()] == [0, 1, 2, 3]
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 4


def test_input_resolution_errors():
    assert resolve_planes("zx") == ("X", "Z")
    assert resolve_folds("all", 4) == (0, 1, 2, 3)
    assert resolve_folds("2,0", 4) == (0, 2)
    with pytest.raises(InputError, match="data.planes"):
        resolve_planes("XQ")
    with pytest.raises(InputError, match="data.folds"):
        resolve_folds("4", 4)
    with pytest.raises(InputError, match="data.folds"):
        resolve_folds("one", 4)
    # The same checks when the spec is made from a config, naming the field.
    for field, value, match in (("planes", "XQ", "data.planes"), ("folds", "9", "data.folds"),
                                ("order", "random", "data.order"),
                                ("hu_window", (240.0, -100.0), "data.hu_window")):
        c = smoke.get_config().data.to_dict()
        c[field] = value
        with pytest.raises(InputError, match=match):
            DataSpec.from_config(c)
    t = smoke.get_config().train.to_dict()
    t["log_every"] = 0
    with pytest.raises(InputError, match="train.log_every"):
        LoopSpec.from_config(t)
    # Batch 2 on 8 devices uses 2 (a sample is never split); asked-for counts
    # must divide the batch.
    assert len(inputs.choose_devices(2)) == 2
    assert len(inputs.choose_devices(16)) == 8
    with pytest.raises(InputError, match="train.devices"):
        inputs.choose_devices(6, 4)
    assert fmt_duration(3725) == "1h02m" and fmt_duration(65) == "1m05s"
    assert fmt_duration(float("nan")) == "?"


def test_no_training_slice_for_a_plane_is_a_clear_error(tmp_path):
    c = DataSpec.from_config(smoke.get_config().data)
    far = dataclasses.replace(c, slice_threshold=1e9)  # a pixel count no slice reaches
    ds = inputs.dataset_dir(far, tmp_path)
    store = inputs.open_store(far, ds, tmp_path)
    with pytest.raises(InputError, match=r"no training slice for plane Y in fold 1"):
        inputs.plane_data(far, store, ds, 1, "Y")
    pd = inputs.plane_data(c, store, ds, 1, "Y")
    assert len(pd.slices) > 0
    # Slices index store.case_ids and belong to training cases only.
    ids = [store.case_ids[i] for i in pd.slices[:, 0]]
    assert set(ids) <= set(pd.train_ids)
