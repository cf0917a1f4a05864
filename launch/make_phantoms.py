"""Writes the built-in synthetic CT dataset and prints its summary.

  python -m launch.make_phantoms --out=/tmp/phantoms --num_cases=8 --seed=0

The folder holds images/ and labels/ (NIfTI), dataset.json (organ_id 7) and
folds.json; see stnjax.phantom.dataset. Re-running with the same flags keeps
the existing folder; different flags need --overwrite.
"""

from absl import flags

from . import app
from stnjax.phantom import dataset as phantom_dataset
from stnjax.phantom import volumes as phantom

OUT = flags.DEFINE_string("out", None, "Dataset folder to write.", required=True)
NUM_CASES = flags.DEFINE_integer("num_cases", 8, "Number of cases.")
SEED = flags.DEFINE_integer("seed", 0, "Dataset seed (case i uses "
                           "phantom_dataset.case_seed(seed, i)).")
SHAPE = flags.DEFINE_list("shape", ["128", "128", "64"], "Voxels per canonical axis (P, L, S).")
SPACING = flags.DEFINE_list("spacing", [], "mm per voxel written to file; empty = "
                            "the reference field of view (320 x 320 x 256 mm) / shape.")
NOISE = flags.DEFINE_float("noise_hu", 12.0, "Noise std in HU.")
N_FOLDS = flags.DEFINE_integer("n_folds", 4, "Folds in folds.json.")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a different existing dataset.")


def main(argv):
    app.no_arguments(argv)
    try:
        config = phantom.PhantomConfig(
            shape=tuple(int(s) for s in SHAPE.value),
            spacing=tuple(float(s) for s in SPACING.value) if SPACING.value else None,
            noise_hu=NOISE.value)
    except ValueError as e:
        raise app.UsageError(str(e))
    try:
        out = phantom_dataset.write_phantom_dataset(
            OUT.value, num_cases=NUM_CASES.value, seed=SEED.value, config=config,
            n_folds=N_FOLDS.value, overwrite=OVERWRITE.value)
    except (FileExistsError, ValueError) as e:  # InputError is a ValueError
        raise app.UsageError(str(e))
    rows = phantom_dataset.summarize_dataset(out)
    print(f"dataset {out}: {len(rows)} cases, shape {config.shape}, "
          f"spacing {tuple(round(float(s), 3) for s in config.voxel_spacing)} mm")
    print(phantom_dataset.format_summary(rows))


def run() -> None:
    """The `stnjax-make-phantoms` console command (same as `python -m launch.make_phantoms`)."""
    app.run(main)


if __name__ == "__main__":
    run()
