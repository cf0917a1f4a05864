"""One training step per mode, data-parallel with `jax.pmap` (or jitted on one device).

Modes (reference section 3.4; stage-wise baseline 5.4):

| mode | forward                   | trained networks         |
| ---- | ------------------------- | ------------------------ |
| S    | rstn.forward_s            | coarse, fine             |
| I    | rstn.forward_i            | coarse, saliency, fine   |
| J    | rstn.forward_j            | coarse, saliency, fine   |
| C    | rstn.forward_stagewise    | coarse                   |
| F    | rstn.forward_stagewise    | fine                     |
| CF   | rstn.forward_stagewise    | coarse, fine             |

Exactness across devices: with a global batch of B samples (padded slots
carry weight 0) spread over D devices, each device differentiates

    sum_{i on device} w_i * L_i  /  sum_{all i} w_i

(the denominator is a `psum` of the devices' weight totals and is data, not
a function of the params), and the gradients are `psum`med. The sum is the
gradient of the weighted mean loss of the global batch, so D devices give
the update of one device with the whole batch, up to float summation order.
(`pmean` of per-device mean gradients would weigh devices equally and be
wrong for a device with padded slots.) Metrics are (weighted sum, weight
count) pairs, `psum`med, so they are global too. Per-sample random keys are
`fold_in(step_key, index)` with `index` the sample's position in the global
batch, so the random margins and dropout do not depend on D.

Each step function is `jax.pmap(..., axis_name=AXIS)`; pmap caches its
compilation by input shapes, so a step compiles once per (plane bucket,
mode): the mode is a separate function and the plane enters through the
image shape.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from stnjax.checks import InputError, check_int, check_range
from stnjax.models.crop import extent_mask
from stnjax.train.losses import joint_loss, psum_metrics, rounds_joint_loss
from stnjax.train.optim import OPTIMIZERS, caffe_sgd, grouped_adam
from stnjax.train.schedule import Stage, make_lr_schedule, parse_stages

AXIS = "batch"

MODE_FORWARD = {"S": "forward_s", "I": "forward_i", "J": "forward_j",
                "C": "forward_stagewise", "F": "forward_stagewise",
                "CF": "forward_stagewise"}
MODE_TRAINABLE: dict[str, tuple[str, ...] | None] = {
    "S": ("coarse", "fine"), "I": None, "J": None,
    "C": ("coarse",), "F": ("fine",), "CF": ("coarse", "fine")}

BATCH_KEYS = ("image", "label", "hw", "weight")


# Modes whose step can unroll the fine network over several rounds
# (train.unroll_rounds): J alone crops by the network's own prediction, as
# test-time rounds do; S and I crop by the label box, where a second round
# would see the same box (and, in S, the same raw image).
UNROLLED_MODES = ("J",)


def fine_rounds(mode: str, unroll_rounds: int) -> int:
    """Fine rounds per step of `mode`: train.unroll_rounds in UNROLLED_MODES,
    else 1. Raises InputError naming train.unroll_rounds for a value that is
    not an int >= 1."""
    r = check_int(unroll_rounds, "train.unroll_rounds", 1)
    return r if mode in UNROLLED_MODES else 1


def make_step(rstn: Any, mode: str, tx: optax.GradientTransformation, *,
              lam: float, axis_name: str | None = AXIS, bce_weight: float = 0.0,
              unroll_rounds: int = 1) -> Callable:
    """The pure training step of one mode (not yet pmapped).

    Args:
      rstn: the model (forward functions `forward_s/i/j/stagewise(params,
        batch, key) -> Outputs(coarse_prob, fine_prob, stats)`).
      mode: one of MODE_FORWARD.
      tx: the optimiser for this mode
        (`OptimizerSpec.optimizer(MODE_TRAINABLE[mode])`).
      lam: the coarse loss weight (train.coarse_weight).
      axis_name: the pmap axis (None: a single-device step without
        collectives).
      bce_weight: weight of the cross-entropy terms (train.bce_weight, 0 =
        the reference; see losses.joint_loss).
      unroll_rounds: fine rounds per step in mode J (train.unroll_rounds;
        1 = the reference; other modes always run one, see `fine_rounds`).

    Returns:
      step(state, batch) -> (new_state, metrics). batch holds image
      (b, H, W, 3) f32, label (b, H, W, 3) f32, hw (b, 2) int32 (real sizes),
      weight (b,) f32 and index (b,) int32 (global batch positions); metrics
      maps 'loss', 'loss_coarse', 'loss_fine' and every model counter
      ('stat_<name>') to global (sum, count) float32 pairs; with R > 1
      rounds also 'loss_fine_r<r>' and round r > 1's counters
      ('stat_<name>_r<r>'), 'loss_fine' being the mean over rounds.
    """
    if mode not in MODE_FORWARD:
        raise InputError(f"mode: expected one of {sorted(MODE_FORWARD)}, got {mode!r}")
    objective = make_objective(rstn, mode, fine_rounds(mode, unroll_rounds), lam=lam,
                           axis_name=axis_name, bce_weight=bce_weight)

    def step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        (_, (metrics, stats)), grads = jax.value_and_grad(objective, has_aux=True)(
            state["params"], batch, key)
        w = batch["weight"].astype(jnp.float32)
        count = jnp.sum(w)
        for name, per_sample in sorted(stats.items()):
            metrics[f"stat_{name}"] = (jnp.sum(w * per_sample.astype(jnp.float32)), count)
        # Over one device the sums are the values: XLA:CPU still runs a 1-way
        # all-reduce of the whole gradient tree (1 GB at full width, about
        # 0.5-1 s a step), so it is left out. axis_size is static under pmap.
        if axis_name is not None and lax.axis_size(axis_name) > 1:
            grads = lax.psum(grads, axis_name)
            metrics = psum_metrics(metrics, axis_name)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                         opt_state=opt_state, step=state["step"] + 1)
        return new_state, metrics

    return step


def make_objective(rstn: Any, mode: str, rounds: int, *, lam: float, axis_name: str | None,
               bce_weight: float) -> Callable:
    """objective(params, batch, key) -> (loss, (metrics, stats)) of a step:
    the joint loss of the mode's forward, or with rounds > 1 (mode J) the
    mean over rounds of the fine term (`losses.rounds_joint_loss`)."""
    def loss_args(batch):
        # The loss is the one reduction that needs a pixel mask.
        valid = extent_mask(batch["hw"], batch["label"].shape[1:3])
        return dict(valid=valid, weight=batch["weight"], lam=lam, axis_name=axis_name,
                    bce_weight=bce_weight)

    if rounds == 1:
        forward = getattr(rstn, MODE_FORWARD[mode])

        def objective(params, batch, key):
            out = forward(params, batch, key)
            loss, metrics = joint_loss(out.coarse_prob, out.fine_prob, batch["label"],
                                       fine_region=out.fine_region, **loss_args(batch))
            return loss, (metrics, out.stats)
        return objective

    def unrolled(params, batch, key):
        outs = rstn.forward_j_rounds(params, batch, key, rounds)
        loss, metrics = rounds_joint_loss(
            outs[0].coarse_prob, [o.fine_prob for o in outs], batch["label"],
            fine_regions=[o.fine_region for o in outs], **loss_args(batch))
        stats = dict(outs[0].stats)
        for r, out in enumerate(outs[1:], start=2):
            stats.update({f"{name}_r{r}": v for name, v in out.stats.items()})
        return loss, (metrics, stats)
    return unrolled


def make_pmapped_steps(rstn: Any, modes: Sequence[str], make_tx: Callable[[str], Any], *,
                       lam: float, devices: Sequence[Any] | None = None,
                       donate: bool = True, bce_weight: float = 0.0,
                       unroll_rounds: int = 1) -> dict[str, Callable]:
    """`jax.pmap`ped steps for the given modes, over `devices` (default: local).

    make_tx(mode) -> the optax transformation of that mode. The state is
    donated (its buffers are reused), so callers must not reuse a state
    passed to a step.
    """
    out = {}
    for mode in modes:
        out[mode] = jax.pmap(
            make_step(rstn, mode, make_tx(mode), lam=lam, axis_name=AXIS,
                      bce_weight=bce_weight, unroll_rounds=unroll_rounds),
            axis_name=AXIS, devices=devices, donate_argnums=(0,) if donate else ())
    return out


class OptimizerSpec(NamedTuple):
    """The hashable optimiser settings of a run (config.train fields)."""

    stages: tuple[Stage, ...]
    base_lr: float
    j_halving_every: int
    momentum: float
    weight_decay: float
    lr_mult: tuple[float, ...]
    name: str = "sgd"

    @classmethod
    def from_config(cls, train: Mapping[str, Any]) -> "OptimizerSpec":
        """The spec of a config's `train` section (a mapping or ConfigDict)."""
        t = train
        if t["optimizer"] not in OPTIMIZERS:
            raise InputError(f"train.optimizer: expected one of {OPTIMIZERS}, "
                             f"got {t['optimizer']!r}")
        if len(t["lr_mult"]) != 4:
            raise InputError(f"train.lr_mult: expected 4 multipliers (coarse W, coarse b, "
                             f"fine W, fine b), got {tuple(t['lr_mult'])}")
        check_range(t["base_lr"], "train.base_lr", 0.0, lo_open=True)
        check_range(t["momentum"], "train.momentum", 0.0, 1.0, hi_open=True)
        check_range(t["weight_decay"], "train.weight_decay", 0.0)
        for i, m in enumerate(t["lr_mult"]):
            check_range(m, f"train.lr_mult[{i}]", 0.0)
        check_int(t["j_halving_every"], "train.j_halving_every", 1)
        return cls(parse_stages(t["stages"], t["method"]), float(t["base_lr"]),
                   int(t["j_halving_every"]), float(t["momentum"]), float(t["weight_decay"]),
                   tuple(float(m) for m in t["lr_mult"]), str(t["optimizer"]))

    def schedule(self) -> Callable:
        return make_lr_schedule(self.stages, self.base_lr, self.j_halving_every)

    def optimizer(self, trainable=None) -> optax.GradientTransformation:
        """`caffe_sgd` (or `grouped_adam`) with these settings and the given
        trainable networks."""
        if self.name == "adam":
            return grouped_adam(self.schedule(), weight_decay=self.weight_decay,
                                lr_mult=self.lr_mult, trainable=trainable)
        return caffe_sgd(self.schedule(), momentum=self.momentum,
                         weight_decay=self.weight_decay, lr_mult=self.lr_mult,
                         trainable=trainable)


