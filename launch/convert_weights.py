"""Converts PyTorch weights for stnjax: the PASCAL FCN-8s, or the official RSTN models.

  python -m launch.convert_weights --input fcn8s_from_caffe.pth \
      --output weights/fcn8s_pascal.npz [--style auto|pytorch-fcn|torchvision-vgg16]
  python -m launch.convert_weights --official_rstn='FD0:XJ3_1_20180822_204202.pkl' \
      --plane=X --fold=0 --workdir=runs/official --data_dir=/data/nih-pancreas \
      [--orientation=official|canonical]

The first writes the pretrained body (.npz) training starts from. The
second imports one plane's snapshot of the official PyTorch RSTN
(`torch.save(RSTN_model.state_dict())`, with or without DataParallel's
`module.` prefix) as the finished run fold<F>/<plane> of a workdir with the
config `launch/configs/official_rstn.py` (full width, reference variant,
`model.upsampling="stored"`: the snapshot's own upsampling kernels, and
`data.orientation="official"`: every volume fed in the official pipeline's
storage order), so `launch.evaluate --workdir=...` and `launch.segment` use
it like a trained run; `provenance.json` beside the checkpoint records the
file, its sha256, the keys mapped and the params' checksum. `--data_dir` is
the dataset folder `evaluate` reads and `--orientation` the voxel order the
models see (both part of the models' identity, as for training; to change
one later, convert again with `--overwrite`).
A file of another architecture (the missing / unexpected keys and shape
mismatches listed), a file whose official name (`FD<f>:<plane>...`) names
another plane or fold, and a workdir that holds another model are refused
before anything is written (`--overwrite` replaces the model).

Reading a .pth / .pt file needs torch (optional: `pip install 'stnjax[torch]'`),
imported only here and only for such files; the .npz written loads without
torch (`stnjax.models.weights.load_pretrained`). An input ending in .npz is read as
a state dict saved with NumPy (same key names), which needs no torch.
The output records the source file's sha256, the style and the key count,
and a `<output>.sha256` file beside it.
"""

from __future__ import annotations

import re
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import flags, logging

from . import app

from stnjax.checks import InputError
from stnjax.models import weights

if TYPE_CHECKING:
    from stnjax.train.spec import TrainSpec

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "PyTorch state dict (.pth / .pt) or a NumPy .npz with the same keys.")
flags.DEFINE_string("output", None, "Output .npz for stnjax.models.weights.load_pretrained.")
flags.DEFINE_enum("style", "auto", list(weights.STYLES), "Key naming of the input.")
flags.DEFINE_float("width", 1.0, "FCN8s width the shapes must match (1.0 for real checkpoints).")
flags.DEFINE_string("official_rstn", None, "An official PyTorch RSTN snapshot (.pkl / .pth, "
                    "or .npz with the same keys) to import into --workdir (its width is "
                    "read from conv1_1: 1.0 for the released files; --width is not used).")
flags.DEFINE_enum("plane", None, ["X", "Y", "Z"], "The snapshot's plane (--official_rstn).")
flags.DEFINE_integer("fold", 0, "The snapshot's fold (--official_rstn).")
flags.DEFINE_string("workdir", None, "The workdir the imported run goes to (--official_rstn).")
flags.DEFINE_string("data_dir", None, "The dataset folder evaluate reads (--official_rstn; "
                    "default: the official_rstn config's).")
flags.DEFINE_bool("overwrite", False, "Replace a model the workdir already holds "
                  "(--official_rstn).")
flags.DEFINE_enum("orientation", None, ["canonical", "official"], "The voxel order the "
                  "imported models see (--official_rstn; data.orientation, default: the "
                  "official_rstn config's 'official': DICOM rows, columns, InstanceNumber).")


def _unwrap(obj: Any) -> Any:
    """The state dict inside common checkpoint containers."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def read_state_dict(path: str | Path, flag: str = "--input") -> dict[str, np.ndarray]:
    """{key: float array} from a .pth / .pt / .pkl (torch.load with
    weights_only=True: tensors and plain containers only, never code; needs
    torch) or a .npz (NumPy only). Raises InputError naming the file (given
    by `flag`) for a missing file, a missing torch, a .npz with pickled
    objects or a damaged archive, and a file that does not hold a state dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"convert_weights: {flag} {str(path)!r} does not exist")
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
    if not isinstance(obj, dict) or not any(hasattr(v, "detach") for v in obj.values()):
        raise InputError(f"convert_weights: {path} holds a {type(obj).__name__}, not a "
                         "state dict (a dict of tensors)")
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


