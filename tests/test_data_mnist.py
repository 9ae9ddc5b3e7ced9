"""pyconvext.data.mnist: reading the original IDX files, and downloading them
from mirrors (a local HTTP server here) with md5 checks and atomic writes."""

import functools
import gzip
import hashlib
import http.server
import os
import pathlib
import shutil
import socket
import threading

import pytest
import torch

from pyconvext.data import mnist
from test_build import ROOT

# The four original files: $PYCONVEXT_DATA, else the workplace's shared copy.
SHARED = pathlib.Path(os.environ.get("PYCONVEXT_DATA") or ROOT.parent / "shared" / "data" / "mnist")
needs_data = pytest.mark.skipif(mnist.missing_files(SHARED) != [],
                                reason=f"no MNIST files in {SHARED} (set PYCONVEXT_DATA)")


@needs_data
def test_reads_the_original_files():
    images, labels = mnist.load(train=True, folder=SHARED, download_missing=False)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    # Counts and pixel mean as documented in the data folder's README.
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(images.double().mean().item() - 33.3184) < 1e-3
    images, labels = mnist.load(train=False, folder=SHARED, download_missing=False)
    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_normalize_is_to_tensor_then_normalize(gen):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8, generator=gen)
    expected = (images.float() / 255).unsqueeze(1)
    expected = (expected - 0.1307) / 0.3081  # torchvision's Normalize, as sub_ then div_
    assert torch.equal(mnist.normalize(images), expected)
    assert images.dtype == torch.uint8 and mnist.normalize(images).shape == (5, 1, 28, 28)


def _write_idx(path, magic, tensor):
    header = bytes([0, 0, magic, tensor.dim()]) + b"".join(n.to_bytes(4, "big") for n in tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + tensor.numpy().tobytes())


