"""The official PyTorch RSTN snapshots: import (`launch.convert_weights
--official_rstn`), the stored upsampling, and agreement with the official
forward.

The evidence is `official_ref`, an independent NumPy implementation of the
official model's forward (pad 100, full-channel transposed convolutions,
the Caffe crops, the saliency and the fine round's crop and paste), run on
random state dicts in the official layout at width 1/32 (full-width ones
are 1 GB). Where torch is importable, the official `model.py` itself runs
on the same weights too (skipped otherwise: CI has no torch).
"""

import dataclasses
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import official_ref as ref
from launch import convert_weights as cw
from launch.configs import stored
from stnjax.checks import InputError
from stnjax.eval import runs
from stnjax.eval.spec import EvalSpec
from stnjax.models import weights
from stnjax.models.layers import (StoredUpsampling, bilinear_diagonal, upsample_bilinear,
                                  upsample_transposed)
from stnjax.train import imported, optim
from stnjax.train.spec import TrainSpec

WIDTH = 1 / 32
ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "peer" / "OrganSegRSTN_PyTorch"


def rel_err(got, want):
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def nhwc(x):
    return jnp.asarray(np.asarray(x, np.float32).transpose(0, 2, 3, 1))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An official-layout snapshot (width 1/32) converted into a workdir and
    loaded back as `launch.evaluate` loads a trained run."""
    tmp = tmp_path_factory.mktemp("official")
    sd = ref.random_state_dict(WIDTH, seed=1)
    path = tmp / "FD0:ZJ3_1_20180822_204202.npz"
    np.savez(path, **sd)
    prov = cw.convert_official(path, tmp / "w", "Z", 0, data_dir=str(tmp / "data"))
    spec = TrainSpec.from_config(stored.get_config(str(tmp / "w")))
    params = runs.load_models(spec, tmp / "w", 0, "Z")["Z"]
    return dict(sd=sd, path=path, workdir=tmp / "w", prov=prov, spec=spec, params=params)


def test_upsample_transposed_is_pytorch_conv_transpose():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 7))
    for k, s, crop in ((4, 2, (0, 0, 0, 0)), (16, 8, (31, 2, 31, 9)), (4, 2, (1, 1, 1, 1))):
        w = rng.normal(size=(3, 3, k, k))  # PyTorch (in, out, k, k)
        full = ref.conv_transpose(x, w, s)
        want = full[:, :, crop[0]:full.shape[2] - crop[1], crop[2]:full.shape[3] - crop[3]]
        got = upsample_transposed(nhwc(x), jnp.asarray(w.transpose(2, 3, 0, 1), jnp.float32),
                                  s, crop)
        assert rel_err(nchw(got), want) < 1e-6
        # The bilinear diagonal is Caffe's per-channel layer.
        diag = upsample_transposed(nhwc(x), jnp.asarray(bilinear_diagonal(k, 3)), s, crop)
        assert rel_err(diag, upsample_bilinear(nhwc(x), k, s, crop)) < 1e-6
    with pytest.raises(InputError, match=r"upsample_transposed: crop \(40, 0, 0, 0\)"):
        upsample_transposed(nhwc(x), jnp.zeros((4, 4, 3, 3)), 2, (40, 0, 0, 0))
    with pytest.raises(InputError, match="kernel"):
        upsample_transposed(nhwc(x), jnp.zeros((4, 4, 2, 3)), 2)


def test_convert_records_provenance_and_config(converted):
    prov, w = converted["prov"], converted["workdir"]
    assert prov["written"] and prov["keys_mapped"] == 82 and prov["stage"] == "J"
    assert prov["source_sha256"] == weights.file_sha256(converted["path"])
    on_disk = json.loads((w / "fold0" / "Z" / "provenance.json").read_text())
    assert on_disk["source_sha256"] == prov["source_sha256"]
    assert on_disk["params_sha256"] == prov["params_sha256"]
    config = json.loads((w / "config.json").read_text())
    assert config["model"]["upsampling"] == "stored" and config["model"]["variant"] == "reference"
    assert config["data"]["planes"] == "Z" and config["data"]["dir"].endswith("data")
    # The official storage order is the workdir's: evaluate / segment read it there.
    assert config["data"]["orientation"] == "official" and prov["orientation"] == "official"
    assert json.loads((w / "train_config.json").read_text())["fields"][
        "data.orientation"] == "official"
    # What launch.evaluate / launch.segment make of the workdir: the models' spec,
    # and the same params load_models gave the fixture (a complete run of this config).
    spec = EvalSpec.from_config(stored.get_config(str(w)))
    assert spec.inference.planes == ("Z",) and spec.train.data.orientation == "official"
    assert spec.train.config_hash == converted["spec"].config_hash
    # The upsampling kernels are the snapshot's, off-diagonal values included.
    up8 = converted["params"]["fine"]["upscore8"]["kernel"]
    np.testing.assert_array_equal(up8, converted["sd"]["fine_model.upscore8.weight"]
                                  .transpose(2, 3, 0, 1))
    assert np.abs(up8[:, :, 0, 1]).max() > 0


def test_coarse_matches_numpy_official_forward_padded_too(converted):
    """Coarse logits (stored upsampling) against the NumPy official forward,
    and the valid_hw rule: a padded batch gives the exact-size results."""
    sd, spec, params = converted["sd"], converted["spec"], converted["params"]
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(2, 3, 30, 38)).astype(np.float32)
    want = ref.fcn8s(sd, "coarse_model", x)
    assert want.std() > 0.05  # a live network, not a constant map
    logits = jax.jit(spec.model.fcn_logits)  # jitted: faster to compile than op by op
    got = logits(params["coarse"], nhwc(x))
    assert rel_err(nchw(got), want) < 1e-5
    # Caffe's bilinear upsampling on the same weights is far off (the 20 %).
    caffe = dataclasses.replace(spec.model, fcn=spec.model.fcn.clone(upsampling="bilinear"))
    no_up = {k: v for k, v in params["coarse"].items() if not k.startswith("upscore")}
    assert rel_err(nchw(jax.jit(caffe.fcn_logits)(no_up, nhwc(x))), want) > 1e-2
    padded = np.zeros((2, 3, 41, 44), np.float32)
    padded[:, :, :30, :38] = x
    padded[1, :, 25:] = 7.0  # content beyond the real size of sample 1
    padded[1, :, :, 33:] = -3.0
    hw = jnp.asarray([[30, 38], [25, 33]], jnp.int32)
    got = nchw(logits(params["coarse"], nhwc(padded), valid_hw=hw))
    assert rel_err(got[:1, :, :30, :38], want[:1]) < 1e-5
    want1 = ref.fcn8s(sd, "coarse_model", x[1:, :, :25, :33])
    assert rel_err(got[1:, :, :25, :33], want1) < 1e-5
    assert not got[1, :, 25:].any() and not got[1, :, :, 33:].any()


def test_fine_round_matches_numpy_official(converted):
    """One coarse-to-fine round: saliency of the coarse map, crop by the
    mask's box (margin 20), fine FCN with the stored upsampling, paste."""
    sd, spec, params = converted["sd"], converted["spec"], converted["params"]
    rng = np.random.default_rng(3)
    image = rng.uniform(size=(2, 3, 60, 66)).astype(np.float32)
    score = ref.coarse_prob(sd, image).astype(np.float32)
    mask = np.zeros_like(image)
    mask[0, 1, 30:34, 12:20] = 1.0  # box rows 10..54, cols 0..40
    mask[1, 2, 50:55, 55:60] = 1.0  # box rows 30..60, cols 35..66
    got, _ = jax.jit(spec.model.fine_round)(params, nhwc(image), nhwc(score), nhwc(mask))
    got = nchw(got)
    for i in range(2):
        want = ref.fine_round(sd, image[i:i + 1], score[i:i + 1], mask[i:i + 1], margin=20)
        inside = want > 0
        assert inside.sum() < want.size  # a real crop, zero outside it
        assert np.array_equal(got[i:i + 1] > 0, inside)
        logit = lambda p: np.log(p[inside]) - np.log1p(-p[inside])  # noqa: E731
        assert rel_err(logit(got[i:i + 1].astype(np.float64)), logit(want)) < 1e-5


