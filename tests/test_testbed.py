"""The offline testbed: deterministic, disjoint splits, safe unpickling, cache reuse."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle

import numpy as np
import pytest

from ueo.demo import testbed as tb
from ueo.errors import UeoError

SCALE = 0.05  # 30 train, 5 test per class; 2 unlabeled + 2 test per class and domain


@pytest.fixture(scope="module")
def data_available():
    try:
        tb.load_fashion_mnist("t10k")
        tb.load_animal_mnist()
    except UeoError as exc:
        pytest.skip(f"testbed data not installed: {exc}")


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory, data_available):
    return [
        tb.build_testbed(tmp_path_factory.mktemp(f"build{i}") / "testbed", scale=SCALE)
        for i in range(2)
    ]


def _all_lists(testbed: tb.Testbed) -> list:
    return [testbed.source_train, testbed.source_test] + [
        path for pair in testbed.domains.values() for path in pair
    ]


def test_two_builds_are_byte_identical(two_builds):
    a, b = two_builds
    for list_a, list_b in zip(_all_lists(a), _all_lists(b), strict=True):
        assert list_a.relative_to(a.root) == list_b.relative_to(b.root)
        assert list_a.read_text() == list_b.read_text()
        for line in list_a.read_text().splitlines():
            rel = line.rsplit(" ", 1)[0]
            assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()
    assert (a.root / "manifest.json").read_text() == (b.root / "manifest.json").read_text()


def test_class_space(two_builds):
    testbed = two_builds[0]
    assert len(set(testbed.class_names)) == testbed.num_classes
    assert 0 < testbed.known < testbed.num_classes
    assert (testbed.root / "classes.txt").read_text().split() == testbed.class_names
    assert len(testbed.domains) >= 3
    for list_file in _all_lists(testbed):
        _, labels = tb.read_list(testbed.root, list_file)
        assert set(labels.tolist()) == set(range(testbed.num_classes))


def test_images_are_grayscale_pngs(two_builds):
    testbed = two_builds[0]
    unlabeled, _ = next(iter(testbed.domains.values()))
    images, labels = tb.load_list_images(testbed.root, unlabeled)
    assert images.shape == (len(labels), 28, 28) and images.dtype == np.uint8


def _digests(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(im.tobytes()).hexdigest() for im in images}


def test_splits_use_disjoint_source_images(data_available):
    """Pretraining, source test and every domain split draw on different image contents."""
    splits = [tb.source_arrays("train")[0], tb.source_arrays("test")[0]]
    for index in range(len(tb.DOMAINS)):
        splits += [images for images, _ in tb._domain_arrays(index, 1.0).values()]
    seen: set[str] = set()
    for images in splits:
        digests = _digests(images)
        assert len(digests) == len(images)
        assert not digests & seen
        seen |= digests


def test_complete_build_is_reused(two_builds):
    testbed = two_builds[0]
    manifest = testbed.root / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = tb.build_testbed(testbed.root, scale=SCALE)
    assert again == testbed and manifest.stat().st_mtime_ns == before


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, data_available):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UeoError, match="not a ueo testbed"):
        tb.build_testbed(tmp_path, scale=SCALE)
    assert (tmp_path / "notes.txt").exists()


def test_default_root_follows_ueo_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UEO_CACHE", str(tmp_path))
    assert tb.default_root() == tmp_path / f"testbed-v{tb.VERSION}"


def test_missing_fashion_mnist_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("UEO_FASHION_MNIST", str(tmp_path))
    tb.load_fashion_mnist.cache_clear()
    try:
        with pytest.raises(UeoError, match="apt-get install dataset-fashion-mnist"):
            tb.load_fashion_mnist("t10k")
    finally:
        tb.load_fashion_mnist.cache_clear()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(UeoError, match="refusing to load global"):
        tb._load_array_pickle(path)
    with gzip.open(path, "wb") as f:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), f)
    assert tb._load_array_pickle(path).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_corruptions_are_deterministic_and_shift_the_images(data_available):
    images = tb.source_arrays("test", scale=0.02)[0]
    for _, kind, params in tb.DOMAINS:
        once = tb.corrupt(images, kind, params, seed=7)
        assert np.array_equal(once, tb.corrupt(images, kind, params, seed=7))
        assert once.shape == images.shape and once.dtype == np.uint8
        assert not np.array_equal(once, images)
