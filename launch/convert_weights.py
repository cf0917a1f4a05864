"""Converts a PyTorch FCN-8s / VGG16 state dict into stnjax's pretrained .npz.

  python -m launch.convert_weights --input fcn8s_from_caffe.pth \
      --output weights/fcn8s_pascal.npz [--style auto|pytorch-fcn|torchvision-vgg16]

Reading a .pth / .pt file needs torch (optional: `pip install 'stnjax[torch]'`),
imported only here and only for such files; the .npz written loads without
torch (`stnjax.models.weights.load_pretrained`). An input ending in .npz is read as
a state dict saved with NumPy (same key names), which needs no torch.
The output records the source file's sha256, the style and the key count,
and a `<output>.sha256` file beside it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags, logging

from . import app

from stnjax.checks import InputError
from stnjax.models import weights

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "PyTorch state dict (.pth / .pt) or a NumPy .npz with the same keys.")
flags.DEFINE_string("output", None, "Output .npz for stnjax.models.weights.load_pretrained.")
flags.DEFINE_enum("style", "auto", list(weights.STYLES), "Key naming of the input.")
flags.DEFINE_float("width", 1.0, "FCN8s width the shapes must match (1.0 for real checkpoints).")


def _unwrap(obj: Any) -> Any:
    """The state dict inside common checkpoint containers."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{key: float array} from a .pth / .pt (needs torch) or a .npz (NumPy only).
    Raises InputError naming the file for a missing file, a missing torch, a
    .npz with pickled objects or a damaged archive, and a file that does not
    hold a state dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"convert_weights: --input {str(path)!r} does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except ValueError as e:  # object arrays: loading them would run pickle
            raise InputError(f"convert_weights: {path} holds pickled objects ({e}); save the "
                             "state dict as plain arrays (numpy.savez(path, **arrays))") from None
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"convert_weights: {path} is not a readable .npz ({e})") from None
    try:
        import torch  # optional dependency, only for PyTorch files
    except ImportError:
        raise InputError(
            f"convert_weights: reading {path} needs PyTorch, which is not installed "
            "(pip install 'stnjax[torch]', or save the state dict as .npz with NumPy "
            "on a machine that has torch)") from None
    try:
        obj = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise InputError(f"convert_weights: {path} is not a PyTorch state dict torch can "
                         f"load safely ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                         ) from None
    if not isinstance(obj, dict):
        raise InputError(f"convert_weights: {path} holds a {type(obj).__name__}, "
                         "not a state dict")
    return {str(k): v.detach().cpu().float().numpy() for k, v in obj.items()
            if hasattr(v, "detach")}


def convert(input_path: str | Path, output_path: str | Path, style: str = "auto",
            width: float = 1.0) -> str:
    """Reads, converts, checks and writes; returns the output file's sha256."""
    sd = read_state_dict(input_path)
    arrays = weights.convert_state_dict(sd, style=style, width=width)
    detected = style if style != "auto" else weights.detect_style(
        [k.removeprefix("module.") for k in sd])
    meta = {"source": Path(input_path).name,
            "source_sha256": weights.file_sha256(input_path),
            "style": detected, "width": width, "num_arrays": len(arrays),
            "num_values": int(sum(a.size for a in arrays.values()))}
    return weights.save_pretrained(output_path, arrays, meta)


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    with app.exit_on_error():
        digest = convert(FLAGS.input, FLAGS.output, FLAGS.style, FLAGS.width)
    logging.info("wrote %s (sha256 %s)", FLAGS.output, digest)
    print(f"{FLAGS.output}: sha256 {digest}")


def run() -> None:
    """The `stnjax-convert-weights` console command (same as `python -m launch.convert_weights`)."""
    app.run(main)


if __name__ == "__main__":
    run()
