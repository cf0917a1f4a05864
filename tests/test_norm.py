"""GroupNorm over a per-sample extent (`stnjax.models.norm`), against float64
NumPy statistics of the extent alone; the FCN-8s and config plumbing.

(The whole network with `norm="group"` on padded inputs against lone runs:
tests/test_fcn8s_valid.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch.configs import phantom
from stnjax.checks import InputError
from stnjax.models.fcn8s import FCN8s
from stnjax.models.norm import GroupNorm, masked_group_norm, num_groups
from stnjax.models.rstn import RSTN
from stnjax.train.optim import leaf_group


def _numpy_group_norm(x, groups, extent):
    """Per sample: the statistics of x[i, :h, :w] by groups, in float64,
    applied to the whole map."""
    x = np.asarray(x, np.float64)
    n, _, _, c = x.shape
    out = np.zeros_like(x)
    for i in range(n):
        h, w = extent[i]
        for g in range(groups):
            sl = slice(g * c // groups, (g + 1) * c // groups)
            part = x[i, :h, :w, sl]
            out[i, :, :, sl] = (x[i, :, :, sl] - part.mean()) / np.sqrt(part.var() + 1e-5)
    return out


@pytest.mark.parametrize("groups", [1, 3, 6])
def test_masked_statistics_equal_numpy_of_the_extent(groups):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 9, 7, 6)) * 3 + 2).astype(np.float32)
    extent = np.array([[9, 7], [4, 5], [1, 1]], np.int32)
    got = np.asarray(jax.jit(masked_group_norm, static_argnums=1)(x, groups, extent))
    want = _numpy_group_norm(x, groups, extent)
    for i, (h, w) in enumerate(extent):  # the extent itself (a 1 x 1 one: zeros)
        np.testing.assert_allclose(got[i, :h, :w], want[i, :h, :w], atol=2e-4, rtol=1e-4)
    # No extent: the whole map, the same as an extent of the full size.
    full = np.asarray(masked_group_norm(x, groups))
    np.testing.assert_allclose(full[0], got[0], atol=1e-5)
    np.testing.assert_allclose(full, _numpy_group_norm(x, groups, [(9, 7)] * 3),
                               atol=2e-4, rtol=1e-4)
    # What lies beyond the extent does not move the statistics.
    junk = x.copy()
    junk[1, 4:] = 1e3
    again = np.asarray(masked_group_norm(junk, groups, extent))
    np.testing.assert_allclose(again[1, :4, :5], got[1, :4, :5], atol=1e-6)


def test_empty_extent_gives_finite_zeros_and_groups_divide():
    x = np.ones((1, 4, 4, 8), np.float32)
    out = np.asarray(masked_group_norm(x, 2, np.array([[0, 4]], np.int32)))
    assert np.all(np.isfinite(out)) and np.all(out == 0)
    assert [num_groups(c) for c in (1, 4, 6, 8, 12, 32, 256)] == [1, 4, 6, 8, 6, 8, 8]
    with pytest.raises(InputError, match="divisible"):
        masked_group_norm(np.ones((1, 2, 2, 6), np.float32), 4)


def test_learned_scale_and_shift():
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 4)).astype(np.float32)
    mod = GroupNorm()
    params = mod.init(jax.random.key(0), x)["params"]
    assert set(params) == {"scale", "bias"} and params["scale"].shape == (4,)
    np.testing.assert_array_equal(params["scale"], 1.0)
    params = {"scale": jnp.arange(1.0, 5.0), "bias": jnp.full((4,), 0.5)}
    got = np.asarray(mod.apply({"params": params}, x))
    want = _numpy_group_norm(x, 4, [(5, 5)] * 2) * np.arange(1.0, 5.0) + 0.5
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_fcn_norm_layers_params_and_rate_groups():
    model = FCN8s(width=1 / 16, variant="pad32", norm="group")
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
    norms = sorted(k for k in params if k.endswith("_norm"))
    assert len(norms) == 15 and "fc7_norm" in norms and "score_fr_norm" not in norms
    assert params["conv1_1_norm"]["scale"].shape == (4,)
    assert leaf_group(("coarse", "conv1_1_norm", "scale")) == 1  # a bias: no decay
    assert leaf_group(("fine", "fc7_norm", "scale")) == 3
    with pytest.raises(InputError, match="norm"):
        model.clone(norm="batch").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_config_norm_field():
    c = phantom.get_config()
    assert c.model.norm == "none"
    c.model.norm = "group"
    assert RSTN.from_config(c.model).fcn.norm == "group"
    c.model.norm = "layer"
    with pytest.raises(InputError, match="config.model.norm"):
        RSTN.from_config(c.model)
    c.model.norm, c.model.init, c.model.pretrained = "group", "pretrained", "w.npz"
    with pytest.raises(InputError, match="pretrained weights have no norm"):
        RSTN.from_config(c.model)
