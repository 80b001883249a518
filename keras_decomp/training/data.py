"""Image classification data for the benchmarks: Fashion-MNIST (and MNIST) as numpy arrays
and tf.data pipelines, from whatever is on this machine, never from the internet.

``load`` looks, in order, for a prepared tensorflow-datasets copy, for IDX files (the
Debian package ``dataset-fashion-mnist`` installs them under /usr/share/datasets) and
finally for the small real subset of Fashion-MNIST shipped inside this package. It
prints nothing; ``Data.source`` says where the arrays came from.

>>> data = load("fashion_mnist", source="bundled")
>>> data.source
'bundled subset (5000 train / 1000 test)'
>>> data.x_train.shape, data.x_train.dtype.name, data.y_train.dtype.name
((5000, 28, 28, 1), 'uint8', 'int64')
>>> data.classes[:3]
('T-shirt/top', 'Trouser', 'Pullover')
"""

from __future__ import annotations

import difflib
import gzip
import importlib.resources
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DecompError

ENV_VAR = "KERAS_DECOMP_DATA"
IDX_ROOT = Path("/usr/share/datasets")  # where the Debian dataset-* packages put their files
TFDS_DEFAULT_DIR = "~/tensorflow_datasets"  # tensorflow-datasets' own default, unless TFDS_DATA_DIR
SOURCES = ("auto", "full", "tfds", "idx", "bundled")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# The file names of the original distributions, without the optional ".gz".
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class _Dataset:
    classes: tuple[str, ...]
    bundled: str | None  # folder in keras_decomp.datasets, if a subset ships with the package
    idx_hint: str        # how to get the IDX files onto this machine


DATASETS = {
    "fashion_mnist": _Dataset(
        FASHION_CLASSES, "fashion_mnist_subset",
        "install the Debian package (apt-get install dataset-fashion-mnist)"),
    "mnist": _Dataset(
        tuple(str(d) for d in range(10)), None,
        "copy the four MNIST IDX files from a machine with internet access"),
}


