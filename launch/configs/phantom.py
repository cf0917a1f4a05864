"""The built-in synthetic dataset: trains on 2 CPU cores in minutes per plane.

  python -m launch.train --config=launch/configs/phantom.py --workdir=/tmp/stn-phantom

24 phantom cases (stnjax.phantom) of 96 x 96 x 48 voxels (3.3 x 3.3 x 5.3 mm),
written under the workdir; fold 0 (18 training cases, 6 test cases), all three planes.
A 1/16-width FCN-8s in the pad-to-32 variant, trained from scratch, which
the reference never does (it starts from PASCAL-pretrained bodies). Three
departures from the reference make that work on 2 CPU cores in minutes,
each a config field (the reference values are the defaults in common.py):
- train.optimizer = "adam" (base rate 5e-4, rate multipliers 1): Caffe SGD
  at 1e-5 stalls at the all-background start (coarse Dice loss ~0.99 for
  thousands of steps) and larger SGD rates collapse to an empty prediction
  (loss 1.0, where the Dice gradient vanishes);
- train.bce_weight = 0.5: a per-pixel cross-entropy beside each Dice term;
  with the Dice loss alone (summed over the 3 slice channels) whole output
  channels die at p = 0 and the 3-window average then never reaches 0.5;
- model.init_prior = 0.05 (initial organ probability) and no dropout.
Schedule S 600 -> I 600 -> J 600 (J halves the rate every 300 steps), batch
2. About 2-2.5 minutes per plane on 2 CPU cores (plane Y: 1, it reuses X's
compiled steps; with three fine rounds a J step, below; AMD EPYC,
2026-12-07), a third of it compiling the S, I and J steps. The schedule was 400 / 400 / 400 until the training step got
faster (issue 9); measured 2026-12-01 with seeds 0 and 1, the longer one
costs about a minute of the main job and raised the reference's mean DSC at
t = 0.99 from 42.3 / 38.9 % to 50.4 / 50.5 %, round 1 from 51.3 / 46.7 % to
53.6 / 54.5 % and the coarse stage from 41.9 / 42.7 % to 42.8 / 48.8 %
(bench/RESULTS.md).

Crop margin K = 10 pixels (33 mm; training draws margins in [0, 20]). The
reference's 20 pixels at ~0.8 mm rescaled to the phantom's 3.3 mm pixels
would be 5, but with 5 the coarse-to-fine rounds shrink the mask to nothing
on these small networks (measured 2026-11-26, main job, 6 test cases: coarse
40.5 %, round 1 29.2 %, round 10 0.0 % mean DSC); with 10: coarse 42.8 %,
rounds 1-2 51.7 %, round 10 39.5 %. A crop of a few FCN cells leaves the
fine network too little context at its edges. The canvases (32, 64, 96)
hold every box of a 96-pixel slice, so no crop is cut.

Three fine rounds per J step (train.unroll_rounds = 3, recurrent fine-stage
training, not in the paper; the reference trains one): rounds 2 and 3 take
their saliency input and crop from the previous round's fine map (under
stop-gradient), as the test-time rounds do. Main job, fold 0, AMD EPYC,
2026-12-07, reference inference, coarse / round 1 / round 10 / t = 0.99:
- one round (the reference): seed 0 43.3 / 54.5 / 47.2 / 47.2 %, seed 1
  round 10 1.5 points below round 1: the rounds degrade;
- two rounds: seed 0 45.1 / 55.2 / 55.6 / 55.6 %, but seed 1 51.4 % at
  t = 0.99 with round 10 3.6 points below round 1;
- three rounds: seed 0 44.7 / 55.4 / 55.7 / 55.8 %, seed 1 50.1 / 54.0 /
  53.6 / 53.6 %: with both seeds no round after round 1 is more than 0.5
  points below it (seed 1 gains 3.5 points over its coarse stage, seed 0
  11.1). J steps cost three fine passes (J about 3x slower; the main job
  about 2.5 minutes longer). bench/RESULTS.md has the measurements.
"""

from stnjax.launch.configs.common import base_config, from_scratch_cpu


def get_config():
    c = from_scratch_cpu(base_config())
    c.name = "phantom"
    c.data.dir = ""
    c.data.planes = "XYZ"
    c.data.folds = "0"
    c.data.phantom.num_cases = 24
    c.data.phantom.shape = (96, 96, 48)
    c.data.phantom.spacing = (320.0 / 96, 320.0 / 96, 256.0 / 48)
    c.data.buckets = (64, 96)
    c.model.margin = 10
    c.model.canvases = (32, 64, 96)
    c.train.stages = "S:600,I:600,J:600"
    c.train.j_halving_every = 300
    c.train.unroll_rounds = 3
    return c
