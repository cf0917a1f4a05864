"""The stage-wise coarse-to-fine baseline (Zhou et al. 2016; reference 5.4).

  python -m launch.train --config=launch/configs/stagewise.py \
      --config.data.dir=/data/nih-pancreas --workdir=runs/c2f

Two independent FCN-8s, no saliency: the coarse network on whole slices and
the fine network on the raw image cropped by the ground-truth box (random
margins as in training RSTN), i.e. the S forward. Stage C trains only the
coarse network for 80K steps, then stage F only the fine one for 60K (C2F:
coarse 80K iterations at 1e-5, fine 60K at 1e-4; both momentum 0.99, weight
decay 5e-4, biases x2).

Rates: the loss is lam * L_coarse + (1 - lam) * L_fine with lam = 0.5, so
each network's gradient is half the gradient of its own Dice loss. The Caffe
update is linear in (g + wd * w): v <- m v + lr * mult * (0.5 g + wd' w)
= m v + (0.5 lr mult) (g + 2 wd' w). With the multipliers doubled
(2, 4, 20, 40) and wd' = 2.5e-4 this is exactly C2F's update: coarse
kernels 1e-5 (biases 2e-5), fine kernels 1e-4 (biases 2e-4), weight decay
5e-4, while the logged loss stays the plain mean of the two Dice losses.

Differences from C2F: both networks see the same sampled slices (C2F's fine
network used every positive slice, threshold 1; set data.slice_threshold to
compare), and the saliency module exists in the parameter tree but is
never trained or used. The convergence guard is for RSTN's S stage only.
"""

from stnjax.launch.configs.nih_pancreas import get_config as nih_config


def get_config():
    c = nih_config()
    c.name = "stagewise"
    c.train.method = "stagewise"
    c.train.stages = "C:80000,F:60000"
    c.train.coarse_weight = 0.5
    c.train.base_lr = 1e-5
    c.train.lr_mult = (2.0, 4.0, 20.0, 40.0)
    c.train.weight_decay = 2.5e-4
    c.train.guard_max_restarts = 0
    return c