def test_training_forward_exact_and_upsampling_frozen(converted):
    """Under differentiation (the training forward: `conv.conv2d`'s own
    forward rule) the logits still match; the upsampling kernels get no
    gradient, and the optimiser leaves them as they are (weight decay too)."""
    sd, spec, params = converted["sd"], converted["spec"], converted["params"]
    x = np.random.default_rng(4).uniform(size=(1, 3, 24, 28)).astype(np.float32)
    net = jax.tree.map(jnp.asarray, params["fine"])
    # The primal output of jax.vjp runs the custom_vjp forward rules (im2col
    # for conv1_1 and fc6), which is what a training step computes.
    train_fwd = jax.jit(lambda p: jax.vjp(lambda q: spec.model.fcn_logits(q, nhwc(x)), p)[0])
    assert rel_err(nchw(train_fwd(net)), ref.fcn8s(sd, "fine_model", x)) < 1e-5
    up = StoredUpsampling(4, 2, (1, 0, 1, 0))
    y = jnp.asarray(np.random.default_rng(5).normal(size=(1, 3, 4, 3)), jnp.float32)
    v = {"params": {"kernel": net["upscore2"]["kernel"]}}
    g_v, g_y = jax.grad(lambda v, y: jnp.sum(up.apply(v, y) ** 2), argnums=(0, 1))(v, y)
    assert not np.asarray(g_v["params"]["kernel"]).any() and np.abs(g_y).max() > 0
    tree = {"coarse": net, "saliency": params["saliency"], "fine": net}
    tx = optim.caffe_sgd(lambda c: jnp.float32(1e-2), weight_decay=0.5)
    ones = jax.tree.map(jnp.ones_like, tree)
    new = optax.apply_updates(tree, tx.update(ones, tx.init(tree), tree)[0])
    for n in ("coarse", "fine"):
        for layer in ("upscore2", "upscore_pool4", "upscore8"):
            np.testing.assert_array_equal(new[n][layer]["kernel"], net[layer]["kernel"])
        assert not np.array_equal(new[n]["score_fr"]["kernel"], net["score_fr"]["kernel"])


