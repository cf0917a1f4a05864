"""Each FCN-8s layer's forward and backward alone: stnjax's `conv2d` against PyTorch's, at
the coarse network's sizes for a 256 x 256 slice.

  python -m bench.layers_vs_torch --torch_python=/path/to/torch-env/bin/python --calls=5

Where does the joint step lose to the official PyTorch step, layer by layer?
The jax side times `stnjax.models.conv`'s custom-gradient convolution
(forward; backward = kernel and input gradients from the saved residuals)
in this process, in both of the FCN-8s's written-out forms: "taps" (the
form before session 12, `FCN8s.conv_grad="taps"`) and "custom" (the default:
Winograd for the 3 x 3 layers where `winograd.pays`, on CPU); the torch side runs the same shapes through
`torch.nn.functional.conv2d` and `aten::convolution_backward` (oneDNN) in a
subprocess under --torch_python (torch is not a dependency). The two sides
run one after the other, layer by layer (the torch side first each time), so
a drift of the machine moves both alike. Prints milliseconds, medians of
--calls calls, and stnjax ("custom") / torch per layer and direction.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time

from absl import app, flags

from launch import hugepages

_TORCH_PY = flags.DEFINE_string("torch_python", None, "A Python interpreter that has torch.")
_CALLS = flags.DEFINE_integer("calls", 5, "Timed calls per layer and direction.")
_THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads on the torch side.")

# (name, input side, Cin, Cout, kernel): the coarse FCN-8s at 1 x 256 x 256 (pad 100).
LAYERS = (("conv1_2", 454, 64, 64, 3), ("conv2_2", 227, 128, 128, 3),
          ("conv3_2", 114, 256, 256, 3), ("conv4_2", 57, 512, 512, 3),
          ("conv5_2", 29, 512, 512, 3), ("fc6", 15, 512, 4096, 7), ("fc7", 9, 4096, 4096, 1))

_TORCH_SIDE = """
import json, statistics, sys, time, torch
name, s, ci, co, k, calls, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
p = 1 if k == 3 else 0
x = torch.randn(1, ci, s, s); w = torch.randn(co, ci, k, k) * 0.01
g = torch.randn_like(torch.nn.functional.conv2d(x, w, padding=p))
fns = {"fwd": lambda: torch.nn.functional.conv2d(x, w, padding=p),
       "bwd": lambda: torch.ops.aten.convolution_backward(
           g, x, w, [co], [1, 1], [p, p], [1, 1], False, [0, 0], 1, [True, True, False])}
out = {}
for tag, f in fns.items():
    f(); ts = []
    for _ in range(calls):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    out[tag] = 1e3 * statistics.median(ts)
print(json.dumps(out))
"""


def _jax_layer(name: str, s: int, ci: int, co: int, k: int, calls: int,
               form: str) -> dict[str, float]:
    """Median ms of stnjax's forward and backward of one layer (float32,
    batch 1) in the FCN-8s's `conv_grad` form ("custom" or "taps")."""
    import jax

    from stnjax.models import conv
    from stnjax.models.fcn8s import conv_form

    grad = conv_form(name, k, form)
    pad = ((1, 1), (1, 1)) if k == 3 else ((0, 0), (0, 0))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (1, s, s, ci))
    w = jax.random.normal(keys[1], (k, k, ci, co)) * 0.01
    fwd = jax.jit(lambda x, w: conv._conv2d_fwd(x, w, pad, None, grad))
    y, res = fwd(x, w)
    g = jax.random.normal(keys[2], y.shape)
    bwd = jax.jit(lambda r, g: conv._conv2d_bwd(pad, None, grad, r, g))
    out = {}
    for tag, f, args in (("fwd", fwd, (x, w)), ("bwd", bwd, (res, g))):
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(calls):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t)
        out[tag] = 1e3 * statistics.median(ts)
    return out


def main(argv):
    del argv
    if not _TORCH_PY.value:
        raise app.UsageError("--torch_python: a Python interpreter that has torch is required")
    print(f"{'layer':>8} {'dir':>4} {'taps ms':>8} {'custom ms':>10} {'torch ms':>9} "
          f"{'ratio':>6}")
    for name, s, ci, co, k in LAYERS:
        arg = json.dumps([name, s, ci, co, k, _CALLS.value, _THREADS.value])
        r = subprocess.run([_TORCH_PY.value, "-c", _TORCH_SIDE, arg], capture_output=True,
                           text=True, check=False)
        if r.returncode:
            raise app.UsageError(f"--torch_python={_TORCH_PY.value!r}: the torch side failed: "
                                 f"{r.stderr.strip().splitlines()[-1:]}")
        torch_ms = json.loads(r.stdout.strip().splitlines()[-1])
        taps = _jax_layer(name, s, ci, co, k, _CALLS.value, "taps")
        jax_ms = _jax_layer(name, s, ci, co, k, _CALLS.value, "custom")
        for tag in ("fwd", "bwd"):
            print(f"{name:>8} {tag:>4} {taps[tag]:8.1f} {jax_ms[tag]:10.1f} "
                  f"{torch_ms[tag]:9.1f} {jax_ms[tag] / torch_ms[tag]:6.2f}", flush=True)


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    app.run(main)
