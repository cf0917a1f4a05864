"""Mean HU of each labelled organ per volume: how much contrast varies between scans.

  python -m bench.organ_hu --dataset=/tmp/btcv --organs=1:aorta,5:liver,6:pancreas,7:spleen,3:kidney_l

Reads a dataset made by `launch.make_dataset` (its dataset.json pairs every
image with its label) and prints, per case, the mean HU on the source grid
inside each listed label id, then the mean, the spread (standard deviation
between cases) and the range of each column, in HU and in units of the
network's input (the reference HU window, `preprocess.HU_WINDOW`, mapped
to [0, 1]). If the spread between
cases is much larger than the training augmentation's intensity range, a
test volume from a scan phase that no training volume shares is an input
the networks never saw; `data.augment.gain` was sized from this table
(bench/RESULTS.md, session 14).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from absl import app, flags

from stnjax.data import manifest
from stnjax.data.preprocess import HU_WINDOW

_DATASET = flags.DEFINE_string("dataset", None, "Folder with dataset.json (launch.make_dataset).")
_ORGANS = flags.DEFINE_string("organs", "1:aorta,5:liver,6:pancreas,7:spleen,3:kidney_l",
                              "id:name pairs, comma-separated.")


def parse_organs(text: str) -> list[tuple[int, str]]:
    """'1:aorta,6:pancreas' -> [(1, 'aorta'), (6, 'pancreas')]; a clear error otherwise."""
    out = []
    for part in text.split(","):
        ident, _, name = part.partition(":")
        if not ident.strip().isdigit() or not name.strip():
            raise SystemExit(f"--organs: expected id:name pairs, got {part!r}")
        out.append((int(ident), name.strip()))
    return out


def organ_means(image: np.ndarray, label: np.ndarray, ids: list[int]) -> list[float]:
    """Mean of `image` (any shape, HU) inside each id of `label` (same shape);
    NaN for an id the label lacks."""
    inside = [image[label == i] for i in ids]
    return [float(v.mean()) if v.size else float("nan") for v in inside]


def main(argv):
    del argv
    if not _DATASET.value:
        raise SystemExit("--dataset: required (a folder written by launch.make_dataset)")
    cases = manifest.load_manifest(_DATASET.value).cases
    organs = parse_organs(_ORGANS.value)
    ids = [i for i, _ in organs]
    print("case".ljust(16) + "".join(name.rjust(12) for _, name in organs))
    rows = []
    for case in cases:
        image = np.asarray(nib.load(case.image).get_fdata(), np.float32)
        label = np.asarray(nib.load(case.label).dataobj)
        rows.append(organ_means(image, label, ids))
        print(case.id.ljust(16) + "".join(f"{v:12.0f}" for v in rows[-1]))
    table = np.asarray(rows)
    for title, fn in (("mean", np.nanmean), ("sd between", np.nanstd),
                      ("min", np.nanmin), ("max", np.nanmax)):
        print(title.ljust(16) + "".join(f"{v:12.0f}" for v in fn(table, axis=0)))
    sd_units = np.nanstd(table, axis=0) / (HU_WINDOW[1] - HU_WINDOW[0])
    print("sd, [0,1] units".ljust(16) + "".join(f"{v:12.3f}" for v in sd_units))


if __name__ == "__main__":
    app.run(main)
