"""Inference: the pure, jit-able coarse-to-fine functions and the host driver.

Modules: rounds (coarse volume, fusion, the coarse-to-fine `while_loop`,
oracles, volume buckets: pure functions of arrays), segmenter (bucket
padding, ahead-of-time compilation, timing and checks around them).

The pure functions are importable from here (`from stnjax import infer;
infer.coarse_to_fine(...)`); the segmenter from `stnjax.infer.segmenter`.
"""

from stnjax.infer.rounds import (FUSIONS, SALIENCY_INPUTS, C2FResult, InferenceSpec, LoopState,
                                 coarse_plane_prob, coarse_probs, coarse_to_fine, fine_plane_prob,
                                 fine_round, finish, fuse, gt_crop_oracle, init_state, round_step,
                                 report_threshold, saliency_map, should_continue, strong_oracle,
                                 valid_mask, volume_bucket)

__all__ = [
    "FUSIONS", "SALIENCY_INPUTS", "C2FResult", "InferenceSpec", "LoopState",
    "coarse_plane_prob", "coarse_probs", "coarse_to_fine", "fine_plane_prob", "fine_round",
    "finish", "fuse", "gt_crop_oracle", "init_state", "report_threshold", "round_step",
    "saliency_map",
    "should_continue", "strong_oracle", "valid_mask", "volume_bucket",
]
