"""preprocess_volume: shapes and ranges, alignment of the mask, orientation invariance, agreement with the
authors' order of operations (reference_preprocess), config checks and the fingerprint."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lungmae_core.config import PreprocessConfig, from_mapping
from lungmae_core.errors import ConfigError, InvalidSeriesError
from lungmae_core.preprocess import Sample, preprocess_volume, reference_preprocess
from lungmae_core.synthetic.phantoms import generate_phantom
from lungmae_core.synthetic.scanners import scanner_for_site
from lungmae_core.volume import Volume, sample_linear

SHAPE = (56, 96, 96)


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom("fibrosis", seed=2, scanner=scanner_for_site(2), severity=0.6, shape=SHAPE)


def dice(a, b) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("size", [16, 32, 48])
def test_sample_shapes_dtypes_range_and_qc(phantom, size):
    s = preprocess_volume(phantom.to_volume(), PreprocessConfig(size=size))
    assert isinstance(s, Sample)
    assert s.image.shape == (1, size, size, size) and s.image.dtype == np.float32
    assert s.lung_mask.shape == (1, size, size, size) and s.lung_mask.dtype == np.uint8
    assert 0.0 <= float(s.image.min()) and float(s.image.max()) <= 1.0
    assert set(np.unique(s.lung_mask)) == {0, 1}
    for key in ("lung_volume_ml", "spacing_mm", "input_shape", "hu_mean", "hu_std", "hu_p05", "hu_p50", "hu_p95"):
        assert key in s.qc, key
    assert s.qc["input_shape"] == list(SHAPE)
    assert s.qc["lung_volume_ml"] == pytest.approx(phantom.lung_volume_ml, rel=0.05)
    assert s.qc["hu_p05"] < s.qc["hu_p50"] < s.qc["hu_p95"] and -950 < s.qc["hu_mean"] < -600


def test_lungs_are_dark_inside_the_mask_and_the_crop_fits_the_volume(phantom):
    cfg = PreprocessConfig(size=48, margin_voxels=4)
    s = preprocess_volume(phantom.to_volume(), cfg)
    inside = s.image[s.lung_mask > 0]
    assert float(np.median(inside)) < (-650 + 1000) / 1200  # lung parenchyma, not soft tissue
    crop = np.array(s.qc["crop_mm"])
    extent = (np.array(SHAPE) - 1) * phantom.spacing_mm
    assert np.all(crop <= extent + 1e-6)
    assert s.lung_mask.mean() > 0.15  # with a small margin the lungs fill much of the cube
    wide = preprocess_volume(phantom.to_volume(), PreprocessConfig(size=48))
    assert np.all(np.array(wide.qc["crop_mm"]) >= crop)  # 32 voxels of margin crop less


def test_orientation_does_not_change_the_sample(phantom):
    """A feet-first, left-right-mirrored storage of the same volume gives the same sample."""
    vol = phantom.to_volume()
    hu = np.ascontiguousarray(np.transpose(vol.hu, (2, 1, 0))[::-1, :, ::-1])  # (W, H, D), both reversed
    affine = np.zeros((4, 4))
    d, h, w = vol.shape
    sd, sh, sw = vol.spacing_mm
    affine[0, 0] = -sw  # array axis 0 runs right-to-left reversed (toward patient right)
    affine[1, 1] = sh
    affine[2, 2] = -sd  # array axis 2 runs superior -> inferior
    affine[:3, 3] = [(w - 1) * sw, 0.0, (d - 1) * sd]
    affine[3, 3] = 1.0
    other = Volume(hu, affine)
    assert other.orientation == "RPI"
    cfg = PreprocessConfig(size=32)
    a, b = preprocess_volume(vol, cfg), preprocess_volume(other, cfg)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.lung_mask, b.lung_mask)


def test_agrees_with_the_authors_order_of_operations(phantom):
    cfg = PreprocessConfig(size=48, antialias=False, margin_voxels=32)  # the authors: raw voxels, 32-voxel margin
    ours = preprocess_volume(phantom.to_volume(), cfg)
    ref = reference_preprocess(phantom.to_volume(), cfg)
    assert ref.image.shape == ours.image.shape
    assert dice(ours.lung_mask, ref.lung_mask) > 0.95
    assert float(np.abs(ours.image - ref.image).mean()) < 0.03
    assert ours.qc["hu_mean"] == pytest.approx(ref.qc["hu_mean"], abs=25)


def test_anisotropic_input_is_resampled_in_millimetres():
    """A slab twice as thick per slice covers the same anatomy: the cubes agree."""
    p = generate_phantom("normal", seed=4, shape=(64, 96, 96))
    thick = Volume.from_spacing(p.hu[::2], (p.spacing_mm[0] * 2, p.spacing_mm[1], p.spacing_mm[2]),
                                origin_mm=(0.0, 0.0, p.spacing_mm[0] / 2.0))
    cfg = PreprocessConfig(size=32)
    a, b = preprocess_volume(p.to_volume(), cfg), preprocess_volume(thick, cfg)
    assert dice(a.lung_mask, b.lung_mask) > 0.9
    assert float(np.abs(a.image - b.image).mean()) < 0.05


def test_antialiasing_averages_noise_instead_of_aliasing_it():
    """Downsampling a noisy 1.4 mm series 3x: the box prefilter lowers the noise, not the mean."""
    p = generate_phantom("normal", seed=6, scanner=scanner_for_site(3), shape=(80, 128, 128))
    smooth = preprocess_volume(p.to_volume(), PreprocessConfig(size=32, margin_voxels=32))
    raw = preprocess_volume(p.to_volume(), PreprocessConfig(size=32, margin_voxels=32, antialias=False))
    np.testing.assert_array_equal(smooth.lung_mask, raw.lung_mask)
    air_smooth, air_raw = smooth.image[0, :, :2, :], raw.image[0, :, :2, :]  # air in front of the patient
    assert float(air_smooth.mean()) == pytest.approx(float(air_raw.mean()), abs=0.01)
    assert float(np.diff(air_smooth, axis=-1).std()) < 0.7 * float(np.diff(air_raw, axis=-1).std())


@pytest.mark.parametrize("hu,message", [
    (np.full((3, 64, 64), -1000.0, np.float32), "each axis needs at least 4 voxels"),
    (np.full((16, 32, 32), np.nan, np.float32), "voxels are NaN or infinite"),
    (np.full((16, 32, 32), 40.0, np.float32), "Unable to find lungs"),
])
def test_bad_volumes_are_rejected_with_the_reason(hu, message):
    with pytest.raises(InvalidSeriesError) as exc:
        preprocess_volume(Volume.from_spacing(hu, (2.0, 2.0, 2.0)))
    assert message in str(exc.value)


@pytest.mark.parametrize("mapping,message", [
    ({"size": 4}, "preprocess size must be in [8, 1024] voxels; got 4"),
    ({"hu-min": 100, "hu-max": -100}, "hu-max (-100) must be greater than hu-min (100)"),
    ({"min-lung-ml": 5000, "max-lung-ml": 100}, "min-lung-ml (5000) must be >= 0 and below max-lung-ml (100)"),
    ({"sise": 64}, "'sise' is not a known key; allowed keys: air-threshold-hu"),
    ({"size": "big"}, "'size' must be an integer; got 'big'"),
])
def test_config_errors_name_the_key(mapping, message):
    with pytest.raises(ConfigError) as exc:
        from_mapping(PreprocessConfig, mapping, source="site.yaml: 'preprocess'")
    assert message in str(exc.value)
    assert str(exc.value).startswith("site.yaml: 'preprocess'")


def test_fingerprint_is_stable_and_tracks_every_parameter():
    base = PreprocessConfig()
    assert base.fingerprint() == PreprocessConfig().fingerprint()
    assert len(base.fingerprint()) == 16 and int(base.fingerprint(), 16) >= 0
    seen = {base.fingerprint()}
    for field in dataclasses.fields(PreprocessConfig):
        value = getattr(base, field.name)
        if value is None:  # margin_voxels: unset by default (the margin is in mm)
            value = 0
        changed = dataclasses.replace(base, **{field.name: value + 1 if isinstance(value, int) else value + 0.05})
        seen.add(changed.fingerprint())
    assert len(seen) == len(dataclasses.fields(PreprocessConfig)) + 1
    assert from_mapping(PreprocessConfig, {"size": 64}).fingerprint() == PreprocessConfig(size=64).fingerprint()


def test_crop_margin_is_in_millimetres_whatever_the_voxel_size():
    """The same chest at two resolutions gets the same crop in mm; the lungs fill far more of the cube than
    with the paper's 32-voxel margin."""
    fine = generate_phantom("normal", seed=5, shape=(100, 160, 160))
    coarse = generate_phantom("normal", seed=5, shape=(50, 80, 80))
    a = preprocess_volume(fine.to_volume(), PreprocessConfig(size=32, margin_mm=20.0))
    b = preprocess_volume(coarse.to_volume(), PreprocessConfig(size=32, margin_mm=20.0))
    np.testing.assert_allclose(a.qc["crop_mm"], b.qc["crop_mm"], atol=12.0)
    paper = preprocess_volume(fine.to_volume(), PreprocessConfig(size=32, margin_voxels=32))
    assert a.lung_mask.mean() > 1.8 * paper.lung_mask.mean()
    with pytest.raises(ConfigError, match="margin-mm"):
        PreprocessConfig(margin_mm=-1.0)


def test_cube_mask_is_the_resampled_coarse_mask(phantom):
    """The output mask equals the input-resolution mask sampled onto the cube (alignment check)."""
    from lungmae_core.lungmask import lung_mask_from_hu

    cfg = PreprocessConfig(size=40, mask_spacing_mm=0.0)
    s = preprocess_volume(phantom.to_volume(), cfg)
    full = lung_mask_from_hu(phantom.hu, phantom.spacing_mm, cfg).astype(np.float32)
    zs = [np.flatnonzero(full.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    iso = float(np.mean(phantom.spacing_mm))
    coords = []
    for k in range(3):
        sp = phantom.spacing_mm[k]
        lo = max(zs[k][0] * sp - cfg.margin_in_mm(iso), 0.0)
        hi = min(zs[k][-1] * sp + cfg.margin_in_mm(iso), (SHAPE[k] - 1) * sp)
        coords.append((lo + np.arange(40) / 39 * (hi - lo)) / sp)
    expected = sample_linear(full, coords) >= 0.5
    assert dice(s.lung_mask[0], expected) > 0.999
