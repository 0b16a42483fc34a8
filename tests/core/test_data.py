"""Datasets (CachedVolumes from a real cache, InMemoryVolumes) and patient-level, deterministic splits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from lungmae_core.cache import cache_key, write_sample
from lungmae_core.config import PreprocessConfig
from lungmae_core.data import CLASS_NAMES, CachedVolumes, InMemoryVolumes, assign_splits, resize_cube
from lungmae_core.errors import CacheError, ConfigError, DatasetError
from lungmae_core.manifest import ManifestRow, read_manifest, write_manifest
from lungmae_core.preprocess import preprocess_volume
from lungmae_core.synthetic.phantoms import generate_phantom
from lungmae_core.synthetic.scanners import scanner_for_site

CFG = PreprocessConfig(size=24)


@pytest.fixture(scope="module")
def samples():
    """Four real preprocessed phantoms (one per class)."""
    return [preprocess_volume(generate_phantom(label, seed=i, scanner=scanner_for_site(i), shape=(40, 64, 64))
                              .to_volume(), CFG) for i, label in enumerate(CLASS_NAMES)]


@pytest.fixture()
def cache(tmp_path, samples):
    rows = []
    splits = ["train", "train", "val", "test"]
    for i, (sample, label) in enumerate(zip(samples, CLASS_NAMES, strict=True)):
        key = cache_key(f"series-{i}", CFG)
        path = write_sample(tmp_path, key, sample, {"label": label})
        rows.append(ManifestRow(series_id=f"s{i}", patient_id=f"p{i}", study_id=f"t{i}", source="phantom",
                                status="accepted", label=label if i != 1 else "", split=splits[i],
                                cache_file=str(path.relative_to(tmp_path)), cache_key=key))
    rows.append(ManifestRow(series_id="s9", patient_id="p9", study_id="t9", source="dicom", status="rejected",
                            reason="scout"))
    write_manifest(tmp_path, rows)
    return tmp_path


def test_cached_volumes_items_labels_and_ids(cache, samples):
    ds = CachedVolumes(cache)
    assert len(ds) == 4 and ds.size == 24
    # Samples come in voxel-digest order (see the next test); labels and ids travel with their sample.
    assert sorted(ds.patient_ids) == ["p0", "p1", "p2", "p3"]
    by_patient = dict(zip(ds.patient_ids, ds.labels.tolist(), strict=True))
    assert by_patient == {"p0": 0, "p1": -1, "p2": 2, "p3": 3}
    assert ds.series_ids == [f"s{p[1:]}" for p in ds.patient_ids]
    assert ds.labels.dtype == np.int64
    index = ds.patient_ids.index("p2")
    for i, pid in enumerate(ds.patient_ids):
        np.testing.assert_array_equal(ds[i]["image"].numpy(), samples[int(pid[1:])].image)
    item = ds[index]
    assert item["image"].shape == (1, 24, 24, 24) and item["image"].dtype == torch.float32
    assert item["lung_mask"].dtype == torch.float32 and set(item["lung_mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["label"] == 2
    np.testing.assert_array_equal(item["image"].numpy(), samples[2].image)
    item["image"].zero_()  # in-place augmentation of an item leaves the dataset untouched
    np.testing.assert_array_equal(ds[index]["image"].numpy(), samples[2].image)


def test_cached_volumes_order_does_not_depend_on_the_pseudonyms(tmp_path, samples):
    """Two preparations of the same data under different site secrets name the rows differently; the samples
    (and so a seeded training run) must come in the same order."""
    orders = []
    for run, names in enumerate((["a", "b", "c", "d"], ["z", "y", "x", "w"])):
        folder = tmp_path / f"prep{run}"
        rows = []
        for i, (sample, name) in enumerate(zip(samples, names, strict=True)):
            key = cache_key(f"series-{i}-{run}", CFG)
            path = write_sample(folder, key, sample, {})
            rows.append(ManifestRow(series_id=f"ser-{name}", patient_id=f"pat-{name}", study_id=f"stu-{name}",
                                    source="dicom", status="accepted", label=CLASS_NAMES[i], split="train",
                                    cache_file=str(path.relative_to(folder)), cache_key=key))
        write_manifest(folder, rows)
        ds = CachedVolumes(folder)
        orders.append(ds.labels.tolist())
        assert [r.series_id for r in read_manifest(folder)] == sorted(f"ser-{n}" for n in names)
    assert orders[0] == orders[1]  # the manifests' orders are [0, 1, 2, 3] and [3, 2, 1, 0]


@pytest.mark.parametrize("kwargs,expected_ids", [
    ({"splits": "train"}, ["p0", "p1"]),
    ({"splits": ["val", "test"]}, ["p2", "p3"]),
    ({"labelled_only": True}, ["p0", "p2", "p3"]),
    ({"splits": ["train"], "labelled_only": True}, ["p0"]),
])
def test_filters(cache, kwargs, expected_ids):
    assert sorted(CachedVolumes(cache, **kwargs).patient_ids) == expected_ids


def test_resize_to_requested_size(cache, samples):
    ds = CachedVolumes(cache, size=16)
    assert ds[0]["image"].shape == (1, 16, 16, 16)
    source = samples[int(ds.series_ids[0][1:])]  # samples are served in voxel-digest order; series "s<i>"
    # Corners are aligned: the corner voxels are kept exactly; the lung fraction is about preserved.
    np.testing.assert_allclose(ds[0]["image"][0, 0, 0, 0].item(), source.image[0, 0, 0, 0], rtol=1e-5)
    assert abs(float(ds[0]["lung_mask"].mean()) - float(source.lung_mask.mean())) < 0.03


@pytest.mark.parametrize("setup,kwargs,message", [
    ("missing", {}, "as it does not exist; run `lungmae site prepare` first"),
    ("no-manifest", {}, "as it has no manifest.csv"),
    ("only-rejected", {}, "as it has no accepted sample"),
    ("ok", {"splits": "val", "labelled_only": True}, None),
    ("ok", {"splits": ["holdout"]}, "splits must be among train, val, test"),
])
def test_cache_errors_name_the_directory(tmp_path, cache, setup, kwargs, message):
    target = {"missing": tmp_path / "nowhere", "no-manifest": tmp_path / "samples", "ok": cache}.get(setup, tmp_path)
    if setup == "only-rejected":
        target = tmp_path / "rejected-only"
        write_manifest(target, [ManifestRow(series_id="s1", patient_id="p", study_id="t", source="dicom",
                                            status="rejected", reason="scout")])
    if message is None:
        assert len(CachedVolumes(target, **kwargs)) == 1
        return
    with pytest.raises((CacheError, ConfigError)) as exc:
        CachedVolumes(target, **kwargs)
    assert message in str(exc.value)
    if isinstance(exc.value, CacheError):
        assert str(target) in str(exc.value)


def test_empty_after_filters_says_how_many_were_accepted(cache):
    write_manifest(cache, [r for r in read_manifest(cache) if r.split != "val"])
    with pytest.raises(CacheError, match=r"no accepted sample \(3 accepted before filtering by split in \['val'\]\)"):
        CachedVolumes(cache, splits="val")


def test_unknown_label_and_unreadable_sample(cache):
    with pytest.raises(DatasetError, match="series s0 has label 'normal', not one of a, b"):
        CachedVolumes(cache, class_names=("a", "b"))
    sample_file = next((cache / "samples").glob("*.npz"))
    sample_file.write_bytes(b"garbage")
    with pytest.raises(CacheError, match=f"Unable to read cached sample {sample_file} as it is truncated or corrupt"):
        CachedVolumes(cache)


def test_in_memory_volumes(samples):
    ds = InMemoryVolumes(samples, labels=[0, 1, 2, -1])
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 2, -1] and ds.patient_ids[0] == "mem-0000"
    assert ds[1]["lung_mask"].dtype == torch.float32 and ds[1]["label"] == 1
    pairs = InMemoryVolumes([(s.image, s.lung_mask) for s in samples])
    assert pairs.labels.tolist() == [-1] * 4


@pytest.mark.parametrize("make,message", [
    (lambda s: InMemoryVolumes([]), "needs at least one sample"),
    (lambda s: InMemoryVolumes(s, labels=[0, 1]), "got 4 samples but 2 labels"),
    (lambda s: InMemoryVolumes(s, patient_ids=["a"]), "got 4 samples but 1 patient ids"),
    (lambda s: InMemoryVolumes([s[0], (np.zeros((1, 8, 8, 8), np.float32), np.zeros((1, 8, 8, 8), np.uint8))]),
     "sample 1: image (1, 8, 8, 8) and mask (1, 8, 8, 8) must both match sample 0's shape (1, 24, 24, 24)"),
    (lambda s: InMemoryVolumes([(np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8))]),
     "image must have shape (1, S, S, S); got (8, 8, 8)"),
])
def test_in_memory_volumes_errors(samples, make, message):
    with pytest.raises(DatasetError) as exc:
        make(samples)
    assert message in str(exc.value)


def test_resize_cube_identity():
    image = np.random.default_rng(0).random((1, 8, 8, 8), dtype=np.float32)
    mask = (image > 0.5).astype(np.uint8)
    same_image, same_mask = resize_cube(image, mask, 8)
    assert same_image is image and same_mask is mask


# ----------------------------------------------------------------------------------------------- splits
def test_splits_are_deterministic_by_patient_and_order_free():
    ids = [f"p{i:02d}" for i in range(50)]
    series = ids + ids[:20]  # several series for some patients
    a = assign_splits(series, seed=3)
    assert a == assign_splits(list(reversed(series)), seed=3)
    assert set(a) == set(ids)
    assert Counter(a.values()) == {"train": 30, "val": 10, "test": 10}
    assert a != assign_splits(series, seed=4)


def test_stratified_by_label():
    ids = [f"p{i:03d}" for i in range(90)]
    labels = {pid: CLASS_NAMES[i % 3] if i < 60 else -1 for i, pid in enumerate(ids)}
    s = assign_splits(ids, seed=1, labels=labels)
    for cls in CLASS_NAMES[:3]:
        counts = Counter(s[p] for p in ids if labels[p] == cls)
        assert counts == {"train": 12, "val": 4, "test": 4}, (cls, counts)
    aligned = assign_splits(ids, seed=1, labels=[labels[p] for p in ids])
    assert aligned == s


def test_small_cohorts_still_get_every_split():
    s = assign_splits(["a", "b", "c"], seed=0, labels=[0, 1, 2])
    assert sorted(s.values()) == ["test", "train", "val"]
    assert set(assign_splits(["a", "b"], seed=0, fractions=(1.0, 0.0, 0.0)).values()) == {"train"}


@pytest.mark.parametrize("kwargs,message", [
    ({"fractions": (0.5, 0.5, 0.5)},
     "split fractions must be three non-negative numbers (train, val, test) summing to 1"),
    ({"fractions": (1.2, -0.2, 0.0)}, "got (1.2, -0.2, 0.0)"),
    ({"labels": [0]}, "got 2 patient ids but 1 labels"),
    ({"labels": {"a": 0, "b": 1}, "patient_ids": ["a", "a"]}, None),
])
def test_split_argument_errors(kwargs, message):
    ids = kwargs.pop("patient_ids", ["a", "b"])
    if message is None:
        assert set(assign_splits(ids, seed=0, **kwargs)) == {"a"}
        return
    with pytest.raises(ConfigError) as exc:
        assign_splits(ids, seed=0, **kwargs)
    assert message in str(exc.value)


def test_one_patient_with_two_labels_is_an_error():
    with pytest.raises(ConfigError, match=r"patient a has two labels \(0 and 1\)"):
        assign_splits(["a", "a"], seed=0, labels=[0, 1])
