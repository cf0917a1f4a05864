"""Evaluates trained RSTN models on the test cases of their folds.

  python -m launch.evaluate --workdir=/tmp/stn     # the config stored there
  python -m launch.evaluate --config=launch/configs/phantom.py --workdir=/tmp/stn
  python -m launch.evaluate --config=launch/configs/nih_pancreas.py \
      --config.data.dir=/data/nih --config.data.folds=all --workdir=runs/nih

Per fold: <out>/fold<f>/{cases.json, cases.csv, predictions/*.nii.gz,
overlays/*.png (three slices through the organ, label and prediction outlined)};
over the folds: <out>/{summary.txt, summary.json, sweep.csv, *.png} and the
resolved config and package versions (config.json, versions.json). <out> is
<workdir>/eval unless --out names another folder, e.g. to compare inference
settings on the same models:

  python -m launch.evaluate --config=launch/configs/phantom.py --workdir=runs/phantom \
      --config.infer.saliency_input=coarse --out=runs/phantom/eval-coarse
The summary is printed as in the paper. Without --config the config the
models were trained with is used (stored in <workdir>/config.json); with
one, it must be the same config (a different one is refused); inference settings
(--config.infer.*) may change freely. cases.json is rewritten after every
case, and a re-run with the same settings resumes where an interrupted one
stopped (--noresume evaluates every case again).

Cases run one per local device at a time (--devices=N: the first N only),
and over several hosts with --multihost (as launch.train: SLURM, TPU pods,
or --coordinator=host:port --num_processes=N --process_id=I): each process
runs its share, writes the predictions of its cases, and process 0 merges
the records and writes the summary. The records are the same whatever the
device and process count (each names the device and process that ran it).
A host lost mid-run (no sign of life for --host_timeout seconds) stops the
others with an error naming it; the finished cases of every host are kept
and rerunning the same command resumes.
--split=train evaluates each fold's training cases instead (to tell a
generalisation gap from a fit that is poor everywhere); its default output
is <workdir>/eval-train.
All logic lives in stnjax.eval.runs.
"""

from pathlib import Path

from absl import flags

from . import app

_CONFIG = app.define_config(stored_default=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/eval).")
_RESUME = flags.DEFINE_bool(
    "resume", True, "Keep the cases an interrupted run with the same settings finished "
    "(--noresume: evaluate every case again).")
_NO_PREDICTIONS = flags.DEFINE_bool("no_predictions", False,
                                    "Do not write prediction NIfTI files.")
_LABEL = flags.DEFINE_string("label", None, "The method name of the records and summary "
                             "(--config.infer.label): name evaluations with different "
                             "settings so that launch.sweep compares them.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Local devices to run cases on (0: all).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "train"],
                           "The cases of each fold to evaluate: its test cases, or its "
                           "training cases (how well the models fit them; default "
                           "output <workdir>/eval-train).")
_HOSTS = app.define_host_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    app.no_arguments(argv)
    from stnjax.eval import runs  # imports jax: after flag parsing
    from stnjax.eval.spec import EvalSpec

    workdir = Path(_WORKDIR.value)
    # eval, eval-NAME, eval-train, eval-NAME-train
    parts = ["eval", _LABEL.value, "train" if _SPLIT.value == "train" else None]
    default_out = workdir / "-".join(p for p in parts if p)
    out = Path(_OUT.value) if _OUT.value else default_out
    with app.exit_on_error():
        spec = EvalSpec.from_config(_CONFIG.value)  # bad settings: before any output
        if _LABEL.value is not None:
            spec = spec.with_inference(label=_LABEL.value)
        runs.check_writable(out)
    _HOSTS.start(recoverable=True)
    # The cache in the output folder: evaluate leaves the training workdir alone.
    log = app.setup(out / "evaluate.log", cache_base=out, primary=app.is_primary())
    with app.exit_on_error(log):
        text = runs.evaluate_and_report(spec, workdir, out_dir=out,
                                        write_predictions=not _NO_PREDICTIONS.value,
                                        resume=_RESUME.value, devices=_DEVICES.value,
                                        split=_SPLIT.value)
    if app.is_primary():
        print(text)
        print(f"results in {out}")


def run() -> None:
    """The `stnjax-evaluate` console command (same as `python -m launch.evaluate`)."""
    app.run(main)


if __name__ == "__main__":
    run()