def test_module_prefix_and_the_full_width_key_map():
    sd = ref.random_state_dict(WIDTH, seed=5)
    plain = weights.convert_official_rstn(sd, width=WIDTH)
    prefixed = weights.convert_official_rstn({f"module.{k}": v for k, v in sd.items()},
                                             width=WIDTH)
    jax.tree.map(np.testing.assert_array_equal, plain, prefixed)
    assert weights.official_width({f"module.{k}": v for k, v in sd.items()}) == WIDTH
    # Width 1 (the released files): the official keys and shapes cover the
    # model of the official_rstn config exactly (shapes only: no 1 GB arrays).
    want = imported.expected_shapes(cw.official_spec(1.0, None))
    keys = weights._official_keys(1.0)
    assert {k: v[1] for k, v in keys.items()} == ref.official_shapes(1.0)
    got = {}
    for (net, layer, part), shape, kind in keys.values():
        perm = {"conv": (2, 3, 1, 0), "transposed": (2, 3, 0, 1), "bias": (0,)}[kind]
        got.setdefault(net, {}).setdefault(layer, {})[part] = tuple(shape[i] for i in perm)
    assert got == want
    n = sum(int(np.prod(s)) for s in ref.official_shapes(1.0).values())
    assert n == 2 * (134_275_145 + 2_592) + 312


