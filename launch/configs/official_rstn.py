"""The official PyTorch RSTN models (twni2016/OrganSegRSTN_PyTorch), imported.

  python -m launch.convert_weights --official_rstn='FD0:XJ3_1_....pkl' --plane=X \
      --fold=0 --workdir=runs/official --data_dir=/data/nih-pancreas

writes this config into the workdir (`launch.evaluate` and `launch.segment`
then use it as for a trained run). It is `nih_pancreas` (the setting the
official models were trained with: full-width reference FCN-8s, the
two-layer 3 x 3 / 5 x 5 saliency, margin 20) with the official upsampling:
`model.upsampling = "stored"`, the three transposed convolutions of each
FCN-8s taken from the snapshot (the bilinear filter on the channel diagonal,
PyTorch's random initialisation off it, never trained), not Caffe's
per-channel bilinear, and the official voxel order:
`data.orientation = "official"`, every volume fed as the official pipeline
stored it (reference 1.1 - 1.2: a DICOM series as [row, column, slice by
InstanceNumber], a NIfTI's stored array transposed (1, 0, 2)), not
stnjax's canonical PLS. `--orientation=canonical` at conversion overrides it.
"""

from stnjax.launch.configs import nih_pancreas


def get_config():
    c = nih_pancreas.get_config()
    c.name = "official_rstn"
    c.model.upsampling = "stored"
    c.data.orientation = "official"
    return c
