"""The main job: train on the built-in phantoms, evaluate, report.

  python -m launch.main --workdir=runs/phantom
  python -m launch.main --config=launch/configs/phantom.py --workdir=runs/phantom \
      --config.train.stages=S:100,I:200,J:200

Writes the phantom dataset, trains one RSTN per plane (all three planes,
fold 0 in the default config), evaluates the test cases (coarse-to-fine up
to 10 rounds, every round recorded) and prints the paper-style summary.
Outputs: <workdir>/fold0/<plane>/ (checkpoints, metrics.jsonl),
<workdir>/eval/ (summary.txt, cases.csv, sweep.csv, PNG plots, predictions).
Re-running resumes training and evaluation (finished cases are kept).

The same models are also evaluated with the saliency inputs named by
--also_saliency_inputs (default: "coarse", round 0's fused map in every
round; records in <workdir>/eval/fold<f>-<method>/, no predictions), and the
summary compares them with the reference setting case by case. Pass
--also_saliency_inputs= to skip.

With --baseline (the default) the job also trains the stage-wise baseline
(Zhou et al. 2016, the paper's Table 2 comparison) on the same data, model
and number of steps (`launch.configs.common.stagewise_baseline`: the two
networks trained independently, no saliency, ground-truth crops) in
<workdir>/stagewise, evaluates it with its own inference (majority vote,
raw-image crops) into <workdir>/eval/fold<f>-stagewise, and the summary
compares RSTN with it case by case. --nobaseline skips it.
"""

from pathlib import Path

from absl import flags

from . import app
from .configs.common import stagewise_baseline

_CONFIG = app.define_config(str(Path(__file__).parent / "configs" / "phantom.py"))
_WORKDIR = flags.DEFINE_string("workdir", "runs/phantom", "Output folder.")
_ALSO = flags.DEFINE_list("also_saliency_inputs", ["coarse"],
                          "Also evaluate with these infer.saliency_input values.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Also train and evaluate the stage-wise "
                              "baseline on the same data and budget (<workdir>/stagewise).")


def main(argv):
    app.no_arguments(argv)
    from stnjax.eval import runs  # imports jax: after flag parsing
    from stnjax.eval.spec import EvalSpec
    from stnjax.train import loop

    workdir = Path(_WORKDIR.value)
    log = app.setup(workdir / "main.log", cache_base=workdir)
    with app.exit_on_error(log):
        # The config is read here, once; bad fields and names fail before any training.
        spec = EvalSpec.from_config(_CONFIG.value)
        variants = runs.saliency_variants(spec, _ALSO.value)
        b_config = stagewise_baseline(_CONFIG.value) if _BASELINE.value else None
        if b_config is not None:
            EvalSpec.from_config(b_config)  # its bad fields fail now, before any training
        loop.train(spec.train, workdir)
        baselines = []
        if b_config is not None:
            b_spec = EvalSpec.from_config(_same_data(b_config, spec, workdir))
            loop.train(b_spec.train, workdir / "stagewise")
            baselines = [(b_spec, workdir / "stagewise")]
        text = runs.evaluate_and_report(spec, workdir, variants=variants, baselines=baselines)
    print(text)
    print(f"results in {workdir / 'eval'}")


def _same_data(config, spec, workdir: Path):
    """`config` reading RSTN's dataset folder and case cache (the phantom
    dataset RSTN's training wrote), not copies of its own."""
    from stnjax.train import inputs
    config.data.dir = str(inputs.dataset_dir(spec.train.data, workdir).resolve())
    config.data.cache_dir = str(Path(spec.train.data.cache_dir or workdir / "cache").resolve())
    return config


def run() -> None:
    """The `stnjax-main` console command (same as `python -m launch.main`)."""
    app.run(main)


if __name__ == "__main__":
    run()