@dataclass(frozen=True, eq=False)
class Data:
    """Train and test splits of an image classification data set, as numpy arrays.

    Images are uint8 of shape (N, height, width, channels), labels int64 of shape (N,).
    """

    name: str
    source: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    classes: tuple[str, ...] = field(repr=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one image, e.g. (28, 28, 1)."""
        return tuple(int(n) for n in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def pipelines(self, batch_size: int = 128, seed: int = 0, shuffle: bool = True,
                  limit: int | None = None):
        """``(train, test)`` tf.data pipelines of batches: float32 images in [0, 1], int64 labels.

        The training split is shuffled with ``seed`` (afresh on every pass, in the same
        sequence of orders for the same seed); the test split keeps its order. ``limit``
        keeps only the first ``limit`` examples of each split, for quick runs.

        >>> train, test = load(source="bundled").pipelines(batch_size=32, limit=100)
        >>> images, labels = next(iter(train))
        >>> tuple(images.shape), images.dtype.name, labels.dtype.name
        ((32, 28, 28, 1), 'float32', 'int64')
        >>> sum(1 for _ in test)  # 100 examples in batches of 32
        4
        """
        import tensorflow as tf

        for what, value in (("batch_size", batch_size), ("limit", limit)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DecompError(f"{what} must be a positive integer, got {value!r}")
        self.check_finite(limit)

        def scale(images, labels):  # a named function: AutoGraph cannot convert a lambda here
            return tf.cast(images, tf.float32) / 255.0, labels

        def pipeline(x, y, shuffled):
            x, y = x[:limit], y[:limit]
            ds = tf.data.Dataset.from_tensor_slices((x, y))
            if shuffled:
                ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            # Scale whole batches: one op per batch instead of one per image.
            ds = ds.batch(batch_size).map(scale, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return ds.prefetch(tf.data.AUTOTUNE)

        return (pipeline(self.x_train, self.y_train, shuffle),
                pipeline(self.x_test, self.y_test, False))

    def check_finite(self, limit: int | None = None) -> None:
        """Refuse images with NaN or infinite values (possible when a ``Data`` is made from
        float arrays): trained on, they would give a NaN model without a word."""
        for split in ("x_train", "x_test"):
            x = np.asarray(getattr(self, split)[:limit])
            if np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.bool_):
                continue
            finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise DecompError(f"{self.name} ({self.source}): {split} holds NaN or infinite values in "
                                  f"{len(bad)} image(s), the first at index {bad[0]}",
                                  hint="repair or drop those images before training or evaluating")


def load(name: str = "fashion_mnist", source: str = "auto", data_dir=None) -> Data:
    """Load a data set from the first place that has it; ``Data.source`` says which.

    ``source`` is one of:

    - ``"tfds"``: a copy prepared by tensorflow-datasets, in ``data_dir`` or in its default
      folder ($TFDS_DATA_DIR or ~/tensorflow_datasets). Nothing is downloaded.
    - ``"idx"``: the four IDX files (``train-images-idx3-ubyte.gz`` and so on, gzipped or
      not) in the folder named by $KERAS_DECOMP_DATA, then in ``data_dir``, then in
      /usr/share/datasets/<name>, e.g. /usr/share/datasets/fashion-mnist. A folder may also
      hold them in a subfolder of that name.
    - ``"bundled"``: the subset of Fashion-MNIST shipped with keras_decomp (500 training and
      100 test images per class).
    - ``"full"``: the first of tfds and idx that is available.
    - ``"auto"``: the first of tfds, idx and bundled that is available.

    >>> load("fashion_mnist", source="bundled").num_classes
    10
    >>> load("cifar10")
    Traceback (most recent call last):
    ...
    keras_decomp.errors.DecompError: unknown data set 'cifar10'; known: fashion_mnist, mnist
    """
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in DATASETS:
        close = difflib.get_close_matches(str(key), DATASETS, n=1)
        raise DecompError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}",
                          hint=f"did you mean {close[0]!r}?" if close else None)
    if source not in SOURCES:
        close = difflib.get_close_matches(str(source), SOURCES, n=1)
        raise DecompError(f"unknown data source {source!r}; expected one of {', '.join(SOURCES)}",
                          hint=f"did you mean {close[0]!r}?" if close else None)
    spec = DATASETS[key]
    if source == "bundled":
        return _load_bundled(key, spec)

    looked = []  # (place, what was found there) for the error message
    if source in ("auto", "full", "tfds"):
        data = _load_tfds(key, data_dir, looked)
        if data is not None:
            return data
    if source in ("auto", "full", "idx"):
        data = _load_idx(key, spec, data_dir, looked)
        if data is not None:
            return data
    if source == "auto" and spec.bundled:
        return _load_bundled(key, spec)

    raise _not_found(key, spec, source, looked)


def _not_found(key: str, spec: _Dataset, source: str, looked: list) -> DecompError:
    """The error for a source that is not on this machine: where we looked, how to fix it."""
    wanted = {"tfds": "no prepared tensorflow-datasets copy",
              "idx": "no IDX files"}.get(source, "no full copy (tensorflow-datasets or IDX files)")
    places = "\n".join(f"  {place}: {found}" for place, found in looked)
    files = ", ".join(f"{f}[.gz]" for f in IDX_FILES.values())
    fixes = []
    if source != "tfds":
        fixes.append(f"{spec.idx_hint}, or set {ENV_VAR} to a folder holding {files}")
    if source != "idx":
        fixes.append(f"prepare it with tensorflow-datasets where there is internet access "
                     f"(tfds build {key}) and copy its folder into $TFDS_DATA_DIR or data_dir")
    if source != "auto" and spec.bundled:
        fixes.append("use source='bundled' (a small subset shipped with keras_decomp)")
    return DecompError(f"{key}: {wanted} found; looked in\n{places}",
                       hint="To fix: " + ";\nor ".join(fixes) + ".")


def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array in native byte order.

    >>> import os, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = os.path.join(tmp.name, "labels-idx1-ubyte.gz")
    >>> write_idx(path, np.array([3, 1, 4], dtype=np.uint8))
    >>> read_idx(path)
    array([3, 1, 4], dtype=uint8)
    >>> tmp.cleanup()
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise DecompError(f"{path}: truncated gzip file (it ends before its end marker)",
                              hint=_DAMAGED) from None
        except (OSError, zlib.error) as e:
            raise DecompError(f"{path}: corrupt gzip file ({e})", hint=_DAMAGED) from None
    try:
        return _parse_idx(raw)
    except DecompError as e:
        raise DecompError(f"{path}: {e.fact}", hint=_DAMAGED) from None


def write_idx(path, array) -> None:
    """Write ``array`` as an IDX file, gzipped if ``path`` ends in ``.gz``.

    The gzip header carries no time stamp or file name, so equal arrays give equal bytes.
    IDX holds uint8, int8, int16, int32, float32 and float64 (stored big-endian).
    """
    array = np.asarray(array)
    kind = np.dtype(array.dtype).newbyteorder("=")
    code = next((c for c, t in _IDX_TYPES.items() if np.dtype(t).newbyteorder("=") == kind), None)
    if code is None:
        names = ", ".join(np.dtype(t).name for t in _IDX_TYPES.values())
        raise DecompError(f"IDX cannot hold {array.dtype.name} values; it holds {names}",
                          hint="convert first, e.g. array.astype(np.uint8)")
    if not 1 <= array.ndim <= 255 or max(array.shape) >= 2**32:
        raise DecompError(f"IDX cannot hold an array of shape {array.shape}: it needs 1 to 255 "
                          "dimensions, each below 2**32")
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    Path(path).write_bytes(payload)


# --- IDX ------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_DAMAGED = "the file is damaged or not an IDX file; reinstall or regenerate it"


def _parse_idx(raw: bytes) -> np.ndarray:
    # Header: two zero bytes, the element type, the number of dimensions, then each
    # dimension as a big-endian uint32; the elements follow, big-endian, row-major.
    if len(raw) < 4:
        raise DecompError(f"not an IDX file: {len(raw)} bytes, shorter than a header")
    if raw[:2] != b"\0\0":
        raise DecompError(f"not an IDX file: it starts with 0x{raw[:2].hex()}, not 0x0000")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_TYPES)
        raise DecompError(f"unknown IDX element type 0x{code:02x}; known: {known}")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DecompError(f"truncated IDX file: the header declares {ndim} dimensions but the "
                          f"file ends after {len(raw)} bytes")
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - start
    if found != expected:
        problem = "truncated IDX file" if found < expected else "IDX file too long"
        raise DecompError(f"{problem}: the header declares {dtype.name} values of shape {shape} "
                          f"({expected} bytes) but {found} bytes follow it")
    return np.frombuffer(raw, dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))


# --- sources --------------------------------------------------------------------------------

def _load_bundled(key: str, spec: _Dataset) -> Data:
    if spec.bundled is None:
        raise DecompError(f"no bundled subset of {key}: only fashion_mnist ships one",
                          hint="use source='auto', 'tfds' or 'idx'")
    folder = importlib.resources.files("keras_decomp.datasets") / spec.bundled
    with importlib.resources.as_file(folder) as path:
        arrays = _read_idx_folder(path)
    source = f"bundled subset ({len(arrays['y_train'])} train / {len(arrays['y_test'])} test)"
    return _assemble(key, source, arrays, spec.classes)


def _load_idx(key: str, spec: _Dataset, data_dir, looked: list) -> Data | None:
    folder_name = key.replace("_", "-")
    candidates = [(f"${ENV_VAR}", os.environ.get(ENV_VAR)), ("data_dir", data_dir),
                  (None, IDX_ROOT / folder_name)]
    for label, folder in candidates:
        if not folder:
            if label != "data_dir":
                looked.append((label, "not set"))
            continue
        folder = Path(folder).expanduser()
        place = f"{folder} ({label})" if label else str(folder)
        if not folder.is_dir():
            looked.append((place, "no such folder"))
            continue
        # The folder itself, or a subfolder named after the data set.
        for where in (folder / folder_name, folder):
            if _idx_files_present(where):
                arrays = _read_idx_folder(where)
                return _assemble(key, f"IDX files in {where}", arrays, spec.classes)
        looked.append((place, "no IDX files"))
    return None


def _idx_files_present(folder: Path) -> bool:
    """Whether ``folder`` holds the IDX files; an error when it holds only some of them."""
    found = {k: _idx_path(folder, f) for k, f in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in found.items() if p is None]
    if len(missing) == len(IDX_FILES):
        return False
    if missing:
        raise DecompError(f"{folder} holds some IDX files but not {', '.join(missing)} "
                          "(gzipped or not)", hint="copy the missing files there")
    return True


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for k, stem in IDX_FILES.items():
        path = _idx_path(folder, stem)
        if path is None:
            raise DecompError(f"{folder}: no {stem}[.gz]")
        arrays[k] = read_idx(path)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
            raise DecompError(f"{folder}: the {split} files do not fit together: images "
                              f"{x.dtype.name} {x.shape}, labels {y.shape}; expected uint8 "
                              "images (N, height, width) and N labels")
        arrays[f"x_{split}"] = x[..., None]
    return arrays


def _load_tfds(key: str, data_dir, looked: list) -> Data | None:
    roots = [d for d in (data_dir, os.environ.get("TFDS_DATA_DIR") or TFDS_DEFAULT_DIR) if d]
    for root in roots:
        root = Path(root).expanduser()
        # A prepared copy has <root>/<name>/<version>/dataset_info.json. Look before importing
        # tensorflow-datasets: the import is slow and its builder logs about missing folders.
        if not any((root / key).glob("*/dataset_info.json")):
            looked.append((f"{root} (tensorflow-datasets)", f"no prepared {key}"))
            continue
        import tensorflow_datasets as tfds

        builder = tfds.builder(key, data_dir=str(root))
        if not builder.is_prepared():
            looked.append((f"{root} (tensorflow-datasets)",
                           f"no {key} of version {builder.version}"))
            continue
        arrays = {}
        for split in ("train", "test"):
            batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
            arrays[f"x_{split}"], arrays[f"y_{split}"] = batch["image"], batch["label"]
        classes = tuple(builder.info.features["label"].names)
        return _assemble(key, f"tensorflow-datasets ({builder.data_dir})", arrays, classes)
    return None


def _assemble(key: str, source: str, arrays: dict, classes: tuple[str, ...]) -> Data:
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
    if labels.size and not 0 <= labels.min() <= labels.max() < len(classes):
        raise DecompError(f"{source}: labels run from {labels.min()} to {labels.max()}, "
                          f"expected 0 to {len(classes) - 1} for {key}")
    return Data(name=key, source=source,
                x_train=np.asarray(arrays["x_train"], np.uint8),
                y_train=np.asarray(arrays["y_train"], np.int64),
                x_test=np.asarray(arrays["x_test"], np.uint8),
                y_test=np.asarray(arrays["y_test"], np.int64),
                classes=tuple(classes))
