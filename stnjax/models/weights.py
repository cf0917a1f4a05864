"""Pretrained FCN-8s / VGG16 weights: conversion, storage and assignment.

The reference (section 2.2) starts both FCNs of the RSTN from the PASCAL
FCN-8s (`fcn8s_from_caffe.pth`, wkentaro/pytorch-fcn key names) and skips
every key containing "score" (score heads and the upsampling layers), so the
heads start at zero. Lesson 11: the converted checkpoint is ours, with shape
checks and a checksum. This module needs no torch:

* `convert_state_dict` maps a PyTorch state dict given as NumPy arrays
  (OIHW kernels) to our flat FCN8s param paths ("conv1_1/kernel" HWIO,
  "conv1_1/bias", ..., "fc6/kernel" (7, 7, 512, 4096), "fc7/kernel"
  (1, 1, 4096, 4096)), checking key coverage and shapes.
* `save_pretrained` / `load_pretrained` store that dict as .npz with a
  content checksum inside and a sha256 file beside it.
* `assign_pretrained` puts it into FCN8s params with zero heads; the RSTN
  calls it once for the coarse and once for the fine network.
* `convert_official_rstn` maps a whole trained RSTN of the official PyTorch
  code (`coarse_model.*`, `fine_model.*`, `saliency1.*`, `saliency2.*`,
  DataParallel's "module." stripped) to stnjax RSTN params, score heads and
  the three upsampling kernels per network included (for
  `FCN8s(upsampling="stored")`); `stnjax.train.imported` writes them as a
  finished run.

Reading the .pth file itself (torch.load) lives in launch/convert_weights.py.
Note: the PASCAL weights expect mean-subtracted 0-255 BGR input; the
reference feeds [0, 1] CT windows unchanged, and so do we.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from stnjax import fileio
from stnjax.checks import InputError
from stnjax.models.fcn8s import (BODY_LAYERS, HEAD_LAYERS, fcn8s_layer_shapes,
                                 upsampling_shapes)

STYLES = ("auto", "pytorch-fcn", "torchvision-vgg16")
# Indices of the 13 convs in torchvision's vgg16().features (ReLU / pool between).
TORCHVISION_CONV_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
META_KEY = "__meta__"
FORMAT = "stnjax-fcn8s-pretrained-v1"


def _raise_problems(where: str, problems: list) -> None:
    """Raises one InputError listing every problem found, so a single run
    shows all of them. `problems` holds a message per check, or a falsy
    value (an empty list of offending keys) where the check passed."""
    found = [p for p in problems if p]
    if found:
        raise InputError(f"{where}: " + " | ".join(found))


def _torch_shape(hwio: tuple[int, ...]) -> tuple[int, ...]:
    kh, kw, cin, cout = hwio
    return (cout, cin, kh, kw)


def _source_keys(style: str, width: float) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """{source key: (our layer, 'kernel' | 'bias', expected source shape)}."""
    shapes = fcn8s_layer_shapes(width)
    out: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    convs = [name for name in BODY_LAYERS if name.startswith("conv")]
    if style == "pytorch-fcn":
        sources = {name: name for name in BODY_LAYERS}
    else:
        sources = {name: f"features.{i}" for name, i in zip(convs, TORCHVISION_CONV_INDEX)}
        sources.update(fc6="classifier.0", fc7="classifier.3")
    for name, src in sources.items():
        kshape, bshape = shapes[name]
        wshape = _torch_shape(kshape)
        if style == "torchvision-vgg16" and name in ("fc6", "fc7"):
            wshape = (wshape[0], int(np.prod(wshape[1:])))  # nn.Linear (out, C*H*W)
        out[f"{src}.weight"] = (name, "kernel", wshape)
        out[f"{src}.bias"] = (name, "bias", bshape)
    return out


def _skipped(style: str, key: str) -> bool:
    if style == "pytorch-fcn":
        return "score" in key  # the reference's rule: heads and upscore* layers
    return key.startswith("classifier.6.")  # the 1000-class ImageNet layer


def detect_style(keys: list[str]) -> str:
    """'pytorch-fcn' or 'torchvision-vgg16' from the key names; InputError if neither."""
    if "conv1_1.weight" in keys:
        return "pytorch-fcn"
    if any(k.startswith("features.") for k in keys):
        return "torchvision-vgg16"
    raise InputError(
        "convert_state_dict: cannot tell the style: no 'conv1_1.weight' "
        f"(pytorch-fcn) and no 'features.N' keys (torchvision); first keys: {keys[:8]}")


def convert_state_dict(state_dict: Mapping[str, Any], *, style: str = "auto",
                       width: float = 1.0) -> dict[str, np.ndarray]:
    """Maps a PyTorch FCN-8s or VGG16 state dict to our FCN8s body params.

    Args:
      state_dict: {key: array} with PyTorch layouts (conv OIHW, linear
        (out, in)), as NumPy arrays; a common "module." prefix is stripped.
      style: "pytorch-fcn" (conv1_1.weight ... fc7.bias; keys containing
        "score", i.e. score_* and upscore*, are skipped as in the reference),
        "torchvision-vgg16" (features.N for the 13 convs; classifier.0 (4096,
        25088) becomes fc6 by reshaping to (4096, 512, 7, 7): torchvision
        flattens pool5 as C, H, W; classifier.3 becomes fc7; classifier.6 is
        skipped), or "auto" (detected from the keys).
      width: FCN8s width multiplier the shapes are checked against (1.0 for
        real checkpoints; smaller widths are for tests).

    Returns:
      {"<layer>/kernel": (kh, kw, in, out) float32, "<layer>/bias": (out,)
      float32} for the 13 VGG convs, fc6 and fc7 (no heads).

    Raises:
      InputError listing every missing key, unexpected key and shape mismatch.
    """
    if style not in STYLES:
        raise InputError(f"convert_state_dict: style must be one of {STYLES}, got {style!r}")
    sd = strip_module_prefix(state_dict)
    if style == "auto":
        style = detect_style(list(sd))
    expected = _source_keys(style, width)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not _skipped(style, k)]
    bad_shape = []
    for key, (_, _, shape) in expected.items():
        if key in sd and tuple(np.shape(sd[key])) != shape:
            bad_shape.append(f"{key}: got {tuple(np.shape(sd[key]))}, expected {shape}")
    _raise_problems(f"convert_state_dict ({style}, width {width})", [
        missing and f"missing keys: {missing}",
        unexpected and f"unexpected keys: {unexpected}",
        bad_shape and "shape mismatches: " + "; ".join(bad_shape)])

    shapes = fcn8s_layer_shapes(width)
    out: dict[str, np.ndarray] = {}
    for key, (name, part, _) in expected.items():
        a = np.asarray(sd[key], dtype=np.float32)
        if not np.all(np.isfinite(a)):
            raise InputError(f"convert_state_dict: {key} holds NaN or infinite values")
        if part == "kernel":
            a = a.reshape(_torch_shape(shapes[name][0])).transpose(2, 3, 1, 0)  # OIHW -> HWIO
        out[f"{name}/{part}"] = a
    return out


def content_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over sorted (key, dtype, shape, C-order bytes): layout-independent."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def save_pretrained(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                    meta: Mapping[str, Any] | None = None) -> str:
    """Writes converted weights to `path` (.npz) atomically, with checksums.

    The file holds the arrays plus a JSON meta record (`meta`, the format
    name and the sha256 of the arrays' contents, verified by
    `load_pretrained`). A file `<path>.sha256` ("<hex>  <name>", the
    `sha256sum -c` format) records the sha256 of the .npz bytes.

    Args:
      path: output file name, ending in .npz.
      arrays: {name: float array}, e.g. from `convert_state_dict`.
      meta: JSON-serialisable extra information (source file, its sha256, style).

    Returns:
      The sha256 hex digest of the written .npz file.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"save_pretrained: path must end in .npz, got {str(path)!r}")
    if META_KEY in arrays:
        raise InputError(f"save_pretrained: {META_KEY!r} is a reserved array name")
    arrs = {k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}
    record = dict(meta or {})
    record.update(format=FORMAT, content_sha256=content_sha256(arrs))
    blob = np.frombuffer(json.dumps(record, sort_keys=True).encode(), dtype=np.uint8)
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrs, **{META_KEY: blob})  # a file object: savez would add ".npz"
    digest = file_sha256(path)
    side = path.with_name(path.name + ".sha256")
    fileio.atomic_write_text(side, f"{digest}  {path.name}\n")
    return digest


