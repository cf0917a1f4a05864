"""An independent NumPy implementation of the official PyTorch RSTN's forward
(twni2016/OrganSegRSTN_PyTorch, OrganSegRSTN/model.py, read, not copied) on
an official-layout state dict, and a builder of such state dicts.

Everything is NCHW and float64, written from the layer list of the official
code: conv1_1 padded by 100, 3 x 3 convolutions padded by 1, 2 x 2 / 2
max pooling in ceil mode, fc6 a 7 x 7 convolution without padding, fc7 and
the score heads 1 x 1, the three transposed convolutions (k4 s2, k4 s2,
k16 s8, no bias) with their full (in, out, k, k) channel kernels, the crops
at 5 (score_pool4), 9 (score_pool3) and 31 (output); the saliency
transformation 3 x 3 (pad 1), ReLU, 5 x 5 (pad 2); the test-time fine round
(mode 'F'): image x saliency(score), crop by the >= 0.5 box of the mask
(union over the channels, margin on every side, clamped), fine FCN, paste
into -9999999, sigmoid. No stnjax code is used here.
"""

from __future__ import annotations

import numpy as np

VGG = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))
FC = 4096
UPSAMPLING = {"upscore2": 4, "upscore_pool4": 4, "upscore8": 16}


def official_shapes(width: float, n_class: int = 3) -> dict[str, tuple[int, ...]]:
    """{key: shape} of an official RSTN state dict with every channel count
    c scaled to max(1, round(c * width)) (width 1: the released models)."""
    def sc(c):
        return max(1, int(round(c * width)))

    fcn, cin = {}, 3
    for b, (n, c) in enumerate(VGG):
        for j in range(n):
            fcn[f"conv{b + 1}_{j + 1}"] = (sc(c), cin, 3, 3)
            cin = sc(c)
    fcn["fc6"] = (sc(FC), sc(512), 7, 7)
    fcn["fc7"] = (sc(FC), sc(FC), 1, 1)
    fcn["score_fr"] = (n_class, sc(FC), 1, 1)
    fcn["score_pool3"] = (n_class, sc(256), 1, 1)
    fcn["score_pool4"] = (n_class, sc(512), 1, 1)
    out = {}
    for net in ("coarse_model", "fine_model"):
        for name, shape in fcn.items():
            out[f"{net}.{name}.weight"] = shape
            out[f"{net}.{name}.bias"] = (shape[0],)
        for name, k in UPSAMPLING.items():
            out[f"{net}.{name}.weight"] = (n_class, n_class, k, k)
    out["saliency1.weight"], out["saliency1.bias"] = (n_class, n_class, 3, 3), (n_class,)
    out["saliency2.weight"], out["saliency2.bias"] = (n_class, n_class, 5, 5), (n_class,)
    return out


def bilinear_filter(k: int) -> np.ndarray:
    """The official `upsample_filt(k)`: (k, k) float64."""
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    r = np.arange(k, dtype=np.float64)
    f1 = 1.0 - np.abs(r - center) / factor
    return np.outer(f1, f1)


