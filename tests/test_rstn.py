"""RSTN forward modes: structure, shapes, gradient paths, per-sample randomness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch.configs.common import base_config
from stnjax.train import losses
from stnjax.checks import InputError
from stnjax.models.rstn import RSTN, count_params

H = W = 48


def small_rstn(**model):
    cfg = base_config().model
    cfg.width = 1 / 16
    cfg.variant = "pad32"
    cfg.dropout_rate = 0.5
    cfg.canvases = (16, 32)  # and the full 48: a sub-batch may pick another canvas
    cfg.margin = 4
    for k, v in model.items():
        setattr(cfg, k, v)
    return RSTN.from_config(cfg)


def make_batch(b=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (b, H, W, 3)).astype(np.float32)
    label = np.zeros((b, H, W, 3), np.float32)
    for i in range(b):  # a different small organ per sample
        r, c = 8 + 6 * i, 10 + 5 * i
        label[i, r:r + 7, c:c + 9, :] = 1.0
    return {"image": jnp.asarray(image), "label": jnp.asarray(label),
            "hw": jnp.full((b, 2), jnp.asarray([H, W]), jnp.int32), "weight": jnp.ones((b,), jnp.float32),
            "index": jnp.arange(b, dtype=jnp.int32)}


@pytest.fixture(scope="module")
def model_and_params():
    rstn = small_rstn()
    params = jax.jit(rstn.init_params, static_argnums=1)(jax.random.key(0), (H, W))
    return rstn, params


def test_full_size_structure_and_count():
    """Two reference FCN-8s (134,275,145 each) + 312 saliency parameters."""
    cfg = base_config().model
    rstn = RSTN.from_config(cfg)
    shapes = jax.eval_shape(lambda k: rstn.init_params(k, (512, 512)), jax.random.key(0))
    assert set(shapes) == {"coarse", "saliency", "fine"}
    assert count_params(shapes["coarse"]) == 134_275_145
    assert count_params(shapes["fine"]) == 134_275_145
    assert count_params(shapes["saliency"]) == 3 * 3 * 3 * 3 + 3 + 5 * 5 * 3 * 3 + 3
    assert count_params(shapes) == 268_550_602


@pytest.mark.parametrize("mode", ["S", "I", "J"])
def test_modes_shapes_and_fine_zero_outside_box(model_and_params, mode):
    rstn, params = model_and_params
    batch = make_batch()
    out = jax.jit(lambda p, b, k: rstn.forward(mode, p, b, k))(params, batch, jax.random.key(1))
    assert out.coarse_prob.shape == out.fine_prob.shape == (2, H, W, 3)
    assert out.coarse_prob.dtype == jnp.float32
    for v in out.stats.values():
        assert v.shape == (2,)
    if mode != "J":  # label box with margins <= 2K: nothing beyond it
        lab = np.asarray(batch["label"]).any(-1)
        for i in range(2):
            rows, cols = np.nonzero(lab[i])
            far = np.ones((H, W), bool)
            far[max(rows.min() - 8, 0):rows.max() + 9, max(cols.min() - 8, 0):cols.max() + 9] = False
            assert np.all(np.asarray(out.fine_prob[i])[far] == 0.0)


def _fine_loss_grad_to_coarse(rstn, params, mode):
    rstn = small_rstn(canvases=())  # same params; one canvas branch compiles faster
    batch = make_batch()

    def fine_loss(p):
        out = rstn.forward(mode, p, batch, jax.random.key(2))
        return jnp.mean(losses.soft_dice_loss(out.fine_prob, batch["label"]))

    g = jax.jit(jax.grad(fine_loss))(params)
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g["coarse"]))


def test_gradient_paths(model_and_params):
    """Fine loss reaches the coarse net through the saliency in I and J, not in S."""
    rstn, params = model_and_params
    # At the reference init the last saliency layer has zero weights, so its
    # output does not depend on the coarse map yet; give it some weight, as
    # any training step does.
    sal = dict(params["saliency"])
    k = sal["saliency2"]["kernel"]
    sal["saliency2"] = dict(sal["saliency2"], kernel=0.1 * jax.random.normal(jax.random.key(4), k.shape))
    params = dict(params, saliency=sal)
    assert _fine_loss_grad_to_coarse(rstn, params, "S") == 0.0
    assert _fine_loss_grad_to_coarse(rstn, params, "I") > 0.0
    assert _fine_loss_grad_to_coarse(rstn, params, "J") > 0.0


def test_j_falls_back_to_label_when_prediction_empty(model_and_params):
    rstn, params = model_and_params
    params = dict(params)
    coarse = jax.tree_util.tree_map(lambda x: x, params["coarse"])
    coarse["score_fr"] = dict(coarse["score_fr"], bias=jnp.full((3,), -50.0))
    params["coarse"] = coarse
    out = jax.jit(rstn.forward_j)(params, make_batch(), jax.random.key(3))
    assert float(out.coarse_prob.max()) < 0.5
    np.testing.assert_array_equal(np.asarray(out.stats["fallback"]), [1.0, 1.0])
    out_s = jax.jit(rstn.forward_s)(params, make_batch(), jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(out_s.stats["fallback"]), [0.0, 0.0])


def test_per_sample_randomness_independent_of_batch_split(model_and_params):
    """Samples keep their dropout masks and margins when the batch is split
    (the property that makes 8 devices equal 1 device)."""
    rstn, params = model_and_params
    batch = make_batch(b=4, seed=5)
    key = jax.random.key(7)
    fwd = jax.jit(rstn.forward_i)
    whole = fwd(params, batch, key)
    halves = [fwd(params, jax.tree_util.tree_map(lambda x: x[s], batch), key)
              for s in (slice(0, 2), slice(2, 4))]
    for name in ("coarse_prob", "fine_prob"):
        joined = np.concatenate([np.asarray(getattr(h, name)) for h in halves])
        np.testing.assert_allclose(np.asarray(getattr(whole, name)), joined, atol=1e-5)
    # Different keys do change the draw (dropout is on).
    other = fwd(params, batch, jax.random.key(8))
    assert not np.allclose(np.asarray(other.coarse_prob), np.asarray(whole.coarse_prob))


def test_padded_slot_is_skipped(model_and_params):
    rstn, params = model_and_params
    batch = make_batch()
    batch["weight"] = jnp.array([1.0, 0.0])
    out = rstn.forward_i(params, batch, jax.random.key(0))
    assert np.all(np.asarray(out.fine_prob[1]) == 0.0)
    np.testing.assert_array_equal(np.asarray(out.stats["skipped"]), [0.0, 0.0])
    assert float(out.stats["box_area"][1]) == 0.0


def test_fine_round_skips_empty_windows_and_oracle(model_and_params):
    rstn, params = model_and_params
    batch = make_batch()
    mask = np.asarray(batch["label"]).copy()
    mask[1] = 0.0  # window 1 has an empty mask: skipped, probability 0
    prob, over = jax.jit(rstn.fine_round)(params, batch["image"], batch["label"], jnp.asarray(mask))
    assert prob.shape == (2, H, W, 3)
    assert np.all(np.asarray(prob[1]) == 0.0)
    assert np.any(np.asarray(prob[0]) > 0.0)
    np.testing.assert_array_equal(np.asarray(over), [0.0, 0.0])


def test_bad_inputs(model_and_params):
    cfg = base_config().model
    cfg.dtype = "float16"
    with pytest.raises(InputError, match="config.model.dtype"):
        RSTN.from_config(cfg)
    cfg = base_config().model
    cfg.init = "pretrained"
    with pytest.raises(InputError, match="pretrained"):
        RSTN.from_config(cfg)
    rstn, params = model_and_params
    batch = make_batch()
    del batch["index"]
    with pytest.raises(InputError, match="index"):
        rstn.forward_s(params, batch, jax.random.key(0))
    batch = make_batch()
    batch["image"] = batch["image"].at[0, 0, 0, 0].set(jnp.nan)
    with pytest.raises(InputError, match="NaN"):
        rstn.forward_s(params, batch, jax.random.key(0))


def test_init_prior_sets_the_initial_probability():
    """model.init_prior shifts the last head's bias by logit(prior): a zero
    image then gives that probability in the interior, in both networks."""
    rstn = small_rstn(init_prior=0.05)
    params = jax.jit(rstn.init_params, static_argnums=1)(jax.random.key(0), (32, 32))
    for net in ("coarse", "fine"):
        head = params[net]["score_pool3"]["bias"]
        np.testing.assert_allclose(np.asarray(head), np.log(0.05 / 0.95), rtol=1e-6)
        zero = {**params[net], **{k: {**params[net][k], "kernel": jnp.zeros_like(params[net][k]["kernel"]),
                                      "bias": jnp.zeros_like(params[net][k]["bias"])}
                                  for k in ("score_fr", "score_pool4")}}
        prob = jax.nn.sigmoid(rstn.fcn_logits(zero, jnp.zeros((1, 32, 32, 3))))
        np.testing.assert_allclose(np.asarray(prob[0, 8:24, 8:24]), 0.05, rtol=1e-4)
    with pytest.raises(InputError, match="init_prior"):
        small_rstn(init_prior=1.5)


def test_fine_round_on_a_padded_slice_equals_the_unpadded_one(model_and_params):
    """A box that reaches the real border of a slice padded to a bucket: with
    a trained (nonzero) saliency, the fine round's probabilities inside the
    real size equal those of the unpadded slice (the saliency and the FCNs
    are masked to hw), and are 0 in the padding."""
    rstn, params = model_and_params
    k = jax.random.key(7)
    sal = params["saliency"]
    params = dict(params, saliency={
        "saliency1": dict(sal["saliency1"], bias=jnp.asarray([0.7, 1.1, 0.4])),
        "saliency2": dict(sal["saliency2"], kernel=0.3 * jax.random.normal(
            k, sal["saliency2"]["kernel"].shape))})
    h, w = 40, 37
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32)
    score = rng.uniform(0, 1, (1, h, w, 3)).astype(np.float32)
    mask = np.zeros((1, h, w, 3), np.float32)
    mask[:, h - 12:, w - 10:] = 1.0  # the box touches the bottom-right real border
    pad = lambda a, v: np.pad(a, ((0, 0), (0, H - h), (0, W - w), (0, 0)), constant_values=v)
    fine = jax.jit(rstn.fine_round)
    want, _ = fine(params, jnp.asarray(image), jnp.asarray(score), jnp.asarray(mask))
    got, _ = fine(params, jnp.asarray(pad(image, 0)), jnp.asarray(pad(score, 0.5)),
                  jnp.asarray(pad(mask, 0)), hw=jnp.asarray([[h, w]], jnp.int32))
    got, want = np.asarray(got), np.asarray(want)
    assert want[:, h - 12:, w - 10:].std() > 0.01  # a real prediction on the box
    np.testing.assert_allclose(got[:, :h, :w], want, rtol=2e-5, atol=2e-5)
    assert not got[:, h:].any() and not got[:, :, w:].any()
