"""Worker process for `bench/vs_official.py`: the official PyTorch RSTN's
joint training step, timed one call at a time on request.

Runs under a Python that has torch (not a dependency of stnjax; see
../shared/peer/README.md for a CPU build). It imports the official
`OrganSegRSTN/model.py` from the path it is given, never a copy, patches
`.cuda()` to a no-op in this process (the official code calls it in its crop
and uncrop), and builds the official training set-up: `RSTN(crop_margin=20,
crop_prob=0.5, crop_sample_batch=1)`, the four SGD groups of `training.py`
(momentum 0.99, weight decay 5e-4, rates x1 / x2 / x10 / x20) and
`DSC_loss`, 1/3 coarse + 2/3 fine.

Protocol (one line each way): it prints `ready <json>` once set up, then
for every `step` line on stdin runs one step (zero_grad, forward in the
given mode, loss, backward, optimizer.step) and prints `step <seconds>
<loss>`; `quit` ends it. Errors are printed as `error <message>` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time


def _load_official(path: str):
    model_py = os.path.join(path, "OrganSegRSTN", "model.py")
    if not os.path.isfile(model_py):
        raise FileNotFoundError(
            f"--official: {path!r} does not hold the official code (no {model_py})")
    spec = importlib.util.spec_from_file_location("official_rstn_model", model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup(args):
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.nn.Module.cuda = lambda self, *a, **k: self   # CPU: .cuda() is a no-op
    torch.Tensor.cuda = lambda self, *a, **k: self
    official = _load_official(args.official)
    torch.manual_seed(0)
    model = official.RSTN(crop_margin=20, crop_prob=0.5, crop_sample_batch=1)
    # The official init zeroes every FCN conv (it then loads PASCAL weights);
    # random He weights instead, as stnjax's bench, so the arithmetic is real.
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            fan_in = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
            torch.nn.init.normal_(mod.weight, 0.0, (2.0 / fan_in) ** 0.5)
            torch.nn.init.zeros_(mod.bias)
    model._initialize_weights()  # RSTN's own: back to the official saliency init
    with torch.no_grad():  # an empty coarse map: J crops by the label box, as in stnjax's bench
        model.coarse_model.score_fr.bias.fill_(-20.0)
    model.train()
    lr = 1e-5
    groups = official.get_parameters
    optimizer = torch.optim.SGD([
        {"params": groups(model, coarse=True, bias=False)},
        {"params": groups(model, coarse=True, bias=True), "lr": lr * 2, "weight_decay": 0},
        {"params": groups(model, coarse=False, bias=False), "lr": lr * 10},
        {"params": groups(model, coarse=False, bias=True), "lr": lr * 20, "weight_decay": 0},
    ], lr=lr, momentum=0.99, weight_decay=0.0005)
    criterion = official.DSC_loss()
    # stnjax's benchmark batch itself (bench/synthetic.py, NumPy only), as NCHW.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.synthetic import j_batch
    batch = j_batch(args.batch, args.size, "label")
    image = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    label = torch.from_numpy(np.ascontiguousarray(batch["label"].transpose(0, 3, 1, 2)))
    return torch, model, optimizer, criterion, image, label


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", required=True, help="folder holding OrganSegRSTN/model.py")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", default="J", choices=["S", "I", "J"])
    args = p.parse_args()
    # The official code prints as it builds its groups: keep stdout for the protocol.
    proto, sys.stdout = sys.stdout, sys.stderr
    try:
        torch, model, optimizer, criterion, image, label = _setup(args)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which names it
        print(f"error {type(e).__name__}: {e}", file=proto, flush=True)
        return 2
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "size": args.size, "batch": args.batch, "mode": args.mode}
    print("ready " + json.dumps(info), file=proto, flush=True)
    import random
    random.seed(0)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd != "step":
            print(f"error unknown command {cmd!r}", file=proto, flush=True)
            return 2
        t0 = time.perf_counter()
        optimizer.zero_grad()
        coarse_prob, fine_prob = model(image, label, mode=args.mode)
        loss = (criterion(coarse_prob, label) / 3.0 + criterion(fine_prob, label) * 2.0 / 3.0)
        loss.backward()
        optimizer.step()
        dt = time.perf_counter() - t0
        print(f"step {dt:.6f} {float(loss):.6f}", file=proto, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
