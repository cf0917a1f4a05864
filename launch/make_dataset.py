"""Writes a dataset folder's manifest (dataset.json) for existing CT files.

  # NIH Pancreas-CT as downloaded from TCIA (DICOM images, NIfTI labels):
  python -m launch.make_dataset --out=/data/nih-pancreas \
      --nih_images=/data/TCIA/Pancreas-CT --nih_labels=/data/TCIA_pancreas_labels-02-05-2017

  # Any NIfTI pairs: images and labels matched by file name
  python -m launch.make_dataset --out=/data/mine --images=/data/mine/images \
      --labels=/data/mine/labels --organ_id=7

The manifest points at the files where they are (no copy). Every case is
loaded once to check that image and label are readable and aligned in world
coordinates before the manifest is written. The fold table (folds.json) is
created on first use by training (data.fold_rule).
"""

from pathlib import Path

from absl import app, flags

from launch.logs import setup_logging

_OUT = flags.DEFINE_string("out", None, "Dataset folder to write dataset.json into.")
_NAME = flags.DEFINE_string("name", "", "Dataset name (default: the folder's name).")
_NIH_IMAGES = flags.DEFINE_string("nih_images", "", "TCIA Pancreas-CT root (PANCREAS_XXXX/...).")
_NIH_LABELS = flags.DEFINE_string("nih_labels", "", "Folder of labelXXXX.nii.gz files.")
_IMAGES = flags.DEFINE_string("images", "", "Folder of image NIfTI files or DICOM folders.")
_LABELS = flags.DEFINE_string("labels", "", "Folder of label NIfTI files (same names).")
_ORGAN = flags.DEFINE_integer("organ_id", 1, "Label id of the organ (NIH: 1).")
_NO_CHECK = flags.DEFINE_bool("no_check", False, "Skip loading every case.")
flags.mark_flags_as_required(["out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from stnjax.data import manifest as data  # after flag parsing
    from stnjax.data import volume_io as io
    from stnjax.checks import InputError

    log = setup_logging(None)
    out = Path(_OUT.value)
    try:
        if _NIH_IMAGES.value:
            cases = data.nih_pancreas_cases(_NIH_IMAGES.value, _NIH_LABELS.value)
        elif _IMAGES.value:
            cases = data.paired_cases(_IMAGES.value, _LABELS.value)
        else:
            raise InputError("give --nih_images/--nih_labels or --images/--labels")
        if not _NO_CHECK.value:
            for i, c in enumerate(cases):
                io.load_case(c["image"], c["label"], organ_id=_ORGAN.value, case_id=c["id"])
                log.info("checked %d/%d %s", i + 1, len(cases), c["id"])
        out.mkdir(parents=True, exist_ok=True)
        path = data.write_manifest(out, name=_NAME.value or out.name, organ_id=_ORGAN.value,
                                   cases=cases)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path} ({len(cases)} cases)")


if __name__ == "__main__":
    app.run(main)
