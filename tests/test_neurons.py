"""utils/neurons/explore.py (the logic of visualize_neurons.ipynb and concept_discovery.ipynb): one neuron column read at a
time, the per-neuron means cached once, activity and word scores on hand-made cases."""
import os

import numpy as np
import pytest

from utils.neurons.explore import active_neurons, cached_neuron_means, concept_scores, top_images


class Recording:
    """An array that records the keys it is indexed with (a stand-in for the memory-mapped merged file)."""

    def __init__(self, array):
        self.array, self.keys = array, []
        self.shape, self.ndim = array.shape, array.ndim

    def __getitem__(self, key):
        self.keys.append(key)
        return self.array[key]


def test_top_images_reads_one_column_and_ranks_centred_norms():
    rng = np.random.default_rng(0)
    merged = rng.normal(size=(40, 7, 5)).astype(np.float32)
    mean = merged.mean(0)
    rec = Recording(merged)
    idx, norms = top_images(rec, mean, 3, 6)
    assert rec.keys == [(slice(None), 3)]  # merged[:, 3] only
    loop = [float(np.sqrt(sum((float(merged[i, 3, j]) - float(mean[3, j])) ** 2 for j in range(5))))
            for i in range(40)]
    expected = sorted(range(40), key=lambda i: -loop[i])[:6]
    assert idx.tolist() == expected
    np.testing.assert_allclose(norms, [loop[i] for i in expected], rtol=1e-6)
    with pytest.raises(ValueError, match="neuron 7: out of range"):
        top_images(rec, mean, 7, 3)


def test_means_computed_once_and_cached(tmp_path):
    merged = np.random.default_rng(1).normal(size=(9, 4, 3)).astype(np.float32)
    path, cache = tmp_path / "x_merged.npy", tmp_path / "x_mean.npy"
    np.save(path, merged)
    mean = cached_neuron_means(path, cache, progress=False)
    np.testing.assert_allclose(mean, merged.astype(np.float64).mean(0), atol=1e-7)
    assert cache.is_file() and cache.with_name(cache.name + ".provenance.json").is_file()
    np.save(cache, np.full((4, 3), 7.0, np.float32))  # a cache newer than the merged file is used as it is
    assert (cached_neuron_means(path, cache) == 7.0).all()
    st = cache.stat()
    os.utime(path, (st.st_atime, st.st_mtime + 10))  # ... until the merged file changes
    np.testing.assert_allclose(cached_neuron_means(path, cache, progress=False), mean)


def test_active_neurons_and_word_scores_by_hand():
    norms = np.array([2.0, 0.5, 3.0, 1.0])
    thresholds = np.array([1.0, 1.0, 3.0, 0.5])  # neuron 2 equals its threshold: not active
    active = active_neurons(norms, thresholds)
    assert active.tolist() == [0, 3]
    decomposition = {0: [[5, 0.5, "dog "], [2, -1.0, "cat"]], 1: [[5, 9.0, "dog"]], 2: [[1, 9.0, "car"]],
                     3: [[5, 2.0, "dog"], [7, 0.25, "sky"]]}
    scores = concept_scores(norms, active, decomposition)
    # dog: 0.5 * 2 + 2 * 1 = 3; sky: 0.25 * 1; cat: -1 * 2
    assert scores == [("dog", 3.0), ("sky", 0.25), ("cat", -2.0)]
    with pytest.raises(ValueError, match="4 neurons but 3"):
        active_neurons(norms, thresholds[:3])
