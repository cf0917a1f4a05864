"""Segments CT volumes (NIfTI files or DICOM folders) with trained models.

  python -m launch.segment --config=launch/configs/phantom.py --workdir=/tmp/stn \
      --out=/tmp/masks scan1.nii.gz /data/dicom/series2/

No labels needed. Masks are written as <out>/<name>_mask.nii.gz in the
source geometry (they overlay the input in 3D Slicer / ITK-SNAP). Every
input is read and checked before anything is written. Runs on CPU too.
"""


from absl import app, flags
from ml_collections import config_flags

from launch import compile_cache, hugepages
from launch.logs import setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the masks.")
_FOLD = flags.DEFINE_integer("fold", 0, "Which fold's models to use.")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
    from stnjax.eval import runs as experiment  # imports jax: after flag parsing
    from stnjax.checks import InputError

    log = setup_logging(None)  # no file: nothing is written before the checks
    compile_cache.enable(_WORKDIR.value)  # the trained workdir's cache, shared with evaluate
    try:
        written = experiment.segment_files(_CONFIG.value, _WORKDIR.value, argv[1:],
                                           out_dir=_OUT.value, fold=_FOLD.value)
    except InputError as e:
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None
    for p in written:
        print(f"wrote {p}")


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    app.run(main)
