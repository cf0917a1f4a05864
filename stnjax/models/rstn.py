"""The RSTN: coarse FCN-8s, saliency transformation, fine FCN-8s.

Parameters are one plain pytree `{'coarse': ..., 'saliency': ..., 'fine': ...}`
(the inner Flax trees, without the 'params' wrapper). Every forward is a pure
function of (params, arrays, key); the `RSTN` object only holds the static
structure (the two modules and the crop settings), so it can be closed over
by `jit` and `pmap`.

Training modes (reference section 3.4); each returns full-size coarse and
fine probabilities for the joint loss:

| mode | fine input              | crop box from               | saliency |
| ---- | ----------------------- | --------------------------- | -------- |
| S    | raw image               | label (random margins)      | unused   |
| I    | image x g(coarse prob)  | label (random margins)      | trained  |
| J    | image x g(coarse prob)  | coarse prob >= 0.5, else label | trained |

Beyond the reference, `forward_j_rounds` unrolls mode J over R fine rounds
(train.unroll_rounds): round r > 1 takes its saliency input and crop box
from round r-1's fine map, under stop_gradient, as test-time rounds do.

The stage-wise baseline (Zhou et al. 2016) trains with the S forward for its
whole schedule: two independent networks, raw-image crops by the label box.

Test-time pieces (used by `stnjax.infer`, which also holds the oracles):
`coarse_prob` and `fine_round` (reference mode 'F': saliency from an
external score map, crop from an external mask; with the label as the mask
it is the ground-truth-crop oracle, mode 'O').

Every sample has its own box (not the reference's union box over a batch,
reference section 7, issue #12). Random margins and dropout masks are drawn
per sample from `fold_in(key, index)`, where `index` is the sample's position
in the global batch, so one device and eight devices draw the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stnjax.models import crop
from stnjax.checks import InputError, check_array, check_int, check_range
from stnjax.models.fcn8s import FCN8s, UPSAMPLINGS
from stnjax.models.norm import NORMS
from stnjax.models.saliency import Saliency, check_kernel_sizes

Params = dict[str, Any]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INITS = ("he", "pretrained")


class Outputs(NamedTuple):
    """What a training forward returns.

    coarse_prob, fine_prob: (B, H, W, 3) float32 sigmoid maps of the full
    slice; the fine map is 0 outside each sample's box. stats: dict of (B,)
    float32 per-sample counters: 'skipped' (no box: fine branch not run),
    'fallback' (J: the box came from the label because the prediction was
    empty), 'overflow' (the box was larger than the largest canvas and was
    cut), and 'box_area' (pixels of the crop box). fine_region: (B, H, W)
    bool, the pixels inside each sample's crop box (False when skipped).
    """
    coarse_prob: jax.Array
    fine_prob: jax.Array
    stats: dict[str, jax.Array]
    fine_region: jax.Array


@dataclasses.dataclass(frozen=True)
class RSTN:
    """Static structure of an RSTN; all numbers live in the params pytree.

    Attributes:
      fcn: the FCN-8s module used for both the coarse and the fine network.
      saliency: the saliency transformation module g.
      margin: crop margin K (test: all sides; training: see prob_fixed).
      prob_fixed: training probability that all four margins are K
        (otherwise each side is uniform in [0, 2K]).
      canvas_sizes: sides of the fine-crop canvases; the set for an image is
        these clamped to the image plus the full image (no overflow).
      init: "he" (from scratch) or "pretrained" (the reference scheme: body
        from `pretrained`, score heads zero, in both networks).
      pretrained: path of an .npz written by `launch.convert_weights`.
      init_prior: initial organ probability of both networks, set through
        the bias of the last score head (score_pool3 enters the output with
        gain 1 through the bilinear upsampling). 0.5 = the reference (zero
        heads). A small prior (e.g. 0.05) keeps a network trained from
        scratch out of the Dice loss's all-background collapse: with p
        small everywhere the gradient mostly raises the organ instead of
        lowering everything at once.
      remat_full_canvas: in training, recompute the fine network's forward
        on the full-image canvas in its backward rather than have every step
        write its residuals (`crop.fine_on_canvas(remat_full=...)`): the J
        step at full width, 256 x 256, about 5 % faster on CPU, and less
        memory; steps whose boxes need the full canvas pay a second fine
        forward. Same values either way.
    """
    fcn: FCN8s
    saliency: Saliency
    margin: int = 20
    prob_fixed: float = 0.5
    canvas_sizes: tuple[int, ...] = (128, 192, 256, 384, 512)
    init: str = "he"
    pretrained: str = ""
    init_prior: float = 0.5
    remat_full_canvas: bool = True

    @classmethod
    def from_config(cls, model: Mapping[str, Any]) -> "RSTN":
        """Builds the structure from `config.model` (see launch/configs/common.py)."""
        if model["dtype"] not in DTYPES:
            raise InputError(f"config.model.dtype: expected one of {sorted(DTYPES)}, "
                             f"got {model['dtype']!r}")
        if not 0.0 < float(model["init_prior"]) < 1.0:
            raise InputError(f"config.model.init_prior: expected a probability in (0, 1), "
                             f"got {model['init_prior']}")
        if model["init"] not in INITS:
            raise InputError(f"config.model.init: expected one of {INITS}, got {model['init']!r}")
        check_range(model["width"], "config.model.width", 0.0, 4.0, lo_open=True)
        check_range(model["dropout_rate"], "config.model.dropout_rate", 0.0, 1.0, hi_open=True)
        check_range(model["prob_fixed_margin"], "config.model.prob_fixed_margin", 0.0, 1.0)
        check_int(model["margin"], "config.model.margin", 0)
        canv = tuple(model["canvases"])
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in canv):
            raise InputError(f"config.model.canvases: expected positive int sizes, got {canv}")
        if len(tuple(model["saliency_bias"])) != 3:
            raise InputError(f"config.model.saliency_bias: expected 3 values (one per slice "
                             f"channel), got {tuple(model['saliency_bias'])}")
        check_kernel_sizes(tuple(model["saliency_kernels"]))
        # Absent from configs written before the field existed: Caffe's bilinear.
        upsampling = model.get("upsampling", "bilinear")
        if upsampling not in UPSAMPLINGS:
            raise InputError(f"config.model.upsampling: expected one of {UPSAMPLINGS}, "
                             f"got {upsampling!r}")
        # Absent from configs written before the field existed: no norm.
        norm = model.get("norm", "none")
        if norm not in NORMS:
            raise InputError(f"config.model.norm: expected one of {NORMS}, got {norm!r}")
        if norm != "none" and model["init"] == "pretrained":
            raise InputError("config.model.norm: the pretrained weights have no norm layers; "
                             "use norm 'none' with init 'pretrained'")
        if model["init"] == "pretrained" and not model["pretrained"]:
            raise InputError("config.model.pretrained: a weights file is needed when "
                             "config.model.init is 'pretrained'")
        fcn = FCN8s(num_outputs=3, width=float(model["width"]), variant=model["variant"],
                    dropout_rate=float(model["dropout_rate"]), dtype=DTYPES[model["dtype"]],
                    init_scheme="reference" if model["init"] == "pretrained" else "he",
                    in_channels=3, upsampling=upsampling, norm=norm)
        sal = Saliency(kernel_sizes=tuple(int(k) for k in model["saliency_kernels"]),
                       channels=3, last_bias=tuple(float(b) for b in model["saliency_bias"]))
        return cls(fcn=fcn, saliency=sal, margin=int(model["margin"]),
                   prob_fixed=float(model["prob_fixed_margin"]),
                   canvas_sizes=tuple(int(s) for s in model["canvases"]),
                   init=model["init"], pretrained=model["pretrained"],
                   init_prior=float(model["init_prior"]),
                   remat_full_canvas=bool(model.get("remat_full_canvas", True)))

    # ------------------------------------------------------------------ init
    def init_params(self, key: jax.Array, image_hw: tuple[int, int]) -> Params:
        """Fresh parameters: {'coarse', 'saliency', 'fine'} float32 trees.

        With init "pretrained" both FCNs get the same body weights from the
        file and zero score heads (reference section 2.2). Jit-able when
        `init` is "he" (the file read happens on the host).
        """
        k_coarse, k_sal, k_fine = jax.random.split(key, 3)
        x = jnp.zeros((1, int(image_hw[0]), int(image_hw[1]), 3), jnp.float32)
        coarse = self.fcn.init({"params": k_coarse}, x)["params"]
        fine = self.fcn.init({"params": k_fine}, x)["params"]
        sal = self.saliency.init(k_sal, x)["params"]
        if self.init == "pretrained":
            from stnjax.models import weights  # host-side file read
            body = weights.load_pretrained(self.pretrained)
            coarse = weights.assign_pretrained(coarse, body)
            fine = weights.assign_pretrained(fine, body)
        if self.init_prior != 0.5:
            shift = float(np.log(self.init_prior) - np.log1p(-self.init_prior))
            coarse, fine = (_shift_head(net, shift) for net in (coarse, fine))
        return {"coarse": coarse, "saliency": sal, "fine": fine}

    # ------------------------------------------------------------ primitives
    def fcn_logits(self, params: Params, x: jax.Array, keys: jax.Array | None = None,
                   valid_hw: jax.Array | None = None) -> jax.Array:
        """FCN-8s logits (B, H, W, 3) float32 of images x (B, H, W, 3).

        keys: None for evaluation (no dropout), or (B,) per-sample keys for
        training; each sample's dropout mask depends only on its own key.
        valid_hw: optional int32 (B, 2) real size of each sample's content at
        the top-left of x (a padded bucket or a canvas): the logits inside it
        then equal the network's on the unpadded content (FCN8s masking).
        """
        if keys is None or self.fcn.dropout_rate == 0.0:
            return self.fcn.apply({"params": params}, x, train=False, valid_hw=valid_hw)

        def one(xi, k, hw):
            hw = None if hw is None else hw[None]
            return self.fcn.apply({"params": params}, xi[None], train=True,
                                  rngs={"dropout": k}, valid_hw=hw)[0]
        if valid_hw is None:
            return jax.vmap(lambda xi, k: one(xi, k, None))(x, keys)
        return jax.vmap(one)(x, keys, valid_hw)

    def coarse_prob(self, params: Params, image: jax.Array,
                    valid_hw: jax.Array | None = None) -> jax.Array:
        """Coarse probabilities (B, H, W, 3) float32 (reference mode 'C');
        valid_hw as in `fcn_logits`."""
        return jax.nn.sigmoid(self.fcn_logits(params["coarse"], image, valid_hw=valid_hw))

    def saliency_weights(self, params: Params, prob: jax.Array,
                         hw: jax.Array | None = None) -> jax.Array:
        """g(prob): (B, H, W, 3) float32 weights for the image; hw: optional
        int32 (B, 2) real sizes of a padded bucket (`Saliency` masks to them,
        so padding does not change the weights inside)."""
        return self.saliency.apply({"params": params["saliency"]}, prob, hw)

    def canvases(self, image_hw: tuple[int, int]) -> crop.Canvases:
        """The canvas set for slices of `image_hw` (ends with the full size)."""
        return crop.canvases_for(image_hw, self.canvas_sizes)

    def fine_logits(self, params: Params, fine_in: jax.Array, boxes: jax.Array,
                    active: jax.Array, keys: jax.Array | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Fine network on each sample's box, pasted back to full size.

        Args:
          fine_in: (B, H, W, 3) the image to crop (raw or saliency-weighted).
          boxes: int32 (B, 4) crop boxes; active: bool (B,) samples to run.
          keys: per-sample dropout keys (training) or None.

        Returns:
          logits (B, H, W, 3) float32 (crop.FILL outside boxes and for
          inactive samples) and per-sample 'overflow' (B,) float32.
        """
        h, w = fine_in.shape[1:3]
        # pass_hw + valid_hw: the canvas run equals the fine network on the
        # variable-size crop of the box (the reference's crop), exactly.
        logits, info = crop.fine_on_canvas(
            lambda c, hw: self.fcn_logits(params["fine"], c, keys, valid_hw=hw), fine_in,
            boxes, self.canvases((h, w)), active=active, pass_hw=True,
            remat_full=self.remat_full_canvas)
        box_h = boxes[:, 1] - boxes[:, 0]
        box_w = boxes[:, 3] - boxes[:, 2]
        over = active & ((box_h > info["canvas_h"]) | (box_w > info["canvas_w"]))
        return logits, {"overflow": over.astype(jnp.float32)}

    # ------------------------------------------------------- training modes
    def _sample_keys(self, key: jax.Array, index: jax.Array) -> tuple[jax.Array, ...]:
        """Per-sample keys (coarse dropout, fine dropout, margins), each (B,)."""
        keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), 3))(index)
        return keys[:, 0], keys[:, 1], keys[:, 2]

    def _label_boxes(self, batch: Mapping[str, jax.Array], margins: jax.Array):
        boxes, nonempty = crop.boxes_from_maps(batch["label"], margins, hw=batch["hw"])
        return boxes, nonempty & (batch["weight"] > 0)

    def _train_forward(self, params: Params, batch: Mapping[str, jax.Array],
                       key: jax.Array, mode: str, rounds: int = 1) -> tuple[Outputs, ...]:
        """The training forward of `mode`: one Outputs per fine round.

        Round 1 is the reference's (module doc table). With rounds > 1 (mode J
        only, `forward_j_rounds`) round r > 1 reads its saliency input and its
        crop box (p >= 0.5, the same margins, the label's box when the map is
        empty) from round r-1's fine map under stop_gradient.
        """
        _check_batch(batch)
        image = batch["image"]
        k_coarse, k_fine, k_margin = self._sample_keys(key, batch["index"])
        coarse_prob = jax.nn.sigmoid(self.fcn_logits(params["coarse"], image, k_coarse,
                                                     valid_hw=batch["hw"]))
        margins = jax.vmap(lambda k: crop.random_margins(
            k, margin=self.margin, prob_fixed=self.prob_fixed))(k_margin)
        if mode == "J":
            # The box is not differentiable (reference 2.4): stop_gradient
            # makes that explicit for the coarse map it is read from.
            boxes, active, fallback = self._predicted_boxes(
                jax.lax.stop_gradient(coarse_prob), batch, margins)
        else:
            boxes, active = self._label_boxes(batch, margins)
            fallback = jnp.zeros(image.shape[0], bool)
        sal_in = None if mode == "S" else coarse_prob
        outs = [Outputs(coarse_prob, *self._fine_pass(params, batch, sal_in, boxes, active,
                                                      fallback, k_fine))]
        for r in range(2, rounds + 1):
            # What test-time round r reads from round r-1: its map (0 outside
            # its box) drives the saliency and gives the box; no gradient
            # flows back through these inputs.
            prev = jax.lax.stop_gradient(outs[-1].fine_prob)
            boxes, active, fallback = self._predicted_boxes(prev, batch, margins)
            k_r = jax.vmap(lambda k: jax.random.fold_in(k, r))(k_fine)
            outs.append(Outputs(coarse_prob, *self._fine_pass(params, batch, prev, boxes,
                                                              active, fallback, k_r)))
        return tuple(outs)

    def _predicted_boxes(self, ref: jax.Array, batch: Mapping[str, jax.Array],
                         margins: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """J boxes from ref (B, H, W, 3) >= 0.5, else the label's: int32
        (B, 4) boxes, bool (B,) active (a box and weight > 0), bool (B,)
        fallback (the label's box was used)."""
        boxes, source = jax.vmap(crop.box_with_fallback)(ref, batch["label"], margins,
                                                         batch["hw"])
        active = (source != crop.SOURCE_NONE) & (batch["weight"] > 0)
        return boxes, active, (source == crop.SOURCE_LABEL) & active

    def _fine_pass(self, params: Params, batch: Mapping[str, jax.Array],
                   sal_in: jax.Array | None, boxes: jax.Array, active: jax.Array,
                   fallback: jax.Array, keys: jax.Array
                   ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
        """The fine branch of a training round: image x g(sal_in) (raw image
        when sal_in is None) cropped by boxes int32 (B, 4). Returns the fine
        probability (B, H, W, 3) float32, the stats and the box region (B,
        H, W) bool of `Outputs`."""
        image = batch["image"]
        if sal_in is None:
            fine_in = image.astype(jnp.float32)
        else:
            fine_in = image * self.saliency_weights(params, sal_in, batch["hw"])
        logits, info = self.fine_logits(params, fine_in, boxes, active, keys)
        area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
        stats = {"skipped": (~active & (batch["weight"] > 0)).astype(jnp.float32),
                 "fallback": fallback.astype(jnp.float32),
                 "overflow": info["overflow"],
                 "box_area": jnp.where(active, area, 0).astype(jnp.float32)}
        h, w = image.shape[1:3]
        rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
        b = boxes[:, :, None, None]
        region = ((rows >= b[:, 0]) & (rows < b[:, 1]) & (cols >= b[:, 2]) & (cols < b[:, 3])
                  & active[:, None, None])
        return jax.nn.sigmoid(logits), stats, region

    def forward_s(self, params: Params, batch: Mapping[str, jax.Array],
                  key: jax.Array) -> Outputs:
        """Mode S: the fine net sees the raw image cropped by the label box;
        no gradient of the fine loss reaches the coarse net.

        batch: image (B,H,W,3) f32, label (B,H,W,3) f32, hw (B,2) int32 (real size),
        weight (B,) f32, index (B,) int32 (position in the global batch).
        """
        return self._train_forward(params, batch, key, "S")[0]

    def forward_i(self, params: Params, batch: Mapping[str, jax.Array],
                  key: jax.Array) -> Outputs:
        """Mode I: image x g(coarse prob), cropped by the label box; the fine
        loss reaches the coarse net through the saliency map."""
        return self._train_forward(params, batch, key, "I")[0]

    def forward_j(self, params: Params, batch: Mapping[str, jax.Array],
                  key: jax.Array) -> Outputs:
        """Mode J: image x g(coarse prob), cropped by the coarse prediction's
        box (the label's when the prediction is empty)."""
        return self._train_forward(params, batch, key, "J")[0]

    def forward_j_rounds(self, params: Params, batch: Mapping[str, jax.Array],
                         key: jax.Array, rounds: int) -> tuple[Outputs, ...]:
        """Mode J unrolled over `rounds` fine rounds (train.unroll_rounds;
        not in the reference): round 1 is `forward_j`; round r > 1 crops by
        the box of round r-1's fine map (p >= 0.5, the same margins; the
        label's box when that map is empty, as round 1 falls back) and feeds
        that map (0 outside its box, as test-time rounds feed the previous
        fused map) to the saliency, both under stop_gradient. Returns one
        Outputs per round (coarse_prob shared); rounds = 1 is (forward_j,).
        """
        return self._train_forward(params, batch, key, "J",
                                   check_int(rounds, "train.unroll_rounds", 1))

    # The stage-wise baseline uses the S forward throughout (see module doc).
    forward_stagewise = forward_s

    def forward(self, mode: str, params: Params, batch: Mapping[str, jax.Array],
                key: jax.Array) -> Outputs:
        """Dispatch by mode name: "S", "I", "J" or "stagewise"."""
        fns = {"S": self.forward_s, "I": self.forward_i, "J": self.forward_j,
               "stagewise": self.forward_stagewise}
        if mode not in fns:
            raise InputError(f"mode: expected one of {sorted(fns)}, got {mode!r}")
        return fns[mode](params, batch, key)

    # ------------------------------------------------------------ test time
    def fine_round(self, params: Params, image: jax.Array, score: jax.Array,
                   mask: jax.Array, *, hw: jax.Array | None = None,
                   use_saliency: bool = True) -> tuple[jax.Array, jax.Array]:
        """One fine pass on 3-slice windows (reference mode 'F').

        Args:
          image: (B, H, W, 3) float image windows.
          score: (B, H, W, 3) float map fed to the saliency transformation
            (previous round's fused probability).
          mask: (B, H, W, 3) map whose >= 0.5 box (margin K) is the crop.
          hw: optional int32 (B, 2) real size of a padded bucket (boxes are
            clamped to it, as the reference clamps to the image).
          use_saliency: False for the stage-wise baseline (raw crops).

        Returns:
          prob (B, H, W, 3) float32 (0 outside boxes and for windows whose
          mask is empty, which are skipped) and overflow (B,) float32.
        """
        boxes, active = crop.boxes_from_maps(mask, crop.fixed_margins(self.margin),
                                             hw=hw)
        fine_in = image * self.saliency_weights(params, score, hw) if use_saliency else image
        logits, info = self.fine_logits(params, fine_in.astype(jnp.float32), boxes, active)
        return jax.nn.sigmoid(logits), info["overflow"]


def _shift_head(net: Params, shift: float) -> Params:
    """A copy of FCN params with `shift` added to the score_pool3 bias."""
    head = net["score_pool3"]
    return {**net, "score_pool3": {**head, "bias": head["bias"] + shift}}


def _check_batch(batch: Mapping[str, jax.Array]) -> None:
    """Shape checks of a training batch at the API boundary."""
    for name in ("image", "label", "hw", "weight", "index"):
        if name not in batch:
            raise InputError(f"batch: missing {name!r} (has {sorted(batch)})")
    check_array(batch["image"], "batch['image']", rank=4, channels=3, dtype_kind="f",
                finite=True)
    b, h, w, _ = batch["image"].shape
    expect = {"label": (b, h, w, 3), "hw": (b, 2), "weight": (b,), "index": (b,)}
    for name, shape in expect.items():
        if tuple(batch[name].shape) != shape:
            raise InputError(f"batch[{name!r}]: expected shape {shape}, "
                             f"got {tuple(batch[name].shape)}")


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))

