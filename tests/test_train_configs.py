"""The config files: they load, reject typos, and say what the paper says;
the full-size training step checked with jax.eval_shape (never compiled)."""

import importlib
import json
import time

import jax
import numpy as np
import pytest

from stnjax.checks import InputError
from stnjax.eval.spec import EvalSpec
from stnjax.models.rstn import RSTN
from stnjax.train import state as st
from stnjax.train import steps, workdir
from stnjax.train.spec import TrainSpec
from stnjax.train.schedule import lr_at, parse_stages, total_steps

CONFIGS = ("nih_pancreas", "phantom", "realct", "smoke", "stagewise")


def _config(name):
    return importlib.import_module(f"launch.configs.{name}").get_config()


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load_and_parse(name):
    c = _config(name)
    if name == "realct":  # needs its dataset folder: unset is an error naming it
        with pytest.raises(InputError, match=r"data\.dir: this config needs a dataset folder"):
            EvalSpec.from_config(c)
        c.data.dir = "/data/btcv"
    stages = parse_stages(c.train.stages, c.train.method)
    assert total_steps(stages) > 0
    RSTN.from_config(c.model)
    spec = EvalSpec.from_config(c)  # every section into its typed spec
    assert spec.train.loop.stage_list == stages and spec.train.data.planes
    # The record is the config: the written config.json and the hash see the
    # same fields the user set.
    assert spec.record == json.loads(c.to_json())
    assert spec.train.config_hash == workdir.config_hash(c.to_dict())
    c.lock()
    with pytest.raises(AttributeError, match="base_lr"):
        c.train.base_lrr = 1.0  # a typo names the closest field


def test_nih_pancreas_is_the_reference_setting():
    c = _config("nih_pancreas")
    assert (c.model.width, c.model.variant, c.data.batch_size) == (1.0, "reference", 1)
    assert c.model.init == "pretrained" and c.data.buckets[-1] == 512
    stages = parse_stages(c.train.stages)
    assert [(s.mode, s.length) for s in stages] == [("S", 10000), ("I", 30000), ("J", 40000)]
    # Caffe multistep: 1e-5 until 50K, then 5e-6, 2.5e-6 from 60K, 1.25e-6 from 70K.
    lrs = [lr_at(stages, c.train.base_lr, c.train.j_halving_every, s)
           for s in (49999, 50000, 60000, 79999)]
    np.testing.assert_allclose(lrs, [1e-5, 5e-6, 2.5e-6, 1.25e-6], rtol=1e-6)
    assert tuple(c.train.lr_mult) == (1.0, 2.0, 10.0, 20.0)
    assert (c.train.momentum, c.train.weight_decay) == (0.99, 5e-4)


def test_stagewise_effective_rates_equal_c2f():
    c = _config("stagewise")
    lam, base, m = c.train.coarse_weight, c.train.base_lr, c.train.lr_mult
    # Per network: v <- mom v + base * mult * (lam * g + wd * w)
    #            = mom v + (base * mult * lam) * (g + (wd / lam) * w).
    np.testing.assert_allclose([base * m[0] * lam, base * m[1] * lam], [1e-5, 2e-5])
    np.testing.assert_allclose([base * m[2] * lam, base * m[3] * lam], [1e-4, 2e-4])
    np.testing.assert_allclose(c.train.weight_decay / lam, 5e-4)
    stages = parse_stages(c.train.stages, c.train.method)
    assert [(s.mode, s.length) for s in stages] == [("C", 80000), ("F", 60000)]
    assert steps.MODE_TRAINABLE["C"] == ("coarse",) and steps.MODE_TRAINABLE["F"] == ("fine",)


def test_full_size_joint_step_shapes():
    # bfloat16 compute: params, optimiser state and metrics must stay float32.
    c = _config("nih_pancreas")
    c.model.init = "he"  # shapes only; no weights file
    c.model.dtype = "bfloat16"
    rstn = RSTN.from_config(c.model)
    spec = steps.OptimizerSpec.from_config(c.train)
    params = jax.eval_shape(lambda k: rstn.init_params(k, (32, 32)), st.init_key(0))
    state = jax.eval_shape(lambda p: st.init_train_state(p, spec.optimizer(), 0), params)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    fcn = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["coarse"]))
    assert fcn == 134_275_145 and n == 2 * fcn + sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(params["saliency"]))
    b, h, w = 1, 512, 448  # an X-plane slice of 512 x L, padded to the 448 bucket
    batch = {"image": jax.ShapeDtypeStruct((b, h, w, 3), np.float32),
             "label": jax.ShapeDtypeStruct((b, h, w, 3), np.float32),
             "hw": jax.ShapeDtypeStruct((b, 2), np.int32),
             "weight": jax.ShapeDtypeStruct((b,), np.float32),
             "index": jax.ShapeDtypeStruct((b,), np.int32)}
    step = steps.make_step(rstn, "J", spec.optimizer(), lam=1 / 3, axis_name=None)
    new, metrics = jax.eval_shape(step, state, batch)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    for a, b_ in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        assert a.shape == b_.shape and a.dtype == b_.dtype
    for k, (s_, c_) in metrics.items():
        assert s_.shape == () and s_.dtype == np.float32, k


