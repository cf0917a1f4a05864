"""The paper's setting on NIH Pancreas-CT (reference sections 3.2 - 3.6).

  python -m launch.convert_weights --input fcn8s_from_caffe.pth \
      --output weights/fcn8s_pascal.npz
  python -m launch.train --config=launch/configs/nih_pancreas.py \
      --config.data.dir=/data/nih-pancreas --workdir=runs/nih [--config.data.folds=all]

Full-width FCN-8s with the 100-pixel padding ("reference" variant), both
networks from the PASCAL FCN-8s (score heads zero), float32; 512 x 512 axial
slices and 512 x L coronal / sagittal ones (L = 181..466 slices, padded to
the next of 256 .. 512 with a validity mask); batch 1, uniform sampling with
replacement (Caffe); S 10K -> I 30K -> J 40K steps, base rate 1e-5 with the
x1 / x2 / x10 / x20 groups, momentum 0.99, weight decay 5e-4, J halving the
rate every 10K; the convergence guard restarts S when its coarse loss is stuck
(reference lesson 1). The three planes are trained one after the other.

The dataset folder is made by the data tools (dataset.json of the DICOM
series and NIfTI labels); its folds.json is created by case id (01-20,
21-40, 41-61, 62-82) when absent. For bfloat16 convolutions add
--config.model.dtype=bfloat16; for several GPUs raise data.batch_size (it is
the global batch, split over all devices).
"""

from stnjax.launch.configs.common import base_config


def get_config():
    c = base_config()
    c.name = "nih_pancreas"
    c.data.dir = "/data/nih-pancreas"  # override with --config.data.dir
    c.data.fold_rule = "nih_pancreas"
    c.data.planes = "XYZ"
    c.data.folds = "0"
    c.data.buckets = (256, 320, 384, 448, 512)
    c.data.batch_size = 1
    c.data.order = "uniform"
    c.model.width = 1.0
    c.model.variant = "reference"
    c.model.init = "pretrained"
    c.model.pretrained = "weights/fcn8s_pascal.npz"
    c.train.method = "rstn"
    c.train.stages = "S:10000,I:30000,J:40000"
    c.train.base_lr = 1e-5
    c.train.j_halving_every = 10000
    c.train.log_every = 20
    c.train.checkpoint_every = 2000
    return c