@functools.lru_cache(maxsize=32)
def pmapped_step(rstn: Any, mode: str, spec: OptimizerSpec, lam: float,
                 devices: tuple, bce_weight: float = 0.0, unroll_rounds: int = 1) -> Callable:
    """The pmapped step of one mode over `devices`, cached.

    Runs with the same model, optimiser, loss weight and devices (other
    folds of a config, guard restarts, tests) get the same function object
    and so reuse pmap's compilations (pmap caches by input shapes per
    function object).
    """
    return make_pmapped_steps(rstn, [mode], lambda m: spec.optimizer(MODE_TRAINABLE[m]),
                              lam=float(lam), devices=list(devices),
                              bce_weight=float(bce_weight),
                              unroll_rounds=unroll_rounds)[mode]


@functools.lru_cache(maxsize=32)
def jitted_step(rstn: Any, mode: str, spec: OptimizerSpec, lam: float, device: Any,
                bce_weight: float = 0.0, unroll_rounds: int = 1) -> Callable:
    """The step of one mode on one device: `jax.jit` of `make_step` without
    collectives, the state donated; cached like `pmapped_step`.

    Takes and returns arrays without a device axis (placement.OneDevice);
    a one-device pmap is slower on CPU (see placement.py)."""
    fn = make_step(rstn, mode, spec.optimizer(MODE_TRAINABLE[mode]), lam=float(lam),
                   axis_name=None, bce_weight=float(bce_weight), unroll_rounds=unroll_rounds)
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.jit(fn, donate_argnums=(0,), out_shardings=sharding)