def test_read_idx(tmp_path, gen):
    images = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8, generator=gen)
    _write_idx(tmp_path / "x.gz", 0x08, images)
    assert torch.equal(mnist.read_idx(tmp_path / "x.gz"), images)
    _write_idx(tmp_path / "int.gz", 0x0C, images)  # 0x0C: int32 data, not MNIST's uint8
    with pytest.raises(ValueError, match="not a uint8 IDX file"):
        mnist.read_idx(tmp_path / "int.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"12345")
    with pytest.raises(ValueError, match="5 bytes of data for shape"):
        mnist.read_idx(tmp_path / "short.gz")


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PYCONVEXT_DATA", str(tmp_path / "env"))
    assert mnist.data_dir(tmp_path / "given") == tmp_path / "given"
    assert mnist.data_dir() == tmp_path / "env"
    monkeypatch.delenv("PYCONVEXT_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mnist.data_dir() == tmp_path / "home" / ".cache" / "pyconvext"


def test_mirrors_from_the_environment(monkeypatch):
    monkeypatch.delenv("PYCONVEXT_MNIST_MIRRORS", raising=False)
    assert mnist.mirrors() == mnist.MIRRORS
    monkeypatch.setenv("PYCONVEXT_MNIST_MIRRORS", "http://a/x/, http://b/y http://c/")
    assert mnist.mirrors() == ("http://a/x/", "http://b/y", "http://c/")


def test_offline_without_files_says_what_to_do(tmp_path):
    with pytest.raises(mnist.MNISTUnavailable) as error:
        mnist.load(folder=tmp_path, download_missing=False)
    assert "lacks the MNIST files train-images-idx3-ubyte.gz" in str(error.value)
    dead = f"http://127.0.0.1:{_free_port()}/"
    with pytest.raises(mnist.MNISTUnavailable) as error:
        mnist.download(tmp_path, urls=[dead], timeout=5)
    message = str(error.value)
    assert "MNIST file train-images-idx3-ubyte.gz is not in" in message
    assert dead + "train-images-idx3-ubyte.gz" in message
    assert "Copy the four MNIST files" in message and "PYCONVEXT_MNIST_MIRRORS" in message
    assert os.listdir(tmp_path) == []


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """serve(folder) -> URL of a local HTTP server over that folder."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # urllib would send 127.0.0.1 to a proxy in $http_proxy
    servers = []

    def serve(folder):
        handler = functools.partial(_Quiet, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/files/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@needs_data
def test_download_skips_dead_and_corrupt_mirrors(tmp_path, mirror):
    good = tmp_path / "good" / "files"
    shutil.copytree(SHARED, good, ignore=shutil.ignore_patterns("README.md"))
    corrupt = tmp_path / "corrupt" / "files"
    shutil.copytree(good, corrupt)
    for name in mnist.FILES:  # one flipped byte per file
        data = bytearray((corrupt / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (corrupt / name).write_bytes(bytes(data))
    dead = f"http://127.0.0.1:{_free_port()}/"
    target = tmp_path / "data"
    # A corrupt local copy is replaced.
    target.mkdir()
    (target / "t10k-labels-idx1-ubyte.gz").write_bytes(b"truncated")

    folder = mnist.download(target, urls=[dead, _garbage_server(), mirror(tmp_path / "corrupt"),
                                          mirror(tmp_path / "good")], timeout=10)
    assert folder == target
    assert sorted(os.listdir(target)) == sorted(mnist.FILES)  # no temporary files left
    for name, md5 in mnist.FILES.items():
        assert hashlib.md5((target / name).read_bytes()).hexdigest() == md5
        assert (target / name).stat().st_mode & 0o777 == 0o644  # readable by all, as a data folder is
    images, labels = mnist.load(False, target, download_missing=False)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)


def _garbage_server():
    """A mirror that answers every connection with a line that is not HTTP."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer():
        while True:
            connection, _ = server.accept()
            connection.sendall(b"not http at all\r\n")
            connection.close()

    threading.Thread(target=answer, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/"


@needs_data
def test_test_set_alone(tmp_path, mirror):
    """The test set needs only its two files, read or downloaded."""
    only = tmp_path / "only" / "files"
    only.mkdir(parents=True)
    for name in mnist.split_files(train=False):
        shutil.copy(SHARED / name, only / name)
    images, labels = mnist.load(train=False, folder=only, download_missing=False)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    target = tmp_path / "data"
    mnist.download(target, urls=mirror(tmp_path / "only"), names=mnist.split_files(train=False))
    assert sorted(os.listdir(target)) == sorted(mnist.split_files(train=False))


def test_unwritable_folder_is_named(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(mnist.MNISTUnavailable, match=r"are missing from .*/file, and it cannot be written \("):
        mnist.download(not_a_folder, urls=["http://127.0.0.1:9/"])


@needs_data
def test_download_rejects_a_corrupt_file(tmp_path, mirror):
    corrupt = tmp_path / "corrupt" / "files"
    corrupt.mkdir(parents=True)
    for name in mnist.FILES:
        data = bytearray((SHARED / name).read_bytes())
        data[100] ^= 0x01
        (corrupt / name).write_bytes(bytes(data))
    target = tmp_path / "data"
    with pytest.raises(mnist.MNISTUnavailable, match=r"md5 [0-9a-f]{32}, expected f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        mnist.download(target, urls=[mirror(tmp_path / "corrupt")], timeout=10)
    assert os.listdir(target) == []


@needs_data
def test_dataset_batches_come_whole_and_draw_the_example_random_numbers():
    dataset = mnist.Dataset(train=False, folder=SHARED, download_missing=False)
    assert len(dataset) == 10000 and dataset.images.shape == (10000, 1, 28, 28)

    class OneByOne(torch.utils.data.Dataset):  # how a torchvision dataset is read
        def __len__(self):
            return len(dataset)

        def __getitem__(self, index):
            return dataset[index]

    def epoch(loader):
        torch.manual_seed(7)
        batches = list(loader)
        return batches, torch.rand(1)

    ours, after = epoch(torch.utils.data.DataLoader(dataset, 64, shuffle=True, collate_fn=mnist.collate))
    reference, reference_after = epoch(torch.utils.data.DataLoader(OneByOne(), 64, shuffle=True))
    assert len(ours) == len(reference) == 157
    for (x, y), (x_ref, y_ref) in zip(ours, reference):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert torch.equal(after, reference_after)