_OFFICIAL_NAME = re.compile(r"FD(\d+)[:_]?([XYZ])([SIJ])\d")


def check_official_name(path: str | Path, plane: str, fold: int) -> str | None:
    """The stage ('S', 'I' or 'J') an official snapshot name
    (`FD<fold>:<plane><stage>3_1_<time>.pkl`) states, or None for another
    name; InputError when the name states another plane or fold."""
    m = _OFFICIAL_NAME.search(Path(path).name)
    if m is None:
        return None
    if m.group(2) != plane or int(m.group(1)) != int(fold):
        raise InputError(
            f"convert_weights: {Path(path).name} is the official snapshot of fold "
            f"{m.group(1)} plane {m.group(2)}, but --fold={fold} --plane={plane}; give the "
            "fold and plane it was trained on (or rename a file that is misnamed)")
    return m.group(3)


def official_spec(width: float, data_dir: str | None, orientation: str | None = None
                  ) -> "TrainSpec":
    """The TrainSpec of imported official models (launch/configs/official_rstn.py),
    with `data_dir` and `orientation` (data.orientation) when given; InputError
    naming data.orientation for a bad value."""
    from .configs import official_rstn
    from stnjax.train.spec import TrainSpec

    config = official_rstn.get_config()
    config.model.width = float(width)
    if data_dir is not None:
        config.data.dir = str(data_dir)
    if orientation is not None:
        config.data.orientation = orientation
    return TrainSpec.from_config(config)


def convert_official(path: str | Path, workdir: str | Path, plane: str, fold: int = 0, *,
                     data_dir: str | None = None, overwrite: bool = False,
                     orientation: str | None = None) -> dict:
    """Imports an official RSTN snapshot as the finished run (fold, plane) of
    `workdir` (see the module doc); returns the provenance record, with
    'written' False when the run already held this file. `orientation`:
    data.orientation of the workdir's config (None: the official_rstn
    config's "official"). InputError (nothing written) for a bad file, name,
    plane, orientation or workdir."""
    from stnjax.train import imported

    if plane not in ("X", "Y", "Z"):
        raise InputError(f"convert_weights: --plane must be X, Y or Z, got {plane!r}")
    stage = check_official_name(path, plane, fold)
    sd = read_state_dict(path, "--official_rstn")
    width = weights.official_width(sd)
    params = weights.convert_official_rstn(sd, width=width, where=f"convert_weights: {path}")
    spec = official_spec(width, data_dir, orientation)
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): a
            for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    prov = {"format": "stnjax-imported-rstn-v1", "source": Path(path).name,
            "source_path": str(Path(path).resolve()),
            "source_sha256": weights.file_sha256(path),
            "source_bytes": Path(path).stat().st_size, "stage": stage,
            "module_prefix": bool(sd) and all(k.startswith("module.") for k in sd),
            "keys_mapped": len(sd), "params_sha256": weights.content_sha256(flat),
            "num_values": int(sum(a.size for a in flat.values())), "width": width,
            "fold": int(fold), "plane": plane, "config": spec.name,
            "orientation": spec.data.orientation,
            "converted_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if stage in ("S", "I"):
        logging.warning("%s is a stage-%s snapshot; the official testing uses the J one",
                        path, stage)
    written = imported.write_imported_run(spec, workdir, fold, plane, params, prov,
                                          overwrite=overwrite)
    return dict(prov, written=written)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.official_rstn:
        if not FLAGS.plane or not FLAGS.workdir:
            raise app.UsageError("--official_rstn needs --plane and --workdir")
        app.setup(None)  # stnjax's log lines on stderr; orbax's INFO lines off
        with app.exit_on_error():
            prov = convert_official(FLAGS.official_rstn, FLAGS.workdir, FLAGS.plane,
                                    FLAGS.fold, data_dir=FLAGS.data_dir,
                                    overwrite=FLAGS.overwrite,
                                    orientation=FLAGS.orientation)
        state = "written" if prov["written"] else "already there, unchanged"
        print(f"{FLAGS.workdir}: fold {FLAGS.fold} plane {FLAGS.plane} from "
              f"{prov['source']} (sha256 {prov['source_sha256']}): {state}")
        return
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output (or --official_rstn) are required")
    with app.exit_on_error():
        digest = convert(FLAGS.input, FLAGS.output, FLAGS.style, FLAGS.width)
    logging.info("wrote %s (sha256 %s)", FLAGS.output, digest)
    print(f"{FLAGS.output}: sha256 {digest}")


def run() -> None:
    """The `stnjax-convert-weights` console command (same as `python -m launch.convert_weights`)."""
    app.run(main)


if __name__ == "__main__":
    run()
