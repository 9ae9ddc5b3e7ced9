"""The classic PyTorch MNIST example (pytorch/examples, mnist/main.py) on
pyconvext's kernels, or on native ones for comparison: same net, same
hyperparameters, same log lines, same random-number stream for a given seed.

Several backends train side by side in one run, an epoch of each in turn, each
on its own random-number stream (saved and restored around its epochs), so
each learns exactly as it would alone while their epoch times are measured
under the same machine load.
"""

import dataclasses
import time

import torch
import torch.nn.functional as F

from .data import mnist
from .models import MNISTNet

BACKENDS = ("pyconvext", "native")


class DeviceUnavailable(RuntimeError):
    """The device asked for cannot run pyconvext here."""


def pick_device(device="auto"):
    """auto: CUDA when a GPU is visible and this build has CUDA kernels, else the CPU."""
    import pyconvext

    has_cuda_kernels = "cuda" in pyconvext.build_info()["backends"]
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and has_cuda_kernels else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda, but no CUDA GPU is visible")
    if device.type == "cuda" and not has_cuda_kernels:
        raise DeviceUnavailable("--device cuda, but this build of pyconvext has no CUDA kernels")
    return device


def loaders(train_set, test_set, batch_size=64, test_batch_size=1000):
    """The example's loaders. Both shuffle, as in the example of this net (the
    test set's order changes no result, but its shuffle draws random numbers)."""
    train = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True,
                                        collate_fn=mnist.collate)
    test = torch.utils.data.DataLoader(test_set, batch_size=test_batch_size, shuffle=True,
                                       collate_fn=mnist.collate)
    return train, test


def train_epoch(model, device, loader, optimizer, epoch, log_interval=10, log=print, prefix=""):
    model.train()
    for batch_idx, (data, target) in enumerate(loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if batch_idx % log_interval == 0:
            log(f"{prefix}Train Epoch: {epoch} [{batch_idx * len(data)}/{len(loader.dataset)} "
                f"({100.0 * batch_idx / len(loader):.0f}%)]\tLoss: {loss.item():.6f}")


def evaluate(model, device, loader):
    """(average loss, number correct) over the loader's samples."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            loss += F.nll_loss(output, target, reduction="sum").item()
            correct += output.argmax(dim=1).eq(target).sum().item()
    return loss / len(loader.dataset), correct


def test_line(loss, correct, total):
    return (f"Test set: Average loss: {loss:.4f}, Accuracy: {correct}/{total} "
            f"({100.0 * correct / total:.0f}%)")


@dataclasses.dataclass
class Epoch:
    backend: str
    epoch: int
    train_s: float
    test_s: float
    loss: float
    correct: int
    total: int


class _RandomStream:
    """One backend's own stream of torch's default generators."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.state = self._get()

    def _get(self):
        return torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None

    def __enter__(self):
        torch.set_rng_state(self.state[0])
        if self.cuda:
            torch.cuda.set_rng_state(self.state[1])

    def __exit__(self, *exc):
        self.state = self._get()


def train(backends=("pyconvext",), epochs=10, lr=0.01, momentum=0.0, batch_size=64,
          test_batch_size=1000, seed=1, device="auto", data_dir=None, log_interval=10,
          log=print, train_set=None, test_set=None):
    """Trains one MNIST net per backend as the example does; returns
    ({backend: model}, [Epoch, ...]). train_set / test_set default to MNIST."""
    device = pick_device(device)
    train_set = train_set if train_set is not None else mnist.Dataset(True, data_dir)
    test_set = test_set if test_set is not None else mnist.Dataset(False, data_dir)
    runs = {}
    for backend in backends:
        torch.manual_seed(seed)
        train_loader, test_loader = loaders(train_set, test_set, batch_size, test_batch_size)
        model = MNISTNet(native=backend == "native").to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        runs[backend] = (model, optimizer, train_loader, test_loader, _RandomStream(device))
    history = []
    for epoch in range(1, epochs + 1):
        for backend, (model, optimizer, train_loader, test_loader, stream) in runs.items():
            prefix = f"[{backend}] " if len(runs) > 1 else ""
            with stream:
                start = time.perf_counter()
                train_epoch(model, device, train_loader, optimizer, epoch, log_interval, log, prefix)
                _synchronize(device)
                trained = time.perf_counter()
                loss, correct = evaluate(model, device, test_loader)
                tested = time.perf_counter()
            record = Epoch(backend, epoch, trained - start, tested - trained, loss, correct,
                           len(test_loader.dataset))
            history.append(record)
            log(f"\n{prefix}{test_line(loss, correct, record.total)}")
            log(f"{prefix}Epoch {epoch} time: train {record.train_s:.2f} s, test {record.test_s:.2f} s\n")
    return {backend: run[0] for backend, run in runs.items()}, history


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary_table(history):
    """Markdown: per epoch, each backend's accuracy and training time, and the
    speedup of pyconvext's training epoch over native's when both ran; then
    the total training time."""
    backends = list(dict.fromkeys(e.backend for e in history))
    by = {(e.backend, e.epoch): e for e in history}
    epochs = sorted({e.epoch for e in history})
    header = ["epoch"]
    for backend in backends:
        header += [f"{backend} accuracy", f"{backend} train s"]
    both = set(BACKENDS) <= set(backends)
    if both:
        header.append("speedup")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for epoch in epochs:
        cells = [str(epoch)]
        for backend in backends:
            e = by[backend, epoch]
            cells += [f"{e.correct}/{e.total} ({100.0 * e.correct / e.total:.2f}%)", f"{e.train_s:.2f}"]
        if both:
            cells.append(f"{by['native', epoch].train_s / by['pyconvext', epoch].train_s:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    total = {b: sum(e.train_s for e in history if e.backend == b) for b in backends}
    cells = ["all"]
    for backend in backends:
        cells += ["", f"{total[backend]:.2f}"]
    if both:
        cells.append(f"{total['native'] / total['pyconvext']:.2f}x")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_checkpoint(path, device="auto", data_dir=None, test_batch_size=1000, log=print):
    """Loads a state_dict checkpoint into the pyconvext net and the native net
    and prints the test line of each; returns {backend: (loss, correct)}."""
    device = pick_device(device)
    state = torch.load(path, map_location=device, weights_only=True)
    test_set = mnist.Dataset(False, data_dir)
    loader = torch.utils.data.DataLoader(test_set, batch_size=test_batch_size, collate_fn=mnist.collate)
    results = {}
    for backend in BACKENDS:
        model = MNISTNet(native=backend == "native").to(device)
        model.load_state_dict(state, strict=True)
        results[backend] = evaluate(model, device, loader)
        log(f"[{backend}] {test_line(*results[backend], len(test_set))}")
    return results
