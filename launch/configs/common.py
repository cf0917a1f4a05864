"""The full config schema with the reference's defaults.

Every config file in this folder starts from `base_config()` and changes
fields; nothing adds new fields, so `--config.some_typo=1` is an error
(ConfigDict is locked) and every field has one documented meaning here.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """The reference setting (NIH Pancreas-CT, full-width FCN-8s)."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0

    # ---- data (stnjax.data) -------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.dir = ""               # dataset folder with dataset.json
    c.data.organ_id = -1          # -1: take it from dataset.json
    c.data.organ_ids = ()         # several ids merged into one organ, e.g. (1, 2); () = organ_id
    c.data.spacing = ()           # resample to (x, y, z) mm; () = the native grid (reference)
    c.data.orientation = "canonical"  # voxel order: "canonical" (PLS) or "official" (storage)
    c.data.hu_window = (-100.0, 240.0)
    c.data.planes = "XYZ"         # any subset, e.g. "Z" (axial only)
    c.data.folds = "0"            # "0", "0,2" or "all"
    c.data.n_folds = 4
    c.data.fold_rule = "position"  # folds.json when absent: "position" or "nih_pancreas" (by case id)
    c.data.slice_threshold = 0.98  # reference 1.6; > 1 means a pixel count
    c.data.negatives = 0.0        # organ-free training slices per organ slice (0: reference)
    c.data.buckets = (512,)       # pad slice sides up to these sizes
    c.data.batch_size = 1         # global batch (all devices, all hosts)
    c.data.order = "uniform"      # "uniform" (Caffe) or "epoch" (PyTorch)
    c.data.cache_dir = ""         # "": <workdir>/cache
    c.data.augment = _augment_section()
    # The built-in synthetic dataset, used when data.dir is empty.
    c.data.phantom = ml_collections.ConfigDict()
    c.data.phantom.num_cases = 8
    c.data.phantom.shape = (128, 128, 64)
    c.data.phantom.spacing = (0.8, 0.8, 2.5)
    c.data.phantom.seed = 0

    c.model = _model_section()

    # ---- training (stnjax.train) ----------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.method = "rstn"       # "rstn" (S -> I -> J) or "stagewise" (C2F)
    c.train.stages = "S:10000,I:30000,J:40000"
    c.train.optimizer = "sgd"     # "sgd" (Caffe, reference) or "adam" (from scratch)
    c.train.base_lr = 1e-5
    c.train.lr_mult = (1.0, 2.0, 10.0, 20.0)  # coarse W, coarse b, fine W, fine b
    c.train.momentum = 0.99
    c.train.weight_decay = 5e-4
    c.train.j_halving_every = 10000  # J halves the rate every this many steps
    c.train.coarse_weight = 1.0 / 3.0  # lambda
    c.train.bce_weight = 0.0      # cross-entropy beside the Dice terms (0: reference)
    # Fine rounds per J step (1: the reference). R > 1: round r also trains on the
    # saliency and crop of round r-1's own fine map (stop-gradient), as at test time.
    c.train.unroll_rounds = 1
    c.train.log_every = 20
    c.train.checkpoint_every = 2000
    c.train.keep_checkpoints = 3
    c.train.guard_window = 200    # convergence guard over the last steps of S
    c.train.guard_coarse_loss = 0.9  # restart S when its mean coarse loss is above
    c.train.guard_max_restarts = 3  # 0 disables the guard
    c.train.multihost = False     # call jax.distributed.initialize()
    c.train.devices = 0           # local devices per step; 0: all that divide the batch

    c.infer = _infer_section()
    return c


def _model_section() -> ml_collections.ConfigDict:
    """Both FCN-8s, the saliency module and the crop (stnjax.models)."""
    model = ml_collections.ConfigDict()
    model.width = 1.0           # channel multiplier of both FCN-8s
    model.variant = "reference"  # "reference" (pad 100) or "pad32"
    model.dtype = "float32"     # convolution compute dtype: or "bfloat16"
    model.dropout_rate = 0.5
    model.init = "he"           # "he" (from scratch) or "pretrained"
    model.pretrained = ""       # .npz from launch.convert_weights
    model.init_prior = 0.5      # initial organ probability (0.5: zero heads, reference)
    model.saliency_kernels = (3, 5)  # (k,) one layer; (3, 5) reference
    model.saliency_bias = (1.0, 1.5, 2.0)
    model.margin = 20           # crop margin K (test: fixed; train: random)
    model.prob_fixed_margin = 0.5  # training: P(all margins = K)
    model.canvases = (128, 192, 256, 384, 512)  # fine crop canvas sides
    model.remat_full_canvas = True  # training: recompute the full canvas's fine forward
    # Upsampling layers: "bilinear" (Caffe's per-channel bilinear, constants) or
    # "stored" (full channel kernels held in the params, frozen: the official
    # PyTorch models, imported with launch.convert_weights --official_rstn).
    model.upsampling = "bilinear"
    # "none" (reference) or "group": GroupNorm after every body conv (not in
    # the paper; stnjax/models/norm.py), for training from scratch.
    model.norm = "none"
    return model