@pytest.mark.parametrize("section,field,value,match", [
    ("train", "base_lr", -1e-3, "train.base_lr"),
    ("train", "momentum", 1.0, "train.momentum"),
    ("train", "weight_decay", -1.0, "train.weight_decay"),
    ("train", "lr_mult", (1.0, 2.0, -1.0, 1.0), r"train.lr_mult\[2\]"),
    ("train", "j_halving_every", 0, "train.j_halving_every"),
    ("train", "coarse_weight", 1.5, "train.coarse_weight"),
    ("train", "guard_coarse_loss", 2.0, "train.guard_coarse_loss"),
    ("train", "stages", "S:0", "train.stages"),
    ("train", "unroll_rounds", 0, "train.unroll_rounds"),
    ("train", "unroll_rounds", -2, "train.unroll_rounds"),
    ("model", "prob_fixed_margin", 7.0, "model.prob_fixed_margin"),
    ("model", "margin", -2, "model.margin"),
    ("model", "dropout_rate", 1.0, "model.dropout_rate"),
    ("model", "canvases", (0, 32), "model.canvases"),
    ("model", "saliency_kernels", (4,), "kernel_sizes"),
    ("model", "upsampling", "nearest", "model.upsampling"),
    ("data", "batch_size", 0, "data.batch_size"),
    ("data", "buckets", (0,), "data.buckets"),
    ("data", "slice_threshold", 0.0, "data.slice_threshold"),
    ("data", "negatives", -0.5, "data.negatives"),
    ("infer", "lcc_threshold", 2.0, "infer.lcc_threshold"),
    ("infer", "max_rounds", 0, "infer.max_rounds"),
    ("infer", "batch_size", 0, "infer.batch_size"),
    ("infer", "threshold", 0.97, "infer.threshold"),
])
def test_out_of_range_values_fail_when_the_config_is_read(section, field, value, match):
    """Every range is checked when the launcher makes the specs: before any
    work (no jax computation, well under a second), naming the field."""
    c = _config("smoke")
    c[section][field] = value
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=match):
        EvalSpec.from_config(c)
    assert time.perf_counter() - t0 < 1.0


def test_fields_added_later_keep_old_workdirs_identity():
    """A config record from before data.spacing, data.organ_ids,
    data.orientation, model.remat_full_canvas, model.upsampling,
    train.unroll_rounds, data.augment.gain and data.augment.elastic existed
    hashes like today's at their defaults (its checkpoints stay usable);
    setting spacing, several organ ids, the official orientation, the
    stored upsampling, 2 unrolled rounds, a gain or an elastic warp makes
    another identity."""
    rec = json.loads(_config("phantom").to_json())
    rec["train"]["unroll_rounds"] = 1  # the default (phantom.py trains 3)
    old = json.loads(json.dumps(rec))
    for section, field in (("data", "spacing"), ("data", "organ_ids"), ("data", "orientation"),
                           ("model", "remat_full_canvas"), ("model", "upsampling"),
                           ("train", "unroll_rounds")):
        del old[section][field]
    del old["data"]["augment"]["gain"]
    del old["data"]["augment"]["elastic"]
    assert workdir.config_hash(old) == workdir.config_hash(rec)
    rec["model"]["remat_full_canvas"] = False  # speed only: same models
    assert workdir.config_hash(old) == workdir.config_hash(rec)
    for section, field, value in (("data", "spacing", [3.0, 3.0, 3.0]),
                                  ("data", "organ_ids", [1, 2]),
                                  ("data", "orientation", "official"),
                                  ("model", "upsampling", "stored"),
                                  ("train", "unroll_rounds", 2)):
        changed = json.loads(json.dumps(rec))
        changed[section][field] = value
        assert workdir.config_hash(changed) != workdir.config_hash(old), field
    for field, value in (("gain", 0.4), ("elastic", 8.0)):
        changed = json.loads(json.dumps(rec))
        changed["data"]["augment"][field] = value
        assert workdir.config_hash(changed) != workdir.config_hash(old), field


def test_negatives_need_the_cross_entropy_term():
    """Organ-free slices train through the cross-entropy only (their Dice
    terms are 0): data.negatives > 0 with train.bce_weight 0 is an error."""
    c = _config("smoke")
    c.data.negatives = 0.5
    c.train.bce_weight = 0.0
    with pytest.raises(InputError, match=r"data\.negatives.*train\.bce_weight"):
        TrainSpec.from_config(c)
    c.train.bce_weight = 0.5
    assert TrainSpec.from_config(c).data.negatives == 0.5
