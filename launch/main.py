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
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from launch import compile_cache, hugepages
from launch.logs import setup_logging

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).parent / "configs" / "phantom.py"), "Python config file.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/phantom", "Output folder.")
_ALSO = flags.DEFINE_list("also_saliency_inputs", ["coarse"],
                          "Also evaluate with these infer.saliency_input values.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from stnjax.eval import runs as experiment  # imports jax: after flag parsing
    from stnjax.checks import InputError
    from stnjax.train import loop

    config, workdir = _CONFIG.value, Path(_WORKDIR.value)
    log = setup_logging(workdir / "main.log")
    compile_cache.enable(workdir)
    try:
        # Bad names fail here, before any training.
        variants = experiment.saliency_variants(config, _ALSO.value)
        loop.train(config, workdir)
        text = experiment.evaluate_and_report(config, workdir, variants=variants)
    except (InputError, loop.TrainingDivergedError) as e:
        log.error("%s", e)
        raise SystemExit(f"error: {e}") from None
    print(text)
    print(f"results in {workdir / 'eval'}")


if __name__ == "__main__":
    hugepages.reexec_with_huge_pages()
    app.run(main)
