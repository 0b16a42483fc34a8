"""Experiment phantoms: the global lung-HU histogram is near chance, zone/texture features are not."""

from __future__ import annotations

import numpy as np
import pytest

from lungmae_core.errors import ConfigError
from lungmae_core.experiment.baselines import features_of, fit_logistic, histogram_features
from lungmae_core.experiment.data import PhantomPlan, build_phantom_sites
from lungmae_core.experiment.stats import balanced_accuracy
from lungmae_core.synthetic.experiment_phantoms import EXPERIMENT_CLASSES, generate_experiment_phantom


@pytest.fixture(scope="module")
def draw(tmp_path_factory: pytest.TempPathFactory):
    """A small draw: 2 labelled sites x 4 classes x 8 train, 3 test per class per site, 3 per class held out."""
    plan = PhantomPlan(labelled_sites=2, unlabelled_sites=0, k_max=8, test_per_class=3, heldout_per_class=3,
                       unlabelled_per_site=0, size=48, shape_scale=0.5, data_seed=3)
    return build_phantom_sites(plan, tmp_path_factory.mktemp("exp-phantoms"), workers=2)


def _score(draw, kind: str) -> float:
    train = [(s.images[i], s.masks[i]) for s in draw.labelled_sites for i in range(len(s))]
    y = np.concatenate([s.labels for s in draw.labelled_sites])
    model = fit_logistic(features_of(kind, train), y, len(EXPERIMENT_CLASSES))
    probs = model.predict_proba(features_of(kind, list(zip(draw.test_images, draw.test_masks, strict=False))))
    return balanced_accuracy(draw.test_labels, probs.argmax(1), len(EXPERIMENT_CLASSES))


def test_global_histogram_is_near_chance_and_zone_texture_features_are_high(draw):
    assert len(draw.test_labels) == 4 * (2 * 3 + 3)
    hist, zone = _score(draw, "histogram"), _score(draw, "zone-texture")
    assert hist <= 0.6, f"histogram baseline {hist:.2f}: the classes differ in their global HU histogram"
    assert zone >= 0.85, f"zone/texture baseline {zone:.2f}: the spatial signal is too weak"


def test_classes_share_their_lung_histogram_within_a_few_percent(draw):
    x = np.stack([histogram_features(s.images[i], s.masks[i]) for s in draw.labelled_sites for i in range(len(s))])
    y = np.concatenate([s.labels for s in draw.labelled_sites])
    mean_hu = np.array([x[y == c, 12].mean() for c in range(4)]) * 100.0  # class means of the lung-HU mean
    std_hu = np.array([x[y == c, 13].mean() for c in range(4)]) * 100.0
    assert np.ptp(mean_hu) < 0.04 * abs(mean_hu.mean()), f"class mean lung HU {mean_hu.round(1)}"
    assert np.ptp(std_hu) < 0.10 * std_hu.mean(), f"class mean lung-HU spread {std_hu.round(1)}"


def test_same_arguments_same_phantom_and_bad_input_is_refused():
    a = generate_experiment_phantom(2, seed=5, shape=(40, 64, 64))
    b = generate_experiment_phantom(2, seed=5, shape=(40, 64, 64))
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.label == "apical-cystic"
    with pytest.raises(ConfigError, match="class must be in 0..3"):
        generate_experiment_phantom(4, seed=0)
    with pytest.raises(ConfigError, match="severity"):
        generate_experiment_phantom(0, seed=0, severity=1.5)


def test_zones_differ_where_the_class_says():
    """Apical-cystic puts its dense voxels high in the lungs, basal-reticular low (true masks, no noise)."""
    from lungmae_core.synthetic.scanners import ScannerProfile

    quiet = ScannerProfile(noise_hu=0.0, blur_mm=0.0, slice_thickness_mm=3.0, slice_spacing_mm=3.0)
    heights = []
    for c in (0, 2):
        p = generate_experiment_phantom(c, seed=11, scanner=quiet, shape=(50, 80, 80), severity=0.8)
        lung = p.lung_mask > 0
        dense = lung & (p.hu > np.median(p.hu[lung]) + 150)
        z = np.nonzero(dense)[0]
        zl = np.nonzero(lung)[0]
        heights.append((z.mean() - zl.min()) / (zl.max() - zl.min()))
    assert heights[0] < 0.45 < heights[1]
