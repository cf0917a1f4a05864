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

from absl import flags

from launch import app

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
    app.no_arguments(argv)
    from stnjax.checks import InputError  # imports jax: after flag parsing
    from stnjax.data import manifest, volume_io

    log = app.setup(None)
    out = Path(_OUT.value)
    with app.exit_on_error():
        if _NIH_IMAGES.value:
            cases = manifest.nih_pancreas_cases(_NIH_IMAGES.value, _NIH_LABELS.value)
        elif _IMAGES.value:
            cases = manifest.paired_cases(_IMAGES.value, _LABELS.value)
        else:
            raise InputError("give --nih_images/--nih_labels or --images/--labels")
        if not _NO_CHECK.value:
            for i, c in enumerate(cases):
                volume_io.load_case(c["image"], c["label"], organ_id=_ORGAN.value, case_id=c["id"])
                log.info("checked %d/%d %s", i + 1, len(cases), c["id"])
        out.mkdir(parents=True, exist_ok=True)
        path = manifest.write_manifest(out, name=_NAME.value or out.name,
                                       organ_id=_ORGAN.value, cases=cases)
    print(f"wrote {path} ({len(cases)} cases)")


if __name__ == "__main__":
    app.run(main)