def test_another_architecture_is_refused_listing_keys():
    sd = ref.random_state_dict(WIDTH, seed=6)
    del sd["fine_model.upscore8.weight"]
    sd["fine_model.bn1.running_mean"] = np.zeros(3, np.float32)
    sd["saliency2.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    with pytest.raises(InputError) as e:
        weights.convert_official_rstn(sd, width=WIDTH, where="snap.pkl")
    msg = str(e.value)
    assert msg.startswith("snap.pkl") and "missing keys (1): ['fine_model.upscore8.weight']" in msg
    assert "unexpected keys (1): ['fine_model.bn1.running_mean']" in msg
    assert "saliency2.weight: got (3, 3, 3, 3), expected (3, 3, 5, 5)" in msg
    # The PASCAL FCN-8s (pytorch-fcn keys) is not an RSTN snapshot ...
    fcn = {k.removeprefix("coarse_model."): v for k, v in ref.random_state_dict(WIDTH).items()
           if k.startswith("coarse_model.")}
    with pytest.raises(InputError, match="missing keys .*coarse_model.conv1_1.weight"):
        weights.convert_official_rstn(fcn, width=WIDTH)
    # ... and still converts as before on its own path.
    body = weights.convert_state_dict(fcn, width=WIDTH)
    np.testing.assert_array_equal(body["conv1_1/kernel"],
                                  fcn["conv1_1.weight"].transpose(2, 3, 1, 0))


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def test_workdir_plane_and_name_refusals(converted, tmp_path):
    w, path = converted["workdir"], converted["path"]
    data = json.loads((w / "config.json").read_text())["data"]["dir"]
    before = _listing(w)
    again = cw.convert_official(path, w, "Z", 0, data_dir=data)
    assert again["written"] is False and _listing(w) == before
    other = tmp_path / "other.npz"
    np.savez(other, **ref.random_state_dict(WIDTH, seed=7))
    with pytest.raises(InputError, match="already holds the import of 'FD0:ZJ3_1_.*--overwrite"):
        cw.convert_official(other, w, "Z", 0, data_dir=data)
    copy = tmp_path / "copy.npz"
    copy.write_bytes(path.read_bytes())
    with pytest.raises(InputError, match="already holds this file"):
        cw.convert_official(copy, w, "X", 0, data_dir=data)
    named = tmp_path / "FD0:XJ3_1_20180822_204202.npz"
    named.write_bytes(other.read_bytes())
    with pytest.raises(InputError, match="fold 0 plane X, but --fold=0 --plane=Y"):
        cw.convert_official(named, w, "Y", 0, data_dir=data)
    with pytest.raises(InputError, match="--plane must be X, Y or Z"):
        cw.convert_official(other, w, "A", 0, data_dir=data)
    with pytest.raises(InputError, match="holds checkpoints of another config"):
        cw.convert_official(other, w, "X", 0, data_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(InputError, match="another config.*data.orientation: 'official' -> "):
        cw.convert_official(other, w, "X", 0, data_dir=data, orientation="canonical")
    with pytest.raises(InputError, match="data.orientation: expected one of .* 'PLS'"):
        cw.convert_official(other, w, "X", 0, data_dir=data, orientation="PLS")
    assert _listing(w) == before  # every refusal before anything was written
    # A second plane joins the workdir; --overwrite replaces a plane's model.
    w2 = tmp_path / "w2"
    cw.convert_official(path, w2, "Z", 0, data_dir=data)
    assert cw.convert_official(named, w2, "X", 0, data_dir=data)["written"]
    assert json.loads((w2 / "config.json").read_text())["data"]["planes"] == "XZ"
    third = tmp_path / "third.npz"
    np.savez(third, **ref.random_state_dict(WIDTH, seed=11))
    assert cw.convert_official(third, w2, "Z", 0, data_dir=data, overwrite=True)["written"]
    prov = json.loads((w2 / "fold0" / "Z" / "provenance.json").read_text())
    assert prov["source"] == "third.npz"
    # The orientation is overridden at conversion (--orientation), into the config.
    w3 = tmp_path / "w3"
    assert cw.convert_official(path, w3, "Z", 0, data_dir=data, orientation="canonical")[
        "orientation"] == "canonical"
    spec = EvalSpec.from_config(stored.get_config(str(w3)))
    assert spec.train.data.orientation == "canonical"
    assert set(runs.load_models(spec.train, w3, 0, ("Z",))) == {"Z"}


class _Payload:
    """A pickle that would run code when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unreadable_and_foreign_files_are_refused(tmp_path):
    w = tmp_path / "w"
    trunc = tmp_path / "snap.npz"
    np.savez(trunc, **ref.random_state_dict(WIDTH))
    trunc.write_bytes(trunc.read_bytes()[:5000])
    with pytest.raises(InputError, match="snap.npz is not a readable .npz"):
        cw.convert_official(trunc, w, "Z", 0)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"coarse_model.conv1_1.weight": _Payload(marker)}))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    for f in (evil, text):
        with pytest.raises(InputError, match=f"{f.name}.*(needs PyTorch|not a PyTorch state "
                                             "dict torch can load safely)"):
            cw.convert_official(f, w, "Z", 0)
    with pytest.raises(InputError, match="does not exist"):
        cw.convert_official(tmp_path / "missing.pkl", w, "Z", 0)
    assert not marker.exists() and not w.exists()


def test_command_line_refusal_and_import(tmp_path):
    sd = ref.random_state_dict(WIDTH, seed=8)
    bad = dict(sd)
    del bad["saliency1.bias"]
    np.savez(tmp_path / "bad.npz", **bad)
    np.savez(tmp_path / "good.npz", **sd)
    env = dict(os.environ, STNJAX_HUGE_PAGES="0", PYTHONPATH=str(ROOT))

    def run(f):
        return subprocess.run(
            [sys.executable, "-m", "launch.convert_weights", f"--official_rstn={f}",
             "--plane=Y", f"--workdir={tmp_path / 'w'}", f"--data_dir={tmp_path}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    r = run(tmp_path / "bad.npz")
    assert r.returncode != 0 and "bad.npz" in r.stderr and "saliency1.bias" in r.stderr, r.stderr
    assert not (tmp_path / "w").exists()
    r = run(tmp_path / "good.npz")
    assert r.returncode == 0 and "plane Y from good.npz" in r.stdout, r.stderr
    spec = TrainSpec.from_config(stored.get_config(str(tmp_path / "w")))
    assert spec.data.orientation == "official"  # the default of --official_rstn
    params = runs.load_models(spec, tmp_path / "w", 0, "Y")["Y"]
    np.testing.assert_array_equal(params["saliency"]["saliency2"]["kernel"],
                                  sd["saliency2.weight"].transpose(2, 3, 1, 0))


def _official_module(torch, monkeypatch):
    """The official model.py from the shared folder, `.cuda()` a no-op."""
    model_py = OFFICIAL / "OrganSegRSTN" / "model.py"
    if not model_py.is_file():
        pytest.skip(f"no official code at {model_py}")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self, raising=False)
    spec = importlib.util.spec_from_file_location("official_rstn_model", model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _narrow_official(torch, module, sd):
    """The official RSTN with its convolutions replaced by narrow ones of the
    state dict's shapes (the forward code is the official one), weights loaded."""
    model = module.RSTN(crop_margin=20, TEST="C")
    for key, shape in ref.official_shapes(WIDTH).items():
        net, name, part = key.rsplit(".", 2) if key.count(".") == 2 else ("", *key.split("."))
        if part != "weight" or name.startswith("upscore") or not net:
            continue
        pad = 100 if name == "conv1_1" else (1 if shape[-1] == 3 else 0)
        setattr(getattr(model, net), name, torch.nn.Conv2d(shape[1], shape[0], shape[-1],
                                                           padding=pad))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return model.eval()


def test_official_pytorch_model_agrees(tmp_path, monkeypatch):
    """Optional (needs torch in this Python): the official model.py on the same
    random weights, saved with torch.save (DataParallel prefix), imported
    through torch.load(weights_only=True), coarse and one fine round."""
    torch = pytest.importorskip("torch")
    module = _official_module(torch, monkeypatch)
    sd = ref.random_state_dict(WIDTH, seed=9)
    model = _narrow_official(torch, module, sd)
    path = tmp_path / "FD0:XJ3_1_20180822_204202.pkl"
    # The legacy (pre-1.6, non-zip) format the released PyTorch 0.4 files have.
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path,
               _use_new_zipfile_serialization=False)
    cw.convert_official(path, tmp_path / "w", "X", 0, data_dir=str(tmp_path))
    spec = TrainSpec.from_config(stored.get_config(str(tmp_path / "w")))
    params = runs.load_models(spec, tmp_path / "w", 0, "X")["X"]
    rng = np.random.default_rng(10)
    image = rng.uniform(size=(1, 3, 50, 54)).astype(np.float32)
    with torch.no_grad():
        coarse = model(torch.from_numpy(image)).numpy()
        got = jax.jit(spec.model.coarse_prob)(params, nhwc(image))
        assert rel_err(nchw(got), coarse) < 1e-5
        mask = np.zeros_like(image)
        mask[0, 0, 35:40, 30:34] = 1.0
        model.TEST = "F"
        fine = model(torch.from_numpy(image), score=torch.from_numpy(coarse),
                     mask=torch.from_numpy(mask)).numpy()
    got, _ = jax.jit(spec.model.fine_round)(params, nhwc(image), nhwc(coarse), nhwc(mask))
    inside = fine > 1e-6
    assert np.array_equal(nchw(got) > 0, inside) and inside.sum() < inside.size
    assert rel_err(nchw(got)[inside], fine[inside]) < 1e-5
    # Torch files that are not state dicts: a whole pickled module (its classes
    # are code: weights_only refuses it) and a list of tensors.
    torch.save(torch.nn.Conv2d(3, 3, 1), tmp_path / "module.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    (tmp_path / "cut.pkl").write_bytes(path.read_bytes()[:20000])  # a truncated snapshot
    for name, why in (("module.pth", "torch can load safely"), ("list.pth", "holds a list"),
                      ("cut.pkl", "torch can load safely")):
        with pytest.raises(InputError, match=f"{name}.*{why}"):
            cw.convert_official(tmp_path / name, tmp_path / "w2", "X", 0)
    assert not (tmp_path / "w2").exists()
