"""Writes a dataset folder's manifest (dataset.json) for existing CT files.

  # NIH Pancreas-CT as downloaded from TCIA (DICOM images, NIfTI labels):
  python -m launch.make_dataset --out=/data/nih-pancreas \
      --nih_images=/data/TCIA/Pancreas-CT --nih_labels=/data/TCIA_pancreas_labels-02-05-2017

  # A Medical Segmentation Decathlon task (dataset.json, imagesTr/, labelsTr/);
  # the organ is every foreground label (Task07: pancreas 1 + tumour 2):
  python -m launch.make_dataset --out=/data/msd07 --msd=/data/Task07_Pancreas

  # Any NIfTI pairs: images and labels matched by file name
  python -m launch.make_dataset --out=/data/mine --images=/data/mine/images \
      --labels=/data/mine/labels --organ_id=7

  # BTCV (img0001 / label0001): matched by the number in the names
  python -m launch.make_dataset --out=/data/btcv --images=.../images \
      --labels=.../labels --pair_by=number --organ_id=6

The manifest points at the files where they are (no copy). --organ_id takes
one label id or several (comma-separated, merged into one organ). Every case
is loaded once to check that image and label are readable and aligned in
world coordinates, and that every listed id occurs in some label, before the
manifest is written. The fold table (folds.json) is created on first use by
training (data.fold_rule).
"""

from pathlib import Path

from absl import flags

from . import app

_OUT = flags.DEFINE_string("out", None, "Dataset folder to write dataset.json into.")
_NAME = flags.DEFINE_string("name", "", "Dataset name (default: the folder's name).")
_NIH_IMAGES = flags.DEFINE_string("nih_images", "", "TCIA Pancreas-CT root (PANCREAS_XXXX/...).")
_NIH_LABELS = flags.DEFINE_string("nih_labels", "", "Folder of labelXXXX.nii.gz files.")
_MSD = flags.DEFINE_string("msd", "", "A Medical Segmentation Decathlon task folder.")
_IMAGES = flags.DEFINE_string("images", "", "Folder of image NIfTI files or DICOM folders.")
_LABELS = flags.DEFINE_string("labels", "", "Folder of label NIfTI files (same names).")
_PAIR_BY = flags.DEFINE_enum("pair_by", "name", ["name", "number"],
                             "Match --images and --labels by file name or by the last number "
                             "in it.")
_ORGAN = flags.DEFINE_list("organ_id", [], "Label id(s) of the organ, several merged into one "
                           "(default: 1; with --msd every foreground label).")
_NO_CHECK = flags.DEFINE_bool("no_check", False, "Skip loading every case.")
flags.mark_flags_as_required(["out"])


def _organ(default):
    """The --organ_id ids (an int for one), or `default`."""
    from stnjax.checks import InputError
    from stnjax.data import volume_io
    if not _ORGAN.value:
        return default
    try:
        ids = volume_io.organ_ids([int(v) for v in _ORGAN.value], "--organ_id")
    except ValueError:
        raise InputError(f"--organ_id: expected integer label ids, got {_ORGAN.value}") from None
    return ids[0] if len(ids) == 1 else ids


def _check_cases(cases, organ, log):
    """Loads every case (readable, aligned); InputError naming an id of a
    several-id organ that no label holds."""
    from stnjax.checks import InputError
    from stnjax.data import volume_io
    present = []
    for i, c in enumerate(cases):
        case = volume_io.load_case(c["image"], c["label"], organ_id=organ, case_id=c["id"])
        present.append(case.organ_ids_present)
        log.info("checked %d/%d %s", i + 1, len(cases), c["id"])
    absent = volume_io.absent_organ_ids(organ, present)
    if absent:
        raise InputError(f"--organ_id: {absent} occur in none of the {len(cases)} labels")


def main(argv):
    app.no_arguments(argv)
    from stnjax.checks import InputError  # imports jax: after flag parsing
    from stnjax.data import manifest

    log = app.setup(None)
    out = Path(_OUT.value)
    with app.exit_on_error():
        name = _NAME.value or out.name
        if _MSD.value:
            cases, msd_ids, msd_name = manifest.msd_cases(_MSD.value)
            organ = _organ(msd_ids[0] if len(msd_ids) == 1 else msd_ids)
            name = _NAME.value or msd_name
        elif _NIH_IMAGES.value:
            cases, organ = manifest.nih_pancreas_cases(_NIH_IMAGES.value, _NIH_LABELS.value), _organ(1)
        elif _IMAGES.value:
            cases = manifest.paired_cases(_IMAGES.value, _LABELS.value, pair_by=_PAIR_BY.value)
            organ = _organ(1)
        else:
            raise InputError("give --msd, --nih_images/--nih_labels or --images/--labels")
        if not _NO_CHECK.value:
            _check_cases(cases, organ, log)
        out.mkdir(parents=True, exist_ok=True)
        path = manifest.write_manifest(out, name=name, organ_id=organ, cases=cases)
    print(f"wrote {path} ({len(cases)} cases, organ id(s) {organ})")


def run() -> None:
    """The `stnjax-make-dataset` console command (same as `python -m launch.make_dataset`)."""
    app.run(main)


if __name__ == "__main__":
    run()