def _augment_section() -> ml_collections.ConfigDict:
    """Random transforms of training samples (stnjax.data.augment); 0 = off (reference)."""
    augment = ml_collections.ConfigDict()
    augment.scale = 0.0         # zoom in [1/(1+s), 1+s]
    augment.rotate = 0.0        # in-plane rotation, +- degrees
    augment.shift = 0.0         # translation, +- fraction of the side
    augment.intensity = 0.0     # contrast 1 +- i, brightness +- i/2
    augment.gain = 0.0          # x [1/(1+g), 1+g] about the window's low end
    augment.elastic = 0.0       # smooth warp, nodes moved up to this many pixels
    return augment


def _infer_section() -> ml_collections.ConfigDict:
    """The inference settings (stnjax.infer; the reference's)."""
    infer = ml_collections.ConfigDict()
    infer.max_rounds = 10
    infer.threshold = 0.99      # stopping threshold t of the main result
    infer.report_thresholds = (0.90, 0.95, 0.98, 0.99)
    infer.run_all_rounds = True  # record every round (reference); False stops at t
    infer.batch_size = 8        # slices per forward pass
    infer.volume_buckets = (64, 128, 256, 320, 384, 448, 512)
    infer.lcc_threshold = 0.5
    infer.oracles = False       # also run the strong / weak oracles
    infer.quantize_coarse = True  # coarse maps through uint8, as the reference
    infer.per_round_timing = False  # rounds from the host, timed one by one
    # Saliency input of round r: "score" (previous fused probability, the reference
    # code), "mask" (previous binary mask, the paper) or "coarse" (round 0's map).
    infer.saliency_input = "score"
    # Beyond the reference: the largest-component filter on round 0's mask too.
    infer.coarse_lcc = False
    infer.label = ""  # records' method name ("": derived); launch.evaluate --label
    return infer


def from_scratch_cpu(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU-scale recipe of the phantom and real-CT configs, on `c`: a
    1/16-width pad-to-32 FCN-8s trained from scratch with Adam (5e-4, rate
    multipliers 1), a cross-entropy term beside each Dice term, an initial
    organ probability of 0.05 and no dropout (why each: launch/configs/
    phantom.py), batch 2, the convergence guard over 100 steps of S."""
    c.data.batch_size = 2
    c.model.width = 1.0 / 16.0
    c.model.variant = "pad32"
    c.model.init = "he"
    c.model.init_prior = 0.05
    c.model.dropout_rate = 0.0
    c.train.optimizer = "adam"
    c.train.base_lr = 5e-4
    c.train.bce_weight = 0.5
    c.train.lr_mult = (1.0, 1.0, 1.0, 1.0)
    c.train.log_every = 100
    c.train.checkpoint_every = 400
    c.train.guard_window = 100
    c.train.guard_coarse_loss = 0.97
    c.train.guard_max_restarts = 1
    c.infer.batch_size = 16
    return c


def stagewise_baseline(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The stage-wise baseline (Zhou et al. 2016) on the data, model, optimiser
    and budget of the RSTN config `c`: a copy with train.method "stagewise",
    one stage CF of as many steps as c's stages together (the two networks
    trained independently in each step, so each gets as many updates as in
    RSTN; no saliency, raw-image crops by the ground-truth box), an equal
    weight of the two losses, no convergence guard (it is for RSTN's S).
    Used by the main job; `stagewise.py` is the reference's own C -> F
    recipe for full-size SGD training."""
    b = ml_collections.ConfigDict(c.to_dict())
    # "S:600,I:600,J:600" -> 1800 (the spec checks the stages themselves).
    steps = sum(int(part.split(":")[1]) for part in c.train.stages.split(",") if ":" in part)
    b.name = f"{c.name}-stagewise"
    b.train.method = "stagewise"
    b.train.stages = f"CF:{steps}"
    b.train.coarse_weight = 0.5
    b.train.guard_max_restarts = 0
    b.train.unroll_rounds = 1  # J only: the baseline has no J stage
    return b
