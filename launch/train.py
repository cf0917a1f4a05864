"""Trains RSTN models: one per (fold, plane) of the config, sequentially.

  python -m launch.train --config=launch/configs/phantom.py --workdir=/tmp/stn
  python -m launch.train --config=launch/configs/nih_pancreas.py \
      --config.data.dir=/data/nih --config.data.folds=all --workdir=runs/nih

Overrides: --config.FIELD=VALUE (a misspelt field is rejected, naming it).
The workdir gets the resolved config, package versions, train.log, and per
run <workdir>/fold<f>/<plane>/{checkpoints/, metrics.jsonl, run.json}.
Re-running the same command resumes from the latest checkpoints; a workdir of
another config is refused unless --overwrite. Compiled steps are cached in
<workdir>/jax_cache (--compilation_cache). Several hosts: --multihost (or
--config.train.multihost=true) calls jax.distributed.initialize() first
(TPU pods, SLURM, Open MPI detected; elsewhere add --coordinator=host:port
--num_processes=N --process_id=I). All logic lives in stnjax.train.
"""

from pathlib import Path

from absl import flags

from . import app

_CONFIG = app.define_config()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the runs.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Delete checkpoints of another config in the workdir.")
_HOSTS = app.define_host_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    app.no_arguments(argv)
    from stnjax.train import loop  # imports jax: after flag parsing
    from stnjax.train.spec import TrainSpec

    with app.exit_on_error():  # the config, read once here; nothing written yet
        spec = TrainSpec.from_config(_CONFIG.value)
    _HOSTS.start(spec.loop.multihost)
    workdir = Path(_WORKDIR.value)
    log = app.setup(workdir / "train.log", cache_base=workdir, primary=app.is_primary())
    with app.exit_on_error(log):
        summaries = loop.train(spec, workdir, overwrite=_OVERWRITE.value)
    for s in summaries:
        print(f"fold {s['fold']} plane {s['plane']}: {s['steps']} steps, "
              f"{len(s['restarts'])} restarts, loss {s.get('loss')}, {s['run_dir']}")


def run() -> None:
    """The `stnjax-train` console command (same as `python -m launch.train`)."""
    app.run(main)


if __name__ == "__main__":
    run()
