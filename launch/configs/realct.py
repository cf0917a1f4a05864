"""Real abdominal CT at 3 mm on 2 CPU cores: the pancreas, from scratch.

  python -m launch.make_dataset --out=/data/btcv --images=../shared/data/btcv9/images \\
      --labels=../shared/data/btcv9/labels --pair_by=number --organ_id=6
  python -m launch.train --config=launch/configs/realct.py --workdir=/tmp/stn-ct \\
      --config.data.dir=/data/btcv
  python -m launch.evaluate --workdir=/tmp/stn-ct

Every case is resampled to 3 mm in all three axes (`data.spacing`; the
reference trains on the native grid of NIH Pancreas-CT at ~0.8 mm): a BTCV
abdomen becomes about 120-170 pixels a side in-plane and 120-220 slices,
the pancreas 15-30 pixels across. Evaluation scores on the source grid.
Three folds by position (BTCV9: 6 training, 3 test cases a fold), all three
planes. Two shape buckets, 176 and 224, hold every view of those volumes
(largest 167 x 218 pixels) with at most two step programs per mode and plane
to compile (each 20-30 s on 2 cores).

The network and optimiser follow the phantom recipe (launch/configs/
phantom.py: why Adam, the cross-entropy term, the small initial prior and
no dropout are needed from scratch): a 1/16-width pad-to-32 FCN-8s. The
margin is 10 pixels (30 mm), as on the phantoms (the reference's 20 pixels
at 0.8 mm are 16 mm; 5 pixels left the small fine networks too little
context on the phantoms). Canvases up to 128 hold a pancreas box with its
margins; larger boxes take the full slice. Schedule S 1000 -> I 600 -> J
1000, J halving the rate every 500 steps, batch 2.

Measured on BTCV9 (bench/RESULTS.md, README "Real CT"): the per-fold
figures, and the time per plane on 2 cores. What other real cases show is
checked on cases kept aside, not tuned here.
"""

from ml_collections import config_dict

from stnjax.launch.configs.common import base_config, from_scratch_cpu


def get_config():
    c = from_scratch_cpu(base_config())
    c.name = "realct"
    # Required: --config.data.dir=<dataset folder> (unset is an error, not the phantoms).
    c.data.dir = config_dict.placeholder(str)
    c.data.spacing = (3.0, 3.0, 3.0)
    c.data.planes = "XYZ"
    c.data.folds = "0"
    c.data.n_folds = 3
    c.data.buckets = (176, 224)
    c.model.margin = 10
    c.model.canvases = (32, 64, 96, 128)
    c.train.stages = "S:1000,I:600,J:1000"
    c.train.j_halving_every = 500
    # Volumes of 120-220 voxels a side: buckets 32 apart keep the padding small.
    c.infer.volume_buckets = (64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
    return c
