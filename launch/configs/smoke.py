"""Smoke config for tests: a tiny RSTN, a few steps, the built-in phantoms.

  python -m launch.train --config=launch/configs/smoke.py --workdir=/tmp/stn-smoke

Axial plane of fold 0 only; 4 phantom cases of 48 x 48 x 24 voxels; a
1/32-width pad-to-32 FCN-8s; S, I and J of 4 steps each, a checkpoint every
4 steps. Compiles in seconds and runs in well under a minute on 2 CPU cores.
"""

from stnjax.launch.configs.common import base_config


def get_config():
    c = base_config()
    c.name = "smoke"
    c.data.planes = "Z"
    c.data.folds = "0"
    c.data.buckets = (32, 64)
    c.data.batch_size = 2
    c.data.phantom.num_cases = 4
    c.data.phantom.shape = (48, 48, 24)
    c.data.phantom.spacing = (6.67, 6.67, 10.67)
    c.model.width = 1.0 / 32.0
    c.model.variant = "pad32"
    c.model.canvases = (64,)  # one canvas (the whole slice): one fine branch to compile
    c.model.margin = 4
    c.train.stages = "S:4,I:4,J:4"
    c.train.base_lr = 1e-3
    c.train.j_halving_every = 2
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.keep_checkpoints = 3
    c.train.guard_window = 2
    c.train.guard_coarse_loss = 1.0  # smoke: the guard never fires
    c.train.guard_max_restarts = 1
    return c