def shard_batch(batch: Mapping[str, Any], num_devices: int, *,
                global_offset: int = 0) -> dict[str, np.ndarray]:
    """Splits a host batch over local devices and adds global indices.

    Args:
      batch: the sampler's dict of arrays with a leading batch axis b (this
        host's share of the global batch).
      num_devices: local devices; b must be a multiple of it.
      global_offset: the global batch position of this host's first sample
        (process_index * b when hosts take contiguous shares).

    Returns:
      The arrays reshaped to (num_devices, b // num_devices, ...), plus
      'index' int32 (num_devices, b // num_devices), the global positions.
    """
    for k in BATCH_KEYS:
        if k not in batch:
            raise InputError(f"batch: missing key {k!r} (has {sorted(batch)})")
    b = int(np.shape(batch["image"])[0])
    if b % num_devices:
        raise InputError(
            f"data.batch_size: the per-host batch {b} is not a multiple of the "
            f"{num_devices} local devices")
    per = b // num_devices
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim == 0 or v.shape[0] != b:
            continue  # host-side metadata (e.g. the bucket), not per sample
        out[k] = v.reshape((num_devices, per) + v.shape[1:])
    out["index"] = (global_offset + np.arange(b, dtype=np.int32)).reshape(num_devices, per)
    return out


def first_replica(metrics: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Host values of pmapped metrics (identical on every device after psum).

    Reads this process's first device only, so it also works when the
    outputs span several hosts (not fully addressable).
    """
    def one(x):
        if hasattr(x, "addressable_shards"):
            return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
        return np.asarray(x)[0]

    return {k: (one(s), one(c)) for k, (s, c) in metrics.items()}
