"""Pretrained weights: conversion from synthetic state dicts with the real key
names and shapes (no download, no torch), storage, assignment, the launcher."""

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import convert_weights
from stnjax.models import weights
from stnjax.checks import InputError
from stnjax.models.fcn8s import BODY_LAYERS, HEAD_LAYERS, FCN8s, fcn8s_layer_shapes

SMALL = 1 / 16
TV_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def _key(seed):
    return jax.random.key(seed, impl="rbg")


def _torch_shapes(width):
    """{layer: (OIHW weight shape, bias shape)} from our HWIO shapes."""
    out = {}
    for name, ((kh, kw, ci, co), b) in fcn8s_layer_shapes(width).items():
        out[name] = ((co, ci, kh, kw), b)
    return out


def _make(shape, rng):
    if rng is None:  # full size: zero-memory views with the real shapes
        return np.broadcast_to(np.float32(0.5), shape)
    return rng.normal(size=shape).astype(np.float32)


def fcn_state_dict(width=1.0, rng=None):
    """pytorch-fcn FCN8s keys, including the score / upscore keys the reference skips."""
    ts = _torch_shapes(width)
    sd = {}
    for name in BODY_LAYERS + HEAD_LAYERS:
        sd[f"{name}.weight"] = _make(ts[name][0], rng)
        sd[f"{name}.bias"] = _make(ts[name][1], rng)
    for name, k in [("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)]:
        sd[f"{name}.weight"] = _make((21, 21, k, k), rng)  # PASCAL, no bias
    sd["score_fr.weight"] = _make((21,) + ts["score_fr"][0][1:], rng)  # 21 classes
    return sd


def vgg_state_dict(width=1.0, rng=None):
    """torchvision vgg16() keys: features.N, classifier.0 / 3 / 6."""
    ts = _torch_shapes(width)
    convs = [n for n in BODY_LAYERS if n.startswith("conv")]
    sd = {}
    for name, i in zip(convs, TV_INDEX):
        sd[f"features.{i}.weight"] = _make(ts[name][0], rng)
        sd[f"features.{i}.bias"] = _make(ts[name][1], rng)
    fc6, fc7 = ts["fc6"][0], ts["fc7"][0]
    sd["classifier.0.weight"] = _make((fc6[0], math.prod(fc6[1:])), rng)
    sd["classifier.0.bias"] = _make((fc6[0],), rng)
    sd["classifier.3.weight"] = _make(fc7[:2], rng)
    sd["classifier.3.bias"] = _make((fc7[0],), rng)
    sd["classifier.6.weight"] = _make((1000, fc7[0]), rng)
    sd["classifier.6.bias"] = _make((1000,), rng)
    return sd


@pytest.mark.parametrize("make,style", [(fcn_state_dict, "pytorch-fcn"),
                                        (vgg_state_dict, "torchvision-vgg16")])
def test_full_size_conversion_matches_model_shapes(make, style):
    sd = make()
    assert weights.detect_style(list(sd)) == style
    conv = weights.convert_state_dict(sd)  # style "auto"
    params = jax.eval_shape(FCN8s().init, _key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    want = {f"{n}/{p}": v.shape for n, d in params["params"].items() if n in BODY_LAYERS
            for p, v in d.items()}
    assert {k: v.shape for k, v in conv.items()} == want
    assert sum(v.size for v in conv.values()) == 134_275_145 - 12_291 - 1_539 - 771
    assert all(v.dtype == np.float32 for v in conv.values())
    # A full-width model takes it; a width-1/2 model refuses with the shapes named.
    small = jax.eval_shape(FCN8s(width=0.5).init, _key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(InputError, match=r"conv1_1/kernel: pretrained \(3, 3, 3, 64\), model \(3, 3, 3, 32\)"):
        weights.assign_pretrained(small, conv)


def np_corr_oihw(x_nchw, w, b):
    """Valid cross-correlation in PyTorch layout (independent of our HWIO code)."""
    n, c, h, wd = x_nchw.shape
    o, _, kh, kw = w.shape
    out = np.zeros((n, o, h - kh + 1, wd - kw + 1))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", x_nchw[:, :, i:i + out.shape[2], j:j + out.shape[3]],
                             w[:, :, i, j])
    return out + b[None, :, None, None]


def test_converted_kernel_convolves_like_pytorch():
    rng = np.random.default_rng(0)
    sd = fcn_state_dict(SMALL, rng)
    conv = weights.convert_state_dict(sd, style="pytorch-fcn", width=SMALL)
    x = rng.normal(size=(2, 4, 9, 11)).astype(np.float32)  # NCHW, 4 = conv1_2 inputs
    want = np_corr_oihw(x, sd["conv1_2.weight"], sd["conv1_2.bias"])
    got = jax.lax.conv_general_dilated(
        jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(conv["conv1_2/kernel"]), (1, 1),
        "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST) + conv["conv1_2/bias"]
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-5, atol=1e-5)


def test_torchvision_fc6_equals_linear_on_flattened_pool5():
    rng = np.random.default_rng(1)
    sd = vgg_state_dict(SMALL, rng)
    conv = weights.convert_state_dict(sd, width=SMALL)
    assert conv["fc6/kernel"].shape == (7, 7, 32, 256)
    pool5 = rng.normal(size=(2, 32, 7, 7)).astype(np.float32)  # NCHW as torchvision
    linear = pool5.reshape(2, -1) @ sd["classifier.0.weight"].T + sd["classifier.0.bias"]
    got = jax.lax.conv_general_dilated(
        jnp.asarray(pool5.transpose(0, 2, 3, 1)), jnp.asarray(conv["fc6/kernel"]), (1, 1),
        "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST) + conv["fc6/bias"]
    np.testing.assert_allclose(np.asarray(got)[:, 0, 0], linear, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(conv["fc7/kernel"][0, 0], sd["classifier.3.weight"].T)
    np.testing.assert_array_equal(conv["conv3_2/bias"], sd["features.12.bias"])


def test_key_and_shape_errors_are_listed():
    sd = fcn_state_dict(SMALL, np.random.default_rng(2))
    del sd["conv2_1.weight"], sd["fc7.bias"]
    sd["conv9_9.weight"] = np.zeros(3, np.float32)
    sd["fc6.weight"] = np.zeros((256, 32, 3, 3), np.float32)
    with pytest.raises(InputError) as err:
        weights.convert_state_dict(sd, style="pytorch-fcn", width=SMALL)
    msg = str(err.value)
    assert "missing keys: ['conv2_1.weight', 'fc7.bias']" in msg
    assert "unexpected keys: ['conv9_9.weight']" in msg
    assert "fc6.weight: got (256, 32, 3, 3), expected (256, 32, 7, 7)" in msg
    with pytest.raises(InputError, match="cannot tell the style"):
        weights.convert_state_dict({"foo.weight": np.zeros(1)})
    vgg = vgg_state_dict(SMALL, np.random.default_rng(3))
    vgg["features.1.weight"] = np.zeros(1, np.float32)  # e.g. a BN layer of vgg16_bn
    with pytest.raises(InputError, match=r"unexpected keys: \['features.1.weight'\]"):
        weights.convert_state_dict(vgg, width=SMALL)
    full = fcn_state_dict()  # full size against a small width: every shape differs
    with pytest.raises(InputError, match="conv1_1.weight: got"):
        weights.convert_state_dict(full, width=SMALL)
    nan = fcn_state_dict(SMALL, np.random.default_rng(4))
    nan["fc7.bias"][3] = np.nan
    with pytest.raises(InputError, match="fc7.bias holds NaN"):
        weights.convert_state_dict(nan, width=SMALL)


def test_module_prefix_is_stripped():
    sd = {f"module.{k}": v for k, v in fcn_state_dict(SMALL, np.random.default_rng(5)).items()}
    assert len(weights.convert_state_dict(sd, width=SMALL)) == 2 * len(BODY_LAYERS)


def test_save_load_assign_roundtrip(tmp_path):
    rng = np.random.default_rng(6)
    conv = weights.convert_state_dict(fcn_state_dict(SMALL, rng), width=SMALL)
    path = tmp_path / "w" / "fcn.npz"
    digest = weights.save_pretrained(path, conv, {"source": "synthetic"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["fcn.npz", "fcn.npz.sha256"]
    assert (tmp_path / "w" / "fcn.npz.sha256").read_text() == f"{digest}  fcn.npz\n"
    loaded, meta = weights.load_pretrained(path, sha256=digest, with_meta=True)
    assert meta["source"] == "synthetic" and set(loaded) == set(conv)
    for k in conv:
        np.testing.assert_array_equal(loaded[k], conv[k])

    model = FCN8s(width=SMALL, variant="pad32")
    init = jax.jit(model.init)(_key(0), jnp.zeros((1, 32, 32, 3)))
    new = weights.assign_pretrained(init, loaded)
    assert jax.tree.structure(new) == jax.tree.structure(init)
    for name in BODY_LAYERS:
        np.testing.assert_array_equal(np.asarray(new["params"][name]["kernel"]),
                                      conv[f"{name}/kernel"])
    for name in HEAD_LAYERS:  # reference scheme: heads zero, so logits are zero
        assert not np.any(np.asarray(new["params"][name]["kernel"]))
    assert not np.any(np.asarray(jax.jit(model.apply)(new, jnp.ones((1, 32, 32, 3)))))
    # skip_heads=False keeps the model's own (He) heads; the inner tree works too.
    kept = weights.assign_pretrained(init["params"], loaded, skip_heads=False)
    np.testing.assert_array_equal(np.asarray(kept["score_fr"]["kernel"]),
                                  np.asarray(init["params"]["score_fr"]["kernel"]))
    with pytest.raises(InputError, match=r"pretrained lacks \['fc7/bias'\]"):
        weights.assign_pretrained(init, {k: v for k, v in loaded.items() if k != "fc7/bias"})

    with pytest.raises(InputError, match="the sha256 argument"):
        weights.load_pretrained(path, sha256="0" * 64)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt"):
        weights.load_pretrained(path)
    with pytest.raises(FileNotFoundError):
        weights.load_pretrained(tmp_path / "nope.npz")


def test_launcher_converts_npz_state_dict_without_torch(tmp_path):
    sd = vgg_state_dict(SMALL, np.random.default_rng(7))
    src = tmp_path / "vgg16.npz"
    np.savez(src, **sd)
    out = tmp_path / "out.npz"
    digest = convert_weights.convert(src, out, "auto", SMALL)
    arrays, meta = weights.load_pretrained(out, sha256=digest, with_meta=True)
    assert meta["style"] == "torchvision-vgg16"
    assert meta["source_sha256"] == weights.file_sha256(src)
    np.testing.assert_array_equal(arrays["conv5_3/kernel"],
                                  sd["features.28.weight"].transpose(2, 3, 1, 0))
    try:
        import torch  # noqa: F401
    except ImportError:
        pth = tmp_path / "x.pth"
        pth.write_bytes(b"not read")
        with pytest.raises(InputError, match=r"reading .*x\.pth needs PyTorch"):
            convert_weights.read_state_dict(pth)


def _convert_command(*args):
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "launch.convert_weights", *args], cwd=root,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "STNJAX_HUGE_PAGES": "0",
                               "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"})


def test_convert_weights_failures_are_one_line_naming_the_file(tmp_path):
    """A pickled .npz, a damaged .npz, a missing input, a .pth without torch
    (torch is not installed in the project's environment) and an unwritable
    output: one "error:" line naming the file, exit 1, no output written."""
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, a=np.array([{"x": 1}], dtype=object))
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04 not a zip")
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"\x80\x02not a checkpoint")
    good = tmp_path / "good.npz"
    np.savez(good, **vgg_state_dict(SMALL, np.random.default_rng(7)))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    cases = [(pickled, tmp_path / "o1.npz", r"pickled\.npz holds pickled objects"),
             (damaged, tmp_path / "o2.npz", r"damaged\.npz is not a readable \.npz"),
             (tmp_path / "missing.pth", tmp_path / "o3.npz", r"missing\.pth' does not exist"),
             (pth, tmp_path / "o4.npz", r"model\.pth (needs PyTorch|is not a PyTorch state dict)"),
             (good, blocker / "o5.npz", r"/file: is a file, not a folder")]
    for src, out, want in cases:
        r = _convert_command(f"--input={src}", f"--output={out}", f"--width={SMALL}")
        assert r.returncode == 1, (src, r.stderr[-2000:])
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr[-2000:]
        assert re.search(want, r.stderr), r.stderr
        assert not out.exists()
