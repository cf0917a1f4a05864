"""One volume path: the windows training sees are the windows inference sees.

Training reads a case through the case store and the slice sampler;
evaluation reads the same store and inference cuts windows out of the padded
volume inside the jitted rounds (`preprocess.gather_windows` on
`preprocess.plane_view`, as `stnjax.infer.rounds` does). For the same volume,
slice and plane, the two must be the same arrays, bit for bit, and a HU
volume given to `Segmenter.segment` must be windowed exactly as the store
windows it for training.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from stnjax.data import manifest, preprocess, sampler, volume_io
from stnjax.data.store import CaseStore
from stnjax.infer import InferenceSpec
from stnjax.infer.segmenter import Segmenter
from stnjax.models.rstn import RSTN
from stnjax.phantom.dataset import write_phantom_dataset
from stnjax.phantom.volumes import PhantomConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("vp")
    write_phantom_dataset(root / "ds", num_cases=3, seed=5, n_folds=2,
                          config=PhantomConfig(shape=(40, 36, 20), spacing=(2.0, 2.0, 4.0)))
    return CaseStore(manifest.load_manifest(root / "ds"), root / "cache")


def _segmenter():
    rstn = RSTN.from_config({
        "width": 1 / 16, "variant": "pad32", "dtype": "float32", "dropout_rate": 0.0,
        "init": "he", "pretrained": "", "init_prior": 0.5, "saliency_kernels": (3,),
        "saliency_bias": (1.0, 1.5, 2.0), "margin": 5, "prob_fixed_margin": 0.5, "canvases": (32,)})
    # prepare() pads; it needs no parameters.
    return Segmenter(rstn, {p: {} for p in "XYZ"}, InferenceSpec(), volume_buckets=(32, 48, 64))


def test_hu_volume_is_windowed_as_the_store_windows_it(store):
    for cid in store.case_ids:
        e = store.manifest.case(cid)
        hu = volume_io.load_case(e.image, e.label, organ_id=store.manifest.organ_id).image
        np.testing.assert_array_equal(preprocess.model_input(hu), store.image(cid))


@pytest.mark.parametrize("plane", ["X", "Y", "Z"])
def test_training_windows_equal_inference_windows(store, plane):
    counts = sampler.slice_organ_counts(store, None, plane)
    slices = sampler.select_training_slices(counts, store.case_ids, 0.5)
    smp = sampler.SliceSampler(store, slices, plane=plane, batch_size=4, buckets=(64,), seed=3)
    seg = _segmenter()
    axis = preprocess.PLANE_AXIS[plane]
    padded = {cid: seg.prepare(store.image(cid), store.label(cid)) for cid in store.case_ids}
    seen = 0
    for step in range(6):
        batch = smp.batch(step)
        for b in np.flatnonzero(batch["weight"] > 0):
            cid = store.case_ids[batch["case_index"][b]]
            j = int(batch["slice_index"][b])
            image, extent, label, _ = padded[cid]
            n = extent[axis]
            win = preprocess.gather_windows(preprocess.plane_view(image, plane),
                                            jnp.asarray([j]), n)[0]
            lab = preprocess.gather_windows(preprocess.plane_view(label, plane),
                                            jnp.asarray([j]), n)[0]
            h, w = (int(v) for v in batch["hw"][b])
            assert (h, w) == tuple(int(extent[a]) for a in range(3) if a != axis)
            np.testing.assert_array_equal(np.asarray(win)[:h, :w], batch["image"][b, :h, :w])
            np.testing.assert_array_equal(np.asarray(lab)[:h, :w].astype(np.float32),
                                          batch["label"][b, :h, :w])
            # beyond the real size both are zero padding
            assert not np.asarray(win)[h:].any() and not np.asarray(win)[:, w:].any()
            assert not batch["image"][b, h:].any() and not batch["image"][b, :, w:].any()
            img_s, _ = store.window(cid, plane, j)  # the store's own window
            np.testing.assert_array_equal(img_s, batch["image"][b, :h, :w])
            seen += 1
    assert seen >= 12