def load_pretrained(path: str | os.PathLike, *, sha256: str | None = None,
                    with_meta: bool = False):
    """Reads a file written by `save_pretrained` and verifies its checksums.

    Args:
      path: the .npz file.
      sha256: expected sha256 of the file bytes (optional). The sidecar
        `<path>.sha256`, when present, is always checked.
      with_meta: also return the meta record.

    Returns:
      {name: np.ndarray}, or ({name: np.ndarray}, meta dict) with `with_meta`.

    Raises:
      FileNotFoundError; InputError on a checksum mismatch or a foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_pretrained: no such file {str(path)!r}")
    side = path.with_name(path.name + ".sha256")
    expected = [(sha256, "the sha256 argument")] if sha256 else []
    if side.is_file():
        expected.append((side.read_text().split()[0], str(side)))
    if expected:
        digest = file_sha256(path)
        for want, where in expected:
            if digest != want.lower():
                raise InputError(
                    f"load_pretrained: {str(path)!r} has sha256 {digest}, but {where} "
                    f"says {want}: the file is corrupt or was replaced")
    with np.load(path, allow_pickle=False) as data:
        if META_KEY not in data.files:
            raise InputError(f"load_pretrained: {str(path)!r} was not written by save_pretrained "
                             f"(no {META_KEY!r} record)")
        meta = json.loads(data[META_KEY].tobytes().decode())
        arrays = {k: data[k] for k in data.files if k != META_KEY}
    if meta.get("format") != FORMAT:
        raise InputError(f"load_pretrained: {str(path)!r} has format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}")
    if content_sha256(arrays) != meta.get("content_sha256"):
        raise InputError(f"load_pretrained: {str(path)!r}: array contents do not match "
                         "the recorded checksum")
    return (arrays, meta) if with_meta else arrays


def assign_pretrained(fcn_params: Mapping[str, Any], pretrained: Mapping[str, np.ndarray],
                      *, skip_heads: bool = True) -> dict:
    """New FCN8s params with the body from `pretrained` (the reference's scheme).

    Args:
      fcn_params: FCN8s params, either {'params': {layer: {...}}} as from
        `init`, or the inner {layer: {'kernel', 'bias'}} tree. Not modified.
      pretrained: flat {"<layer>/kernel" | "<layer>/bias": array} from
        `convert_state_dict` / `load_pretrained`; must cover the 15 body layers.
      skip_heads: True (reference): the score heads become zero and any head
        arrays in `pretrained` are ignored. False: heads are copied from
        `pretrained` where present, else kept from `fcn_params`.

    Returns:
      A params tree of the same structure, float32 jnp arrays.

    Raises:
      InputError listing missing / unknown layers and shape mismatches (a
      width != 1 network cannot take full-size weights).
    """
    wrapped = "params" in fcn_params and len(fcn_params) == 1
    tree = fcn_params["params"] if wrapped else fcn_params
    missing = [f"{n}/{p}" for n in BODY_LAYERS for p in ("kernel", "bias")
               if f"{n}/{p}" not in pretrained]
    unknown, bad = [], []
    for key, a in pretrained.items():
        name, _, part = key.partition("/")
        if name not in tree or part not in tree[name]:
            unknown.append(key)
        elif tuple(np.shape(a)) != tuple(tree[name][part].shape):
            bad.append(f"{key}: pretrained {tuple(np.shape(a))}, model "
                       f"{tuple(tree[name][part].shape)}")
    _raise_problems("assign_pretrained", [
        missing and f"pretrained lacks {missing}",
        unknown and f"not in the model: {unknown}",
        bad and "shape mismatches (a width != 1 model cannot take full-size weights): "
        + "; ".join(bad)])

    new = {}
    for name, layer in tree.items():
        new[name] = {}
        for part, value in layer.items():
            key = f"{name}/{part}"
            if name in HEAD_LAYERS and skip_heads:
                new[name][part] = jnp.zeros(value.shape, jnp.float32)
            elif key in pretrained:
                new[name][part] = jnp.asarray(pretrained[key], jnp.float32)
            else:
                new[name][part] = value
    return {"params": new} if wrapped else new


# ----------------------------------------------------- official RSTN snapshots
# The official PyTorch RSTN (`torch.save(RSTN_model.state_dict())`): two
# FCN8s under these prefixes, the saliency convolutions at the top level.
OFFICIAL_NETS = {"coarse_model": "coarse", "fine_model": "fine"}
OFFICIAL_SALIENCY = ("saliency1", "saliency2")
SALIENCY_KERNELS = (3, 5)  # the official saliency: 3 x 3, ReLU, 5 x 5


def _official_keys(width: float, num_outputs: int = 3
                   ) -> dict[str, tuple[tuple[str, str, str], tuple[int, ...], str]]:
    """{official key: ((net, layer, part), expected shape, kind)} of an official
    RSTN state dict; kind "conv" (OIHW), "transposed" ((in, out, k, k)) or
    "bias"."""
    out = {}
    fcn = fcn8s_layer_shapes(width, num_outputs)
    for prefix, net in OFFICIAL_NETS.items():
        for name, (kshape, bshape) in fcn.items():
            out[f"{prefix}.{name}.weight"] = ((net, name, "kernel"), _torch_shape(kshape), "conv")
            out[f"{prefix}.{name}.bias"] = ((net, name, "bias"), bshape, "bias")
        for name, (k, _, cin, cout) in upsampling_shapes(num_outputs).items():
            out[f"{prefix}.{name}.weight"] = ((net, name, "kernel"), (cin, cout, k, k),
                                              "transposed")
    c = num_outputs
    for name, k in zip(OFFICIAL_SALIENCY, SALIENCY_KERNELS):
        out[f"{name}.weight"] = (("saliency", name, "kernel"), (c, c, k, k), "conv")
        out[f"{name}.bias"] = (("saliency", name, "bias"), (c,), "bias")
    return out


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict with `nn.DataParallel`'s "module." prefix removed, when
    every key carries it; keys as str."""
    sd = {str(k): v for k, v in state_dict.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def convert_official_rstn(state_dict: Mapping[str, Any], *, width: float = 1.0,
                          where: str = "convert_official_rstn") -> dict[str, dict]:
    """Maps an official PyTorch RSTN state dict to stnjax RSTN params.

    Args:
      state_dict: {key: array} as NumPy arrays, the official names
        (`coarse_model.conv1_1.weight` ... `fine_model.upscore8.weight`,
        `saliency1.weight`, ...), with or without a common "module." prefix.
        Convolutions are OIHW, the three transposed convolutions per network
        (in, out, k, k).
      width: the FCN8s width the shapes must match (1.0: the released models;
        smaller widths are for tests).
      where: the name errors start with (the file, at the command line).

    Returns:
      {'coarse': {layer: {'kernel', 'bias'}}, 'saliency': {...}, 'fine': ...}
      float32 NumPy arrays: conv kernels HWIO, the upsampling layers
      (`upscore2`, `upscore_pool4`, `upscore8`) as {'kernel': (k, k, in,
      out)}, the params of `FCN8s(upsampling="stored")` and the default
      two-layer `Saliency`.

    Raises:
      InputError listing every missing key, unexpected key and shape
      mismatch (a snapshot of another architecture), or naming a key with
      NaN or infinite values.
    """
    sd = strip_module_prefix(state_dict)
    expected = _official_keys(width)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    bad = [f"{k}: got {tuple(np.shape(sd[k]))}, expected {shape}"
           for k, (_, shape, _) in expected.items()
           if k in sd and tuple(np.shape(sd[k])) != shape]
    _raise_problems(f"{where} (official RSTN, width {width})", [
        missing and f"missing keys ({len(missing)}): {missing}",
        unexpected and f"unexpected keys ({len(unexpected)}): {unexpected}",
        bad and "shape mismatches: " + "; ".join(bad)])
    params: dict[str, dict] = {"coarse": {}, "saliency": {}, "fine": {}}
    for key, ((net, layer, part), _, kind) in expected.items():
        a = np.asarray(sd[key], dtype=np.float32)
        if not np.all(np.isfinite(a)):
            raise InputError(f"{where}: {key} holds NaN or infinite values")
        if kind == "conv":
            a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind == "transposed":
            a = a.transpose(2, 3, 0, 1)  # (in, out, kh, kw) -> (kh, kw, in, out)
        params[net].setdefault(layer, {})[part] = np.ascontiguousarray(a)
    return params


def official_width(state_dict: Mapping[str, Any]) -> float:
    """The FCN8s width of an official-layout state dict, read from conv1_1's
    output channels (64 at width 1); 1.0 when the key is absent (the key
    check then names it)."""
    sd = strip_module_prefix(state_dict)
    w = sd.get("coarse_model.conv1_1.weight")
    return 1.0 if w is None or np.ndim(w) != 4 else float(np.shape(w)[0]) / 64.0
