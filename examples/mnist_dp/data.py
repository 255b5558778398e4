"""Images for the data-parallel example: real MNIST from IDX files, or scikit-learn's digits.

Nothing is ever downloaded. Give ``data_dir`` holding the four MNIST IDX files (as published, or
gzipped) to train on MNIST; without it the 1,797 8x8 handwritten digits that ship inside
scikit-learn are used, so the example runs offline on a fresh machine.
"""

from __future__ import annotations

import gzip
import os
from typing import BinaryIO

import numpy as np

from titanax.data import ArrayLoader, DataSource
from titanax.exceptions import TitanaxError

__all__ = ["load_dataset", "digits_source", "read_idx", "MNIST_FILES"]

MNIST_FILES = {
    "x_train": ("train-images-idx3-ubyte", 2051),
    "y_train": ("train-labels-idx1-ubyte", 2049),
    "x_test": ("t10k-images-idx3-ubyte", 2051),
    "y_test": ("t10k-labels-idx1-ubyte", 2049),
}
"""Split name -> (IDX file name, expected magic number: 2051 images, 2049 labels)."""

# IDX type byte -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def read_idx(path: str, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a NumPy array.

    The header is two zero bytes, a type byte, a byte giving the number of dimensions, then one
    big-endian uint32 per dimension; the data follow in row-major order. The "magic number" is the
    first four bytes read as a big-endian integer (2051 for MNIST images, 2049 for labels).

    Args:
      path: the file; a name ending in ``.gz`` is decompressed.
      expected_magic: if given, the magic number the file must have.

    Returns:
      The array, in native byte order.

    Raises:
      TitanaxError: a malformed header, an unexpected magic number, or a wrong amount of data.

    Example:
      >>> images = read_idx("mnist/train-images-idx3-ubyte", 2051)        # doctest: +SKIP
      >>> images.shape
      (60000, 28, 28)
    """
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise TitanaxError(
            f"{path} is not an IDX file (header bytes {raw[:4].hex() or 'missing'})",
            suggestion="point data_dir at the MNIST files as published (e.g. "
            "train-images-idx3-ubyte[.gz]), not at a converted or truncated copy",
        )
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise TitanaxError(
            f"{path} has IDX magic number {magic}, expected {expected_magic}",
            suggestion="check that image and label files are not swapped (images 2051, labels 2049)",
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TitanaxError(
            f"{path}: IDX header announces {ndim} dimensions but the file ends after {len(raw)} bytes",
            suggestion="the file is truncated; copy it again",
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise TitanaxError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes of data) but the file has "
            f"{len(raw) - header}",
            suggestion="the file is truncated or corrupt; copy it again",
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find(data_dir: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    return None


def _load_mnist(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not os.path.isdir(data_dir):
        raise TitanaxError(
            f"MNIST data_dir {data_dir!r} is not a directory",
            suggestion="pass the directory holding the four IDX files, or data_dir=None for the "
            "digits bundled with scikit-learn",
        )
    paths = {split: _find(data_dir, name) for split, (name, _) in MNIST_FILES.items()}
    missing = [MNIST_FILES[split][0] for split, path in paths.items() if path is None]
    if missing:
        raise TitanaxError(
            f"MNIST files missing from {data_dir!r}: {missing} (nor with .gz)",
            suggestion="copy the four MNIST IDX files there (Titanax never downloads), or use "
            "data_dir=None for the digits bundled with scikit-learn",
        )
    out = {split: read_idx(path, MNIST_FILES[split][1]) for split, path in paths.items()}
    for part in ("train", "test"):
        x, y = out[f"x_{part}"], out[f"y_{part}"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise TitanaxError(
                f"MNIST {part} images {x.shape} and labels {y.shape} do not match",
                suggestion="images must be [N, H, W] and labels [N], from the same split",
            )
    # uint8 pixels -> float32 in [0, 1], with a trailing channel axis for Conv layers.
    images = {k: (out[k].astype(np.float32) / 255.0)[..., None] for k in ("x_train", "x_test")}
    return (images["x_train"], out["y_train"].astype(np.int32),
            images["x_test"], out["y_test"].astype(np.int32))


def _load_digits(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise TitanaxError(
            "the bundled digits need scikit-learn, which is not installed",
            suggestion="pip install scikit-learn (or titanax[dev]), or pass data_dir= with MNIST "
            "IDX files",
        ) from None
    digits = load_digits()  # read from the package's own data files: no network
    images = (digits.images.astype(np.float32) / 16.0)[..., None]  # pixel values are 0..16
    labels = digits.target.astype(np.int32)
    # Stratified and seeded: every class keeps its share in both splits, the same on every run
    # and every process.
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    return x_train, y_train, x_test, y_test


def load_dataset(
    data_dir: str | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training and test images with labels.

    Args:
      data_dir: a directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``): real
        MNIST, 28x28. ``None``: scikit-learn's bundled 8x8 digits (1,797 images).
      test_fraction: for the bundled digits, the share held out for testing (MNIST has its own).
      seed: for the bundled digits, seeds the stratified split.

    Returns:
      ``(x_train, y_train, x_test, y_test)``: float32 images in [0, 1] shaped ``[N, H, W, 1]`` and
      int32 labels shaped ``[N]``.

    Raises:
      TitanaxError: missing or malformed MNIST files, or scikit-learn missing for the digits.

    Example:
      >>> x_train, y_train, x_test, y_test = load_dataset()                  # doctest: +SKIP
      >>> x_train.shape, x_test.shape
      ((1437, 8, 8, 1), (360, 8, 8, 1))
    """
    if data_dir is not None:
        return _load_mnist(os.path.expanduser(os.fspath(data_dir)))
    if not 0.0 < test_fraction < 1.0:
        raise TitanaxError(
            f"test_fraction={test_fraction!r} must be between 0 and 1",
            suggestion="e.g. test_fraction=0.2 holds out a fifth of the digits",
        )
    return _load_digits(test_fraction, seed)


def digits_source(data_dir: str | None = None, *, eval_batch_size: int = 1000, batch_size: int,
                  seed: int) -> DataSource:
    """The run-config data factory (``data.factory: examples.mnist_dp.data:digits_source``).

    Args:
      data_dir: as in :func:`load_dataset` (``None``: scikit-learn's digits).
      eval_batch_size: held-out images per evaluation batch (rounded down to a multiple of the
        device count; the held-out set is trimmed to one, so every batch splits evenly).
      batch_size: global training batch size.
      seed: shuffling seed of the training order (the train/test split is fixed).

    Returns:
      A ``tx.data.DataSource``: an endless shuffled loader, the held-out set in order, and one
      batch of shapes. Each process reads its own slice of every batch.
    """
    import jax

    x_train, y_train, x_test, y_test = load_dataset(data_dir)
    devices = jax.device_count()
    usable = len(x_test) - len(x_test) % devices
    eval_rows = max(devices, min(eval_batch_size, usable) // devices * devices)
    held_out = {"image": x_test[:usable], "label": y_test[:usable]}
    return DataSource(
        train=lambda: ArrayLoader({"image": x_train, "label": y_train}, batch_size=batch_size, seed=seed),
        eval=lambda: ArrayLoader(held_out, batch_size=eval_rows, shuffle=False, drop_remainder=False, epochs=1),
        example={"image": x_train[:batch_size], "label": y_train[:batch_size]},
        description=f"{len(x_train)} training / {usable} held-out images {x_train.shape[1:]}",
    )
