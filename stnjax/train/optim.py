"""The reference optimiser: Caffe SGD with momentum, four rate groups.

Update rule (Caffe `SGDSolver`, reference section 3.2), per parameter w with
gradient g, group multiplier m_g and weight decay d_g:

    v <- momentum * v + lr(step) * m_g * (g + d_g * w)
    w <- w - v

The learning rate sits INSIDE the momentum buffer. `optax.sgd(lr, momentum)`
instead keeps `v <- momentum * v + g` and steps by `lr * v`; the two agree
while the rate is constant and differ after a rate change (J halves the
rate: Caffe's buffer still carries the momentum of the old, larger steps and
decays it; optax would rescale the whole buffer at once). We follow Caffe.

Groups, by path in the RSTN parameter tree {'coarse', 'saliency', 'fine'}:

| group | leaves                          | rate multiplier | weight decay |
| ----- | ------------------------------- | --------------- | ------------ |
| 0     | coarse/**/kernel                | lr_mult[0] (1)  | weight_decay |
| 1     | coarse/**/bias                  | lr_mult[1] (2)  | 0            |
| 2     | saliency|fine/**/kernel         | lr_mult[2] (10) | weight_decay |
| 3     | saliency|fine/**/bias           | lr_mult[3] (20) | 0            |

A normalisation layer's `scale` (`FCN8s(norm="group")`) is in its network's
bias group.

The bilinear upsampling layers are constants of the model, not parameters,
so they are frozen by construction; with `model.upsampling = "stored"` their
kernels are params (`<net>/upscore*/kernel`), and those leaves are frozen
here: a zero update, no weight decay, the slots kept (`frozen_leaf`). A mode may also freeze whole top-level
networks (`trainable`): a frozen leaf gets a zero update and keeps its
momentum buffer unchanged. This is how S leaves the unused saliency module
alone (as the PyTorch port, which skips parameters without a gradient;
Caffe would still apply weight decay to it, about 5 % shrink over 10K steps,
reference 3.2) and how the stage-wise baseline trains one network at a time.
One optimiser state is carried across all stages (reference 3.2). The state
is a plain dict {'count': int32 (), 'velocity': float32 tree like params}, so
orbax saves and restores it as is.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Sequence

import jax
import jax.numpy as jnp
import optax

from stnjax.checks import InputError
from stnjax.models.fcn8s import UPSAMPLING_LAYERS

TOP_LEVEL = ("coarse", "saliency", "fine")
GROUP_NAMES = ("coarse_kernel", "coarse_bias", "fine_kernel", "fine_bias")


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_group(path: Sequence[Any]) -> int:
    """The rate group (0..3, see the module docstring) of one parameter path.

    Raises InputError naming the path when it is neither under 'coarse',
    'saliency' or 'fine' nor a leaf called 'kernel', 'bias' or 'scale'.
    """
    names = [_key_name(k) for k in path]
    where = "/".join(names)
    if not names or names[0] not in TOP_LEVEL:
        raise InputError(
            f"params: leaf {where!r} is not under one of {TOP_LEVEL}; "
            "cannot assign a learning-rate group")
    leaf = names[-1]
    if leaf not in ("kernel", "bias", "scale"):
        raise InputError(
            f"params: leaf {where!r} is neither a 'kernel', a 'bias' nor a norm's 'scale'; "
            "cannot assign a learning-rate group")
    fine = names[0] != "coarse"
    # A norm's scale goes with the biases: no weight decay (it multiplies a
    # normalised map; decaying it towards 0 would switch the layer off).
    return 2 * int(fine) + int(leaf != "kernel")


def param_groups(params: Any) -> Any:
    """A tree like `params` holding each leaf's group index (Python ints)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: leaf_group(p), params)


def frozen_leaf(path: Sequence[Any]) -> bool:
    """Is the leaf one of an FCN's upsampling layers (`FCN8s.upsampling="stored"`:
    `<net>/upscore*/kernel`), which are never trained."""
    names = [_key_name(k) for k in path]
    return len(names) >= 3 and names[-2] in UPSAMPLING_LAYERS


def trainable_tree(params: Any, trainable: Collection[str] | None) -> Any:
    """A tree like `params` of Python bools: is the leaf trained (its network
    is in `trainable`, None = all, and it is not a frozen upsampling kernel)."""
    if trainable is not None:
        bad = set(trainable) - set(TOP_LEVEL)
        if bad:
            raise InputError(f"trainable: unknown networks {sorted(bad)}; expected {TOP_LEVEL}")

    def f(path, _):
        return (trainable is None or _key_name(path[0]) in trainable) and not frozen_leaf(path)

    return jax.tree_util.tree_map_with_path(f, params)


OPTIMIZERS = ("sgd", "adam")


