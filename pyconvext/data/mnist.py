"""MNIST from its four original IDX gz files, without torchvision.

The files are read from a folder: the one given, else $PYCONVEXT_DATA, else
~/.cache/pyconvext. Missing (or corrupt) files are downloaded from the mirrors
in $PYCONVEXT_MNIST_MIRRORS (URL prefixes separated by spaces or commas), else
from MIRRORS, verified by md5 and written atomically (a temporary file in the
same folder, renamed once complete), so an interrupted download never leaves a
truncated file behind.
"""

import gzip
import hashlib
import http.client
import os
import struct
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

FILES = {  # name: md5 of the gz file, as published with the original files
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MIRRORS_ENV = "PYCONVEXT_MNIST_MIRRORS"
DATA_ENV = "PYCONVEXT_DATA"
# The classic example's normalization: the training set's pixel mean and std.
MEAN, STD = 0.1307, 0.3081


class MNISTUnavailable(RuntimeError):
    """The MNIST files are neither in the folder nor downloadable."""


def data_dir(folder=None) -> Path:
    """The folder given, else $PYCONVEXT_DATA, else ~/.cache/pyconvext."""
    return Path(folder or os.environ.get(DATA_ENV) or Path.home() / ".cache" / "pyconvext").expanduser()


def mirrors():
    """$PYCONVEXT_MNIST_MIRRORS split on spaces and commas, else MIRRORS."""
    configured = os.environ.get(MIRRORS_ENV, "").replace(",", " ").split()
    return tuple(configured) or MIRRORS


def md5(path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_files(train):
    """The image and label files of the training or test set."""
    prefix = "train" if train else "t10k"
    return [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]


def missing_files(folder, names=tuple(FILES)) -> list:
    """Those of `names` that are absent from `folder` or fail their md5."""
    folder = Path(folder)
    return [name for name in names if not (folder / name).is_file() or md5(folder / name) != FILES[name]]


def _fetch(url, name, folder, timeout):
    """Downloads url into folder/name (a writable folder) if its md5 is right;
    else raises OSError."""
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        got = md5(temporary)
        if got != FILES[name]:
            raise OSError(f"md5 {got}, expected {FILES[name]}")
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared data folder from others
        os.replace(temporary, folder / name)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def download(folder=None, urls=None, timeout=30.0, names=tuple(FILES)) -> Path:
    """Makes sure the files `names` (default: all four) are in the folder,
    downloading what is missing or corrupt; each file from the first mirror
    that serves it with the right md5. Raises MNISTUnavailable, naming every
    mirror's failure, when a file cannot be had. Returns the folder."""
    folder = data_dir(folder)
    urls = (urls,) if isinstance(urls, str) else tuple(urls or mirrors())
    missing = missing_files(folder, names)
    if missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise MNISTUnavailable(f"MNIST files {', '.join(missing)} are missing from {folder}, and it "
                                   f"cannot be written ({error}); point --data-dir or ${DATA_ENV} at "
                                   "a writable folder, or at one that has the files") from None
    for name in missing:
        failures = []
        for mirror in urls:
            url = mirror.rstrip("/") + "/" + name
            try:
                _fetch(url, name, folder, timeout)
                break
            # ValueError: a malformed URL; HTTPException: a broken reply.
            except (OSError, urllib.error.URLError, ValueError, http.client.HTTPException) as error:
                failures.append(f"  {url}: {str(error) or type(error).__name__}")
        else:
            raise MNISTUnavailable(
                f"MNIST file {name} is not in {folder} (or fails its md5 check) and no mirror "
                "served it:\n" + "\n".join(failures) + "\n"
                f"Copy the four MNIST files ({', '.join(FILES)}) into {folder}, point "
                f"--data-dir or ${DATA_ENV} at a folder that has them, or list working "
                f"mirrors in ${MIRRORS_ENV}."
            )
    return folder


def read_idx(path) -> torch.Tensor:
    """A uint8 IDX file (gzip-compressed) as a tensor of its dimensions."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != torch.Size(shape).numel():
        raise ValueError(f"{path}: {len(body)} bytes of data for shape {shape}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load(train=True, folder=None, download_missing=True):
    """(images uint8 N×28×28, labels int64 N) of the training or test set."""
    names = split_files(train)
    if download_missing:
        folder = download(folder, names=names)
    else:
        folder = data_dir(folder)
        if missing := missing_files(folder, names):
            raise MNISTUnavailable(f"{folder} lacks the MNIST files {', '.join(missing)} "
                                   "(or they fail their md5 check), and downloading is off")
    images = read_idx(folder / names[0])
    labels = read_idx(folder / names[1]).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} images in {names[0]} but {labels.shape[0]} labels")
    return images, labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×28×28 → float32 N×1×28×28, as the example's ToTensor() then
    Normalize((0.1307,), (0.3081,))."""
    return images.unsqueeze(1).float().div(255).sub(MEAN).div(STD)


class Dataset(torch.utils.data.Dataset):
    """Normalized MNIST images and labels in memory. A DataLoader over it draws
    the same random numbers as over torchvision's MNIST, and fetches a whole
    batch in one indexing (use collate_fn=pyconvext.data.mnist.collate)."""

    def __init__(self, train=True, folder=None, download_missing=True):
        images, self.labels = load(train, folder, download_missing)
        self.images = normalize(images)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices)
        return self.images[indices], self.labels[indices]


def collate(batch):
    """The DataLoader's collate_fn for Dataset: its batches come whole."""
    return batch
