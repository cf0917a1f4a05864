"""The built-in synthetic dataset: trains on 2 CPU cores in minutes per plane.

  python -m launch.train --config=launch/configs/phantom.py --workdir=/tmp/stn-phantom

8 phantom cases (stnjax.phantom) of 96 x 96 x 48 voxels (3.3 x 3.3 x 5.3 mm),
written under the workdir; fold 0 (6 training cases), all three planes.
A 1/16-width FCN-8s in the pad-to-32 variant, trained from scratch (He
init), so the rate is far above the reference's 1e-5 (which assumes
PASCAL-pretrained bodies), with the reference's optimiser otherwise
(momentum 0.99, x1 / x2 / x10 / x20 groups); a short S 300 -> I 600 -> J 600
schedule with the rate halved every 200 steps of J; crop margin 5 pixels (the
reference's 20 pixels at ~0.8 mm, rescaled to the phantom's ~3.3 mm pixels).
About 1.5 minutes per plane on 2 CPU cores (half of it compiling S, I, J).
The guard only catches a coarse loss still at ~0.98 after S (one restart).
Not tuned yet for accuracy: from scratch the coarse Dice loss falls slowly
(about 0.96 after 600 steps at this rate; at 1e-2 it collapsed to an empty
prediction, loss 1.0).
"""

from launch.configs.common import base_config


def get_config():
    c = base_config()
    c.name = "phantom"
    c.data.dir = ""
    c.data.planes = "XYZ"
    c.data.folds = "0"
    c.data.phantom.num_cases = 8
    c.data.phantom.shape = (96, 96, 48)
    c.data.phantom.spacing = (320.0 / 96, 320.0 / 96, 256.0 / 48)
    c.data.buckets = (64, 96)
    c.data.batch_size = 2
    c.model.width = 1.0 / 16.0
    c.model.variant = "pad32"
    c.model.init = "he"
    c.model.margin = 5
    c.model.canvases = (32, 64)
    c.train.stages = "S:300,I:600,J:600"
    c.train.base_lr = 3e-3
    c.train.j_halving_every = 200
    c.train.log_every = 50
    c.train.checkpoint_every = 300
    c.train.guard_window = 50
    c.train.guard_coarse_loss = 0.98
    c.train.guard_max_restarts = 1
    return c
