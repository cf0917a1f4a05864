"""Evaluates trained RSTN models on the test cases of their folds.

  python -m launch.evaluate --config=launch/configs/phantom.py --workdir=/tmp/stn
  python -m launch.evaluate --config=launch/configs/nih_pancreas.py \
      --config.data.dir=/data/nih --config.data.folds=all --workdir=runs/nih

Per fold: <workdir>/eval/fold<f>/{cases.json, cases.csv, predictions/*.nii.gz};
over the folds: <workdir>/eval/{summary.txt, summary.json, sweep.csv, *.png}.
The summary is printed as in the paper. Use the config the models were
trained with (a different one is refused); inference settings
(--config.infer.*) may change freely. All logic lives in stnjax.experiment.
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from launch.logs import setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_NO_PREDICTIONS = flags.DEFINE_bool("no_predictions", False,
                                    "Do not write prediction NIfTI files.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from stnjax import experiment  # imports jax: after flag parsing
    from stnjax.checks import InputError
    from stnjax.train import inputs

    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    log = setup_logging(workdir / "eval" / "evaluate.log")
    try:
        records = []
        for fold in inputs.resolve_folds(config.data.folds, int(config.data.n_folds)):
            records += experiment.evaluate_fold(config, workdir, fold,
                                                write_predictions=not _NO_PREDICTIONS.value)
        text = experiment.report(records, workdir / "eval",
                                 thresholds=config.infer.report_thresholds,
                                 main_threshold=config.infer.threshold)
    except InputError as e:
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None
    print(text)


if __name__ == "__main__":
    app.run(main)