def random_state_dict(width: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in the official layout: He-normal convolutions
    with small positive biases (so the narrow networks stay alive), the
    upsampling kernels as the official init leaves them (the bilinear
    filter on the channel diagonal, PyTorch's default uniform off it), and
    a saliency with Xavier weights and the official last bias."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in official_shapes(width).items():
        name = key.split(".")[-2]
        if name in UPSAMPLING:
            k = shape[-1]
            bound = 1.0 / np.sqrt(shape[1] * k * k)
            w = rng.uniform(-bound, bound, size=shape)
            for c in range(shape[0]):
                w[c, c] = bilinear_filter(k)
        elif key.endswith(".bias"):
            w = rng.uniform(0.0, 0.1, size=shape)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        sd[key] = w.astype(np.float32)
    sd["saliency2.bias"] = np.array([1.0, 1.5, 2.0], np.float32)
    return sd


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pad: int) -> np.ndarray:
    """Cross-correlation, NCHW x OIHW, zero padding `pad`, stride 1."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    out = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    return out if b is None else out + b[None, :, None, None]


def max_pool_ceil(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (0, h % 2), (0, w % 2)), constant_values=-np.inf)
    return xp.reshape(n, c, (h + 1) // 2, 2, (w + 1) // 2, 2).max(axis=(3, 5))


def conv_transpose(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """PyTorch ConvTranspose2d, weight (in, out, k, k), no padding, no bias."""
    n, _, h, wd = x.shape
    k = w.shape[-1]
    out = np.zeros((n, w.shape[1], (h - 1) * stride + k, (wd - 1) * stride + k))
    for i in range(h):
        for j in range(wd):
            out[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
                "nc,coab->noab", x[:, :, i, j], w)
    return out


def relu(x):
    return np.maximum(x, 0.0)


def fcn8s(sd: dict, net: str, x: np.ndarray) -> np.ndarray:
    """The official FCN8s forward (eval mode): logits (N, n_class, H, W)."""
    p = {k[len(net) + 1:]: np.asarray(v, np.float64) for k, v in sd.items()
         if k.startswith(net + ".")}
    h = x.astype(np.float64)
    pools = []
    for b, (n, _) in enumerate(VGG):
        for j in range(n):
            name = f"conv{b + 1}_{j + 1}"
            h = relu(conv(h, p[f"{name}.weight"], p[f"{name}.bias"],
                          100 if name == "conv1_1" else 1))
        h = max_pool_ceil(h)
        pools.append(h)
    h = relu(conv(h, p["fc6.weight"], p["fc6.bias"], 0))
    h = relu(conv(h, p["fc7.weight"], p["fc7.bias"], 0))
    up2 = conv_transpose(conv(h, p["score_fr.weight"], p["score_fr.bias"], 0),
                         p["upscore2.weight"], 2)
    s4 = conv(pools[3], p["score_pool4.weight"], p["score_pool4.bias"], 0)
    h = up2 + s4[:, :, 5:5 + up2.shape[2], 5:5 + up2.shape[3]]
    up4 = conv_transpose(h, p["upscore_pool4.weight"], 2)
    s3 = conv(pools[2], p["score_pool3.weight"], p["score_pool3.bias"], 0)
    h = up4 + s3[:, :, 9:9 + up4.shape[2], 9:9 + up4.shape[3]]
    h = conv_transpose(h, p["upscore8.weight"], 8)
    return h[:, :, 31:31 + x.shape[2], 31:31 + x.shape[3]]


def sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def saliency(sd: dict, prob: np.ndarray) -> np.ndarray:
    g = {k: np.asarray(v, np.float64) for k, v in sd.items() if k.startswith("saliency")}
    h = relu(conv(prob, g["saliency1.weight"], g["saliency1.bias"], 1))
    return conv(h, g["saliency2.weight"], g["saliency2.bias"], 2)


def coarse_prob(sd: dict, image: np.ndarray) -> np.ndarray:
    """Mode 'C': sigmoid of the coarse FCN, (N, 3, H, W)."""
    return sigmoid(fcn8s(sd, "coarse_model", image))


def fine_round(sd: dict, image: np.ndarray, score: np.ndarray, mask: np.ndarray,
               margin: int) -> np.ndarray:
    """Mode 'F' on one window (N = 1): the fine probability, 0 outside the box."""
    assert image.shape[0] == 1
    rows, cols = np.nonzero((mask[0] >= 0.5).any(axis=0))
    h, w = image.shape[2:]
    r0, r1 = max(rows.min() - margin, 0), min(rows.max() + margin + 1, h)
    c0, c1 = max(cols.min() - margin, 0), min(cols.max() + margin + 1, w)
    weighted = image.astype(np.float64) * saliency(sd, score)
    logits = np.full(image.shape, -9999999.0)
    logits[:, :, r0:r1, c0:c1] = fcn8s(sd, "fine_model", weighted[:, :, r0:r1, c0:c1])
    return sigmoid(logits)
