"""Tests of keras_decomp.data: the IDX reader and writer, every source of ``load`` on files the
tests write themselves, the bundled subset and the tf.data pipelines.

Every test runs in isolation from this machine's data (no $KERAS_DECOMP_DATA, an empty
tensorflow-datasets folder, a missing /usr/share/datasets) unless it asks for the real files.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import re
import tomllib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from keras_decomp.training import data
from keras_decomp.training.data import load, read_idx, write_idx
from keras_decomp.errors import DecompError

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "keras_decomp" / "datasets" / "fashion_mnist_subset"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not DEBIAN.is_dir(), reason="needs the Debian package dataset-fashion-mnist")


@pytest.fixture(autouse=True)
def no_machine_data(monkeypatch, tmp_path_factory):
    """Hide this machine's data sets: the tests decide what exists."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path_factory.mktemp("no_tfds")))
    monkeypatch.setattr(data, "IDX_ROOT", tmp_path_factory.mktemp("share") / "datasets")


def write_fake(folder: Path, n_train=20, n_test=10, suffix=".gz", seed=0) -> dict:
    """Write the four IDX files of a tiny random data set; return its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in data.IDX_FILES.items():
        write_idx(folder / (stem + suffix), arrays[key])
    return arrays


def assert_same(loaded: data.Data, arrays: dict):
    for key, expected in arrays.items():
        got = getattr(loaded, key)
        if key.startswith("x_"):
            assert got.shape == expected.shape + (1,) and got.dtype == np.uint8
            got = got[..., 0]
        else:
            assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected)


# --- IDX reader and writer ------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype, shape", [
    (np.uint8, (3, 4, 5)), (np.int8, (7,)), (np.int16, (2, 3)), (np.int32, (4, 1)),
    (np.float32, (2, 2, 2, 2)), (np.float64, (5,)), (np.uint8, (0, 28, 28)),
])
def test_idx_round_trip(tmp_path, suffix, dtype, shape):
    array = (np.arange(int(np.prod(shape))) - 3).astype(dtype).reshape(shape) * 3
    path = tmp_path / ("x-idx-ubyte" + suffix)
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative and back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_idx_bytes_are_the_standard_layout(tmp_path):
    write_idx(tmp_path / "a", np.array([[1, 2], [3, 4]], np.uint8))
    assert (tmp_path / "a").read_bytes() == bytes(
        [0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4])
    write_idx(tmp_path / "b", np.array([258], np.int16))
    assert (tmp_path / "b").read_bytes() == bytes([0, 0, 0x0B, 1, 0, 0, 0, 1, 1, 2])


def test_gzipped_idx_is_byte_identical_on_rewrite(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


@pytest.mark.parametrize("array, message", [
    (np.zeros(3, np.int64), "IDX cannot hold int64 values; it holds uint8, int8, int16, int32, "
                            "float32, float64\nconvert first, e.g. array.astype(np.uint8)"),
    (np.zeros(3, bool), "IDX cannot hold bool values"),
    (np.uint8(3), "IDX cannot hold an array of shape (): it needs 1 to 255 dimensions"),
])
def test_write_idx_refuses_what_idx_cannot_hold(tmp_path, array, message):
    with pytest.raises(DecompError, match=re.escape(message)):
        write_idx(tmp_path / "x", array)


HEADER_2x3 = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3])


@pytest.mark.parametrize("content, message", [
    (b"\0\0", "not an IDX file: 2 bytes, shorter than a header"),
    (b"\x01\x02\x08\x01\0\0\0\0", "not an IDX file: it starts with 0x0102, not 0x0000"),
    (b"\0\0\x07\x01\0\0\0\0", "unknown IDX element type 0x07; known: 0x08, 0x09, 0x0b, 0x0c, "
                              "0x0d, 0x0e"),
    (b"\0\0\x08\x03\0\0\0\x02", "truncated IDX file: the header declares 3 dimensions but the "
                                "file ends after 8 bytes"),
    (HEADER_2x3 + bytes(5), "truncated IDX file: the header declares uint8 values of shape "
                            "(2, 3) (6 bytes) but 5 bytes follow it"),
    (HEADER_2x3 + bytes(7), "IDX file too long: the header declares uint8 values of shape "
                            "(2, 3) (6 bytes) but 7 bytes follow it"),
    (gzip.compress(HEADER_2x3 + bytes(600), mtime=0)[:-12],
     "truncated gzip file (it ends before its end marker)"),
    (b"\x1f\x8b" + bytes(30), "corrupt gzip file"),
])
def test_corrupt_idx_files_are_decomp_errors(tmp_path, content, message):
    path = tmp_path / "broken-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(DecompError, match=re.escape(f"{path}: {message}")) as info:
        read_idx(path)
    assert info.value.hint == "the file is damaged or not an IDX file; reinstall or regenerate it"


# --- load from IDX files --------------------------------------------------------------------

def test_load_reads_idx_files_from_the_environment_variable(tmp_path, monkeypatch):
    arrays = write_fake(tmp_path / "idx")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "idx"))
    loaded = load("fashion_mnist", source="idx")
    assert_same(loaded, arrays)
    assert loaded.source == f"IDX files in {tmp_path / 'idx'}"
    assert loaded.name == "fashion_mnist" and loaded.classes == data.FASHION_CLASSES


def test_load_reads_plain_idx_files_from_data_dir(tmp_path):
    arrays = write_fake(tmp_path, n_train=30, n_test=5, suffix="")
    loaded = load("fashion_mnist", source="idx", data_dir=tmp_path)
    assert_same(loaded, arrays)
    assert loaded.source == f"IDX files in {tmp_path}"


def test_a_folder_may_hold_the_files_in_a_subfolder_named_after_the_data_set(tmp_path):
    arrays = write_fake(tmp_path / "fashion-mnist")
    write_fake(tmp_path / "mnist", seed=1)
    assert_same(load("fashion_mnist", source="idx", data_dir=tmp_path), arrays)


def test_the_environment_variable_comes_before_data_dir_and_the_default(tmp_path, monkeypatch):
    env = write_fake(tmp_path / "env", seed=1)
    write_fake(tmp_path / "arg", seed=2)
    write_fake(data.IDX_ROOT / "fashion-mnist", seed=3)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    assert_same(load(source="idx", data_dir=tmp_path / "arg"), env)


def test_the_default_folder_is_used_when_nothing_else_is_set(tmp_path):
    default = write_fake(data.IDX_ROOT / "fashion-mnist", seed=3)
    loaded = load("fashion_mnist", source="auto")
    assert_same(loaded, default)
    assert loaded.source == f"IDX files in {data.IDX_ROOT / 'fashion-mnist'}"


def test_mnist_from_idx_files(tmp_path):
    arrays = write_fake(tmp_path / "mnist")
    loaded = load("mnist", data_dir=tmp_path)
    assert_same(loaded, arrays)
    assert loaded.classes == tuple("0123456789") and loaded.num_classes == 10


def test_a_folder_with_some_of_the_files_is_an_error(tmp_path):
    write_fake(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DecompError, match=re.escape(
            f"{tmp_path} holds some IDX files but not t10k-labels-idx1-ubyte (gzipped or not)")):
        load(source="auto", data_dir=tmp_path)


def test_files_that_do_not_fit_together_are_an_error(tmp_path):
    write_fake(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(DecompError, match=re.escape(
            f"{tmp_path}: the train files do not fit together: images uint8 (20, 28, 28), "
            "labels (19,); expected uint8 images (N, height, width) and N labels")):
        load(source="idx", data_dir=tmp_path)


def test_labels_beyond_the_classes_are_an_error(tmp_path):
    write_fake(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, np.uint8))
    with pytest.raises(DecompError, match=re.escape(
            f"IDX files in {tmp_path}: labels run from 0 to 12, expected 0 to 9 for mnist")):
        load("mnist", data_dir=tmp_path)


def test_a_corrupt_file_in_a_data_folder_names_the_file(tmp_path):
    write_fake(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DecompError, match=re.escape(f"{path}: truncated gzip file")):
        load(source="auto", data_dir=tmp_path)


# --- sources that are not there, and bad arguments ------------------------------------------

def test_explicit_idx_source_that_is_not_there(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(DecompError) as info:
        load("fashion_mnist", source="idx")
    assert str(info.value) == (
        "fashion_mnist: no IDX files found; looked in\n"
        f"  {tmp_path} ($KERAS_DECOMP_DATA): no IDX files\n"
        f"  {data.IDX_ROOT / 'fashion-mnist'}: no such folder\n"
        "To fix: install the Debian package (apt-get install dataset-fashion-mnist), or set "
        "KERAS_DECOMP_DATA to a folder holding train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz];"
        "\nor use source='bundled' (a small subset shipped with keras_decomp).")


@pytest.mark.parametrize("name, source, message", [
    ("fashion_mnist", "tfds", "fashion_mnist: no prepared tensorflow-datasets copy found; "
                              "looked in\n  {tfds} (tensorflow-datasets): no prepared "
                              "fashion_mnist\nTo fix: prepare it with tensorflow-datasets"),
    ("fashion_mnist", "full", "fashion_mnist: no full copy (tensorflow-datasets or IDX files) "
                              "found; looked in\n  {tfds} (tensorflow-datasets): no prepared "
                              "fashion_mnist\n  $KERAS_DECOMP_DATA: not set\n  {idx}"
                              "/fashion-mnist: no such folder\nTo fix: install the Debian"),
    ("mnist", "auto", "mnist: no full copy (tensorflow-datasets or IDX files) found"),
    ("mnist", "bundled", "no bundled subset of mnist: only fashion_mnist ships one\n"
                         "use source='auto', 'tfds' or 'idx'"),
])
def test_unavailable_sources(name, source, message):
    message = message.format(tfds=os.environ["TFDS_DATA_DIR"], idx=data.IDX_ROOT)
    with pytest.raises(DecompError, match="^" + re.escape(message)):
        load(name, source=source)


@pytest.mark.parametrize("name, source, message", [
    ("cifar10", "auto", "unknown data set 'cifar10'; known: fashion_mnist, mnist"),
    ("fashoin_mnist", "auto", "unknown data set 'fashoin_mnist'; known: fashion_mnist, mnist\n"
                              "did you mean 'fashion_mnist'?"),
    ("fashion_mnist", "bundle", "unknown data source 'bundle'; expected one of auto, full, "
                                "tfds, idx, bundled\ndid you mean 'bundled'?"),
])
def test_unknown_names_and_sources(name, source, message):
    with pytest.raises(DecompError, match="^" + re.escape(message) + "$"):
        load(name, source=source)


def test_names_may_be_spelt_with_dashes_and_capitals():
    assert load("Fashion-MNIST", source="bundled").name == "fashion_mnist"


# --- the bundled subset ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundled() -> data.Data:
    return load("fashion_mnist", source="bundled")


def test_bundled_subset_shapes_and_balanced_classes(bundled):
    assert bundled.source == "bundled subset (5000 train / 1000 test)"
    assert bundled.x_train.shape == (5000, 28, 28, 1) and bundled.x_train.dtype == np.uint8
    assert bundled.x_test.shape == (1000, 28, 28, 1) and bundled.y_test.dtype == np.int64
    assert bundled.input_shape == (28, 28, 1) and bundled.num_classes == 10
    assert bundled.classes == data.FASHION_CLASSES
    assert np.bincount(bundled.y_train).tolist() == [500] * 10
    assert np.bincount(bundled.y_test).tolist() == [100] * 10
    # real pictures, not noise or blanks: mostly dark background, every image has ink
    assert 50 < bundled.x_train.mean() < 110
    assert (bundled.x_train.reshape(5000, -1).max(axis=1) > 100).all()


def test_auto_falls_back_to_the_bundled_subset():
    assert load().source == "bundled subset (5000 train / 1000 test)"


def test_bundled_subset_is_small_and_every_file_ships_in_the_wheel():
    files = sorted(p.name for p in SUBSET.iterdir())
    assert files == ["LICENSE", *sorted(f + ".gz" for f in data.IDX_FILES.values())]
    assert sum((SUBSET / f).stat().st_size for f in files) < 3_000_000
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "keras_decomp.datasets" in config["packages"]
    patterns = config["package-data"]["keras_decomp.datasets"]
    unshipped = [f for f in files
                 if not any(fnmatch.fnmatch(f"fashion_mnist_subset/{f}", p) for p in patterns)]
    assert not unshipped


@needs_debian
def test_bundled_images_are_real_fashion_mnist_images(bundled):
    for split in ("train", "test"):
        full_x = read_idx(DEBIAN / f"{data.IDX_FILES['x_' + split]}.gz")
        full_y = read_idx(DEBIAN / f"{data.IDX_FILES['y_' + split]}.gz")
        labels = {}
        for image, label in zip(full_x.reshape(len(full_x), -1), full_y):
            labels.setdefault(image.tobytes(), set()).add(int(label))
        x, y = getattr(bundled, f"x_{split}"), getattr(bundled, f"y_{split}")
        missing = [i for i, (image, label) in enumerate(zip(x.reshape(len(x), -1), y))
                   if label not in labels.get(image.tobytes(), ())]
        assert not missing, f"{len(missing)} bundled {split} images are not in {DEBIAN}"


@needs_debian
@pytest.mark.slow
def test_make_subset_regenerates_the_bundled_files_byte_for_byte(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_subset", ROOT / "scripts/make_subset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0, capsys.readouterr().out


# --- tf.data pipelines ----------------------------------------------------------------------

def labels_of(dataset) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in dataset])


def test_pipelines_give_float_batches_in_the_unit_interval(bundled):
    train, test = bundled.pipelines(batch_size=64, limit=200)
    images, labels = next(iter(train))
    assert images.shape == (64, 28, 28, 1) and images.dtype.name == "float32"
    assert labels.dtype.name == "int64"
    assert 0.0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 1.0
    assert [int(y.shape[0]) for _, y in test] == [64, 64, 64, 8]
    first = next(iter(test))[0].numpy()
    np.testing.assert_allclose(first, bundled.x_test[:64] / np.float32(255), rtol=1e-6)
    np.testing.assert_array_equal(labels_of(test), bundled.y_test[:200])


def test_training_order_is_deterministic_for_a_seed(bundled):
    def passes(**kwargs):
        train, _ = bundled.pipelines(batch_size=100, limit=300, **kwargs)
        return labels_of(train), labels_of(train)

    first, second = passes(seed=0)
    again_first, again_second = passes(seed=0)
    np.testing.assert_array_equal(first, again_first)
    np.testing.assert_array_equal(second, again_second)
    assert not np.array_equal(first, second)  # reshuffled on every pass
    assert not np.array_equal(first, passes(seed=1)[0])
    assert sorted(first) == sorted(bundled.y_train[:300])
    np.testing.assert_array_equal(passes(shuffle=False)[0], bundled.y_train[:300])


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"limit": 2.5}, "limit must be a positive integer, got 2.5"),
])
def test_pipelines_bad_arguments(bundled, kwargs, message):
    with pytest.raises(DecompError, match=re.escape(message)):
        bundled.pipelines(**kwargs)


# --- tensorflow-datasets --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tensorflow-datasets folder with fashion_mnist prepared from tiny IDX files.

    tensorflow-datasets would download the files; here its download manager hands over local
    ones instead, and its MNIST builder is told how many examples they hold.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.image_classification import mnist

    raw = tmp_path_factory.mktemp("raw")
    arrays = write_fake(raw, n_train=20, n_test=10, suffix="")
    files = {f"{split}_{part}": str(raw / data.IDX_FILES[f"{kind}_{split}"])
             for split in ("train", "test") for part, kind in (("data", "x"), ("labels", "y"))}

    class LocalFiles:
        downloaded_size = 0

        def download_and_extract(self, urls):
            return files

    root = tmp_path_factory.mktemp("tfds")
    builder = tfds.builder("fashion_mnist", data_dir=str(root))
    with mock.patch.object(mnist, "_TRAIN_EXAMPLES", 20), \
            mock.patch.object(mnist, "_TEST_EXAMPLES", 10), \
            mock.patch.object(type(builder), "_make_download_manager",
                              lambda self, **kwargs: LocalFiles()):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return root, arrays, builder.data_dir


def sort_examples(x, y):
    order = np.lexsort(x.reshape(len(x), -1).T)
    return x[order], y[order]


def test_load_reads_a_prepared_tensorflow_datasets_copy(tfds_dir, tmp_path):
    root, arrays, variant_dir = tfds_dir
    write_fake(tmp_path, seed=5)  # IDX files too: tfds comes first
    loaded = load("fashion_mnist", source="auto", data_dir=root)
    assert loaded.source == f"tensorflow-datasets ({variant_dir})"
    assert loaded.classes == data.FASHION_CLASSES
    for split in ("train", "test"):
        # tensorflow-datasets shuffles the examples when it prepares them
        x, y = sort_examples(getattr(loaded, f"x_{split}")[..., 0], getattr(loaded, f"y_{split}"))
        ex, ey = sort_examples(arrays[f"x_{split}"], arrays[f"y_{split}"])
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
        assert getattr(loaded, f"y_{split}").dtype == np.int64


def test_tfds_data_dir_environment_variable_is_honoured(tfds_dir, monkeypatch):
    root, _, variant_dir = tfds_dir
    monkeypatch.setenv("TFDS_DATA_DIR", str(root))
    assert load(source="tfds").source == f"tensorflow-datasets ({variant_dir})"
    assert load(source="full").source == f"tensorflow-datasets ({variant_dir})"
