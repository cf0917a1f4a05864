"""Segments CT volumes (NIfTI files or DICOM folders) with trained models.

  python -m launch.segment --workdir=/tmp/stn --out=/tmp/masks scan1.nii.gz /data/dicom/series2/

Without --config, the config the models were trained with (stored in
<workdir>/config.json) is used; --config.infer.* overrides apply to it.

No labels needed. Masks are written as <out>/<name>_mask.nii.gz in the
source geometry (they overlay the input in 3D Slicer / ITK-SNAP), with
--probabilities also the fused probability map (<name>_prob.nii.gz), with
--preview a picture of three slices through the mask (<name>_preview.png), and
<out>/segment.json holds per input the shape, spacing, organ volume (mL),
mean HU inside, rounds, seconds and warnings (an empty mask; a spacing far
from the training data's). Every
input is checked from its headers before anything is written (readable, 3D,
thick enough): two inputs with the same name (p1/ct.nii.gz, p2/ct.nii.gz)
are an error, and so is an existing mask unless --overwrite; the voxels are
decoded when the input's turn comes, a few ahead of the devices, so any
number of inputs fits in memory. Runs on CPU too. Inputs run one per local
device at a time (--devices=N: the first N only), and over several hosts
with --multihost (as launch.train): each process segments its share and
writes its masks; process 0 writes segment.json, which names the device and
process of every input. A lost host (no sign of life for --host_timeout
seconds) stops the others with an error naming it; the finished inputs are
kept.
"""


from absl import flags

from . import app

_CONFIG = app.define_config(stored_default=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the masks.")
_FOLD = flags.DEFINE_integer("fold", 0, "Which fold's models to use.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace outputs that exist in --out.")
_PROBS = flags.DEFINE_bool("probabilities", False, "Also write the fused probability map "
                           "(<name>_prob.nii.gz, float32, the round the mask comes from).")
_DEVICES = flags.DEFINE_integer("devices", 0, "Local devices to run inputs on (0: all).")
_HOSTS = app.define_host_flags()
_PREVIEW = flags.DEFINE_bool("preview", False, "Also draw <name>_preview.png: three slices "
                             "through the mask over the image (says so when it is empty).")
flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv):
    from stnjax.eval import runs  # imports jax: after flag parsing
    from stnjax.eval.spec import EvalSpec

    _HOSTS.start(recoverable=True)
    # No log file (nothing is written before the checks); the trained
    # workdir's compilation cache, shared with evaluate.
    log = app.setup(None, cache_base=_WORKDIR.value, primary=app.is_primary())
    with app.exit_on_error(log):
        spec = EvalSpec.from_config(_CONFIG.value)
        inf = spec.inference
        log.info("segmenting %d input(s) with the fold %d models of %s: planes %s, stop at "
                 "inter-round DSC t = %.2f or after %d rounds, saliency input %r, fusion %r, "
                 "margin %d", len(argv) - 1, _FOLD.value, _WORKDIR.value, "".join(inf.planes),
                 spec.threshold, inf.max_rounds, inf.saliency_input, inf.fusion,
                 spec.train.model.margin)
        written = runs.segment_files(spec, _WORKDIR.value, argv[1:],
                                     out_dir=_OUT.value, fold=_FOLD.value,
                                     overwrite=_OVERWRITE.value,
                                     probabilities=_PROBS.value, preview=_PREVIEW.value,
                                     devices=_DEVICES.value)
    for p in written:
        print(f"wrote {p}")


def run() -> None:
    """The `stnjax-segment` console command (same as `python -m launch.segment`)."""
    app.run(main)


if __name__ == "__main__":
    run()
