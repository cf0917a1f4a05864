"""Training: state, optimiser, schedule, steps, checkpoints, loop.

Entry points (the spec made once from a config: TrainSpec.from_config):
  train(spec, workdir, overwrite=False)        every (fold, plane) of a spec
  train_run(spec, workdir, fold, plane)        one model
  load_trained_params(run_dir)                 params of a finished run (inference)

Modules: spec (TrainSpec, LoopSpec), schedule (stages, rate), optim (Caffe SGD, rate groups), state (the
train-state pytree), steps (one step per mode), placement (pmap over
several devices, jit on one), checkpoint (orbax),
inputs (dataset, slices, samplers, devices), workdir (layout, config identity,
metrics file), guard (the convergence guard), reporting (metrics records,
rates, the ETA), loop (the loop, resume).
"""

from stnjax.train.checkpoint import CheckpointError, Checkpointer, load_trained_params
from stnjax.train.guard import guard_decision
from stnjax.train.loop import TrainingDivergedError, initialize_distributed, train, train_run
from stnjax.train.schedule import Stage, lr_at, make_lr_schedule, parse_stages
from stnjax.train.spec import LoopSpec, TrainSpec
from stnjax.train.steps import MODE_FORWARD, MODE_TRAINABLE, OptimizerSpec, make_step

__all__ = [
    "CheckpointError", "Checkpointer", "load_trained_params", "TrainingDivergedError",
    "guard_decision", "initialize_distributed", "train", "train_run", "Stage", "lr_at",
    "make_lr_schedule", "parse_stages", "MODE_FORWARD", "MODE_TRAINABLE", "OptimizerSpec",
    "make_step", "LoopSpec", "TrainSpec",
]