def _grouped(init_slots: Callable[[Any], dict], leaf_update: Callable, *,
             weight_decay: float, lr_mult: Sequence[float],
             trainable: Collection[str] | None, schedule: Callable,
             name: str) -> optax.GradientTransformation:
    """Shared machinery of the grouped optimisers.

    The state is {'count': int32 (), <slot>: float32 tree like params, ...}.
    For each trainable leaf, `leaf_update(g_eff, slots, lr, count)` gets the
    decayed gradient g + d_g * w, its slot values and the group's rate
    (base rate x multiplier), and returns (update, new slot values); frozen
    leaves get a zero update and keep their slots.
    """
    if len(lr_mult) != 4:
        raise InputError(f"train.lr_mult: expected 4 multipliers, got {tuple(lr_mult)}")
    mults = tuple(float(m) for m in lr_mult)

    def init(params):
        param_groups(params)  # fails early on an unexpected tree
        return {"count": jnp.zeros([], jnp.int32), **init_slots(params)}

    def update(grads, state, params=None):
        if params is None:
            raise InputError(f"{name}: update needs params (weight decay)")
        path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        g_leaves = treedef.flatten_up_to(grads)
        slot_names = [k for k in state if k != "count"]
        slot_leaves = [treedef.flatten_up_to(state[k]) for k in slot_names]
        lr = schedule(state["count"]).astype(jnp.float32)
        on_leaves = treedef.flatten_up_to(trainable_tree(params, trainable))
        count = state["count"] + 1
        upd, new_slots = [], [[] for _ in slot_names]
        for i, ((path, w), g, train) in enumerate(zip(path_leaves, g_leaves, on_leaves)):
            slots = [sl[i] for sl in slot_leaves]
            if not train:
                # Frozen network: no step and the optimiser slots are kept.
                u = jnp.zeros_like(w)
            else:
                group = leaf_group(path)
                d = weight_decay if group % 2 == 0 else 0.0
                g_eff = g.astype(jnp.float32) + d * w.astype(jnp.float32)
                u, slots = leaf_update(g_eff, slots, lr * mults[group], count)
                u = u.astype(w.dtype)
            upd.append(u)
            for k, v in enumerate(slots):
                new_slots[k].append(v)
        new_state = {"count": count}
        for k, nm in enumerate(slot_names):
            new_state[nm] = jax.tree_util.tree_unflatten(treedef, new_slots[k])
        return jax.tree_util.tree_unflatten(treedef, upd), new_state

    return optax.GradientTransformation(init, update)


def _zeros_like_tree(params: Any) -> Any:
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def caffe_sgd(
    schedule: Callable[[jax.Array], jax.Array],
    *,
    momentum: float = 0.99,
    weight_decay: float = 5e-4,
    lr_mult: Sequence[float] = (1.0, 2.0, 10.0, 20.0),
    trainable: Collection[str] | None = None,
) -> optax.GradientTransformation:
    """Caffe SGD as an optax transformation (see the module docstring).

    Args:
      schedule: fn(count) -> base rate, float32 scalar (count = number of
        updates so far = the train step, since every step updates).
      momentum: the momentum (reference 0.99).
      weight_decay: L2 decay on kernels only (reference 5e-4).
      lr_mult: the four group multipliers (coarse kernel, coarse bias,
        saliency/fine kernel, saliency/fine bias).
      trainable: top-level networks that are updated; None = all. Optimisers
        with different `trainable` share one state structure, so a run
        switches between them across stages with a single state.

    Returns:
      An `optax.GradientTransformation`; `update` needs `params` and returns
      updates to add to the params (`optax.apply_updates`). State:
      {'count', 'velocity'}.
    """
    def leaf(g, slots, lr, count):
        del count
        v_new = momentum * slots[0] + lr * g
        return -v_new, [v_new]

    return _grouped(lambda p: {"velocity": _zeros_like_tree(p)}, leaf,
                    weight_decay=weight_decay, lr_mult=lr_mult, trainable=trainable,
                    schedule=schedule, name="caffe_sgd")


def grouped_adam(
    schedule: Callable[[jax.Array], jax.Array],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 5e-4,
    lr_mult: Sequence[float] = (1.0, 2.0, 10.0, 20.0),
    trainable: Collection[str] | None = None,
) -> optax.GradientTransformation:
    """Adam with the same rate groups, kernel-only L2 decay (added to the
    gradient, as Caffe's AdamSolver) and frozen networks as `caffe_sgd`.

    Not the reference: offered for training from scratch (no pretrained
    body), where SGD on the Dice loss stalls at the all-background start
    (the built-in phantom config uses it; see launch/configs/phantom.py).
    State: {'count', 'mu', 'nu'}; bias-corrected by the global count.
    """
    def leaf(g, slots, lr, count):
        mu = b1 * slots[0] + (1 - b1) * g
        nu = b2 * slots[1] + (1 - b2) * g * g
        t = count.astype(jnp.float32)
        mhat = mu / (1 - b1 ** t)
        vhat = nu / (1 - b2 ** t)
        return -lr * mhat / (jnp.sqrt(vhat) + eps), [mu, nu]

    return _grouped(lambda p: {"mu": _zeros_like_tree(p), "nu": _zeros_like_tree(p)}, leaf,
                    weight_decay=weight_decay, lr_mult=lr_mult, trainable=trainable,
                    schedule=schedule, name="grouped_adam")
