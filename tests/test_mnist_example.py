"""The MNIST net, the classic example's training on it (pyconvext.mnist_example),
and the commands train-mnist, test-mnist and demo."""

import os
import re
import subprocess
import sys

import pytest
import torch

import pyconvext
from pyconvext import mnist_example
from pyconvext.data import mnist
from pyconvext.models import MNISTNet
from test_build import ROOT
from test_data_mnist import SHARED, needs_data

# The classic example's parameter names and shapes: its checkpoints load as they are.
EXAMPLE_STATE = {
    "conv1.weight": (10, 1, 5, 5), "conv1.bias": (10,), "conv2.weight": (20, 10, 5, 5),
    "conv2.bias": (20,), "fc1.weight": (50, 320), "fc1.bias": (50,), "fc2.weight": (10, 50),
    "fc2.bias": (10,),
}


def test_net_runs_on_our_modules_and_has_the_example_parameters():
    ours, native = MNISTNet(), MNISTNet(native=True)
    assert type(ours.conv1) is pyconvext.nn.Conv2d and type(ours.conv2) is pyconvext.nn.Conv2d
    assert type(ours.pool) is pyconvext.nn.MaxPool2d
    assert type(native.conv1) is torch.nn.Conv2d and type(native.pool) is torch.nn.MaxPool2d
    for net in (ours, native):
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == EXAMPLE_STATE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_net_matches_native_in_training_mode(gen, dtype):
    native = MNISTNet(native=True).to(dtype)
    ours = MNISTNet().to(dtype)
    ours.load_state_dict(native.state_dict(), strict=True)
    x = torch.randn(16, 1, 28, 28, generator=gen, dtype=dtype)
    target = torch.randint(0, 10, (16,), generator=gen)
    results = []
    for net in (native, ours):
        torch.manual_seed(3)  # the same dropout masks for both
        loss = torch.nn.functional.nll_loss(net(x), target)
        results.append((loss, torch.autograd.grad(loss, list(net.parameters()))))
    torch.testing.assert_close(results[1], results[0])
    native.eval(), ours.eval()
    torch.testing.assert_close(ours(x), native(x))


def _subset(dataset, n):
    subset = mnist.Dataset.__new__(mnist.Dataset)
    subset.images, subset.labels = dataset.images[:n], dataset.labels[:n]
    return subset


@pytest.fixture(scope="module")
def small_sets():
    train = mnist.Dataset(True, SHARED, download_missing=False)
    test = mnist.Dataset(False, SHARED, download_missing=False)
    return _subset(train, 6400), _subset(test, 2000)


@needs_data
def test_backends_learn_alike_and_side_by_side_equals_alone(small_sets):
    lines = []
    kwargs = dict(epochs=2, lr=0.05, device="cpu", train_set=small_sets[0], test_set=small_sets[1])
    models, history = mnist_example.train(mnist_example.BACKENDS, log=lines.append, **kwargs)
    alone, alone_history = mnist_example.train(("native",), log=lambda line: None, **kwargs)
    # Each backend draws its own random numbers, as if it ran alone.
    for p, q in zip(models["native"].parameters(), alone["native"].parameters()):
        assert torch.equal(p, q)
    assert [(e.backend, e.epoch) for e in history] == [
        ("pyconvext", 1), ("native", 1), ("pyconvext", 2), ("native", 2)]
    # Learning, not chance (float32 rounding makes the two nets drift apart: see below).
    assert history[2].correct > 1700 and history[3].correct > 1700
    assert [e.correct for e in history if e.backend == "native"] == [e.correct for e in alone_history]
    assert "[pyconvext] Train Epoch: 1 [0/6400 (0%)]\tLoss: " in lines[0]
    assert any(re.fullmatch(r"\n\[native\] Test set: Average loss: \d+\.\d{4}, Accuracy: \d+/2000 \(\d+%\)", line)
               for line in lines)
    table = mnist_example.summary_table(history)
    assert table.splitlines()[0] == ("| epoch | pyconvext accuracy | pyconvext train s | native accuracy | "
                                     "native train s | speedup |")
    assert len(table.splitlines()) == 5
    assert table.splitlines()[-1].startswith("| all |  | ")


@needs_data
def test_training_steps_match_native_in_float64(small_sets):
    """In float32, a max-pool tie or a ReLU at zero decided differently by one
    rounding sends the two nets apart within tens of steps; in float64 none
    comes close, so every step must agree to rounding."""
    train_set = small_sets[0]
    torch.manual_seed(1)
    native = MNISTNet(native=True).double()
    ours = MNISTNet().double()
    ours.load_state_dict(native.state_dict())
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.05) for net in (native, ours)]
    for step in range(60):
        x = train_set.images[step * 64:(step + 1) * 64].double()
        y = train_set.labels[step * 64:(step + 1) * 64]
        for net, optimizer in zip((native, ours), optimizers):
            torch.manual_seed(step)  # the same dropout masks
            optimizer.zero_grad()
            torch.nn.functional.nll_loss(net(x), y).backward()
            optimizer.step()
    for p, q in zip(ours.parameters(), native.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_demo_relative_error():
    from pyconvext.demo import relative_error

    a = torch.tensor([100.0, 1.0])
    assert relative_error(a, a) == 0.0
    assert abs(relative_error((a, (a + torch.tensor([0.0, 0.5]),)), (a, (a,))) - 0.005) < 1e-9
    assert relative_error(torch.tensor([1, 2]), torch.tensor([1, 3])) == float("inf")


NO_MNIST = {"PYCONVEXT_MNIST_MIRRORS": "http://127.0.0.1:9/"}  # the discard port: nothing listens


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pyconvext", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)


@needs_data
def test_train_and_test_commands(tmp_path):
    checkpoint = tmp_path / "model.pt"
    result = _run("train-mnist", "--epochs", "1", "--device", "cpu", "--data-dir", str(SHARED),
                  "--log-interval", "100", "--save", str(checkpoint))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Train Epoch: 1 [0/60000 (0%)]\tLoss: " in out
    assert "Train Epoch: 1 [57600/60000 (96%)]\tLoss: " in out
    accuracy = re.search(r"^Test set: Average loss: (\d+\.\d{4}), Accuracy: (\d+)/10000 \((\d+)%\)$", out, re.M)
    assert accuracy and int(accuracy.group(2)) > 9000, out
    assert re.search(r"^Epoch 1 time: train \d+\.\d\d s, test \d+\.\d\d s$", out, re.M)
    assert set(torch.load(checkpoint, weights_only=True)) == set(EXAMPLE_STATE)
    assert not re.search("warn", result.stderr, re.I), result.stderr

    result = _run("test-mnist", "--checkpoint", str(checkpoint), "--device", "cpu", "--data-dir", str(SHARED))
    assert result.returncode == 0, result.stderr
    ours, native = result.stdout.splitlines()
    assert ours == f"[pyconvext] {accuracy.group(0)}"  # the same net, the same kernels
    # Native rounds differently: a near-tie among 10,000 images may go the other way.
    got = re.fullmatch(r"\[native\] Test set: Average loss: (\d+\.\d{4}), Accuracy: (\d+)/10000 \(\d+%\)", native)
    assert got and abs(float(got.group(1)) - float(accuracy.group(1))) <= 1e-4
    assert abs(int(got.group(2)) - int(accuracy.group(2))) <= 2

    result = _run("train-mnist", "--save", str(tmp_path / "missing" / "model.pt"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"pyconvext: cannot write {tmp_path / 'missing' / 'model.pt'}: its folder does not exist"


def test_commands_without_data_say_what_to_do(tmp_path):
    env = {**NO_MNIST, "PYCONVEXT_DATA": str(tmp_path)}
    result = _run("train-mnist", "--epochs", "1", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("pyconvext train-mnist: MNIST file train-images-idx3-ubyte.gz is not in "
                                    f"{tmp_path}")
    assert "Copy the four MNIST files" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_train_on_cuda_without_a_gpu_is_refused():
    result = _run("train-mnist", "--device", "cuda")
    assert result.returncode == 1
    assert result.stderr.strip() == "pyconvext train-mnist: --device cuda, but no CUDA GPU is visible"


@needs_data
def test_demo(tmp_path):
    result = _run("demo", "--data-dir", str(SHARED), "--min-time", "0.1")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "backends: cpu" in out
    for op in ("conv2d", "max_pool2d", "lstm"):
        assert re.search(rf"^  {op} .* forward .*x  error \S+  same results$", out, re.M), out
        assert re.search(rf"^  {op} .* forward\+backward .*x  error \S+  same results$", out, re.M), out
    for backend in ("pyconvext", "native"):
        assert re.search(rf"^  {backend} *: accuracy 9\d\d\d/10000 \(\d+\.\d\d%\), training epoch \d+\.\d s$",
                         out, re.M), out
    assert re.fullmatch(r"demo finished in \d+ s", out.splitlines()[-1]), out
    assert not re.search("warn", result.stderr, re.I), result.stderr


def test_demo_without_mnist_fails_and_says_so_last(tmp_path):
    result = _run("demo", "--min-time", "0.05", env={**NO_MNIST, "PYCONVEXT_DATA": str(tmp_path)})
    assert result.returncode == 1
    out = result.stdout
    assert "Copy the four MNIST files" in out and "Then run the demo again" in out and "--skip-mnist" in out
    assert re.search(r"^  lstm .* forward\+backward .*  same results$", out, re.M), out  # the rest ran
    assert re.fullmatch(r"demo FAILED after \d+ s: the MNIST part did not run \(no MNIST files; see above\)",
                        out.splitlines()[-1]), out


def test_demo_skip_mnist_runs_the_rest(tmp_path):
    result = _run("demo", "--skip-mnist", "--min-time", "0.05",
                  env={**NO_MNIST, "PYCONVEXT_DATA": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "backends: cpu" in out
    for op in ("conv2d", "max_pool2d", "lstm"):
        assert re.search(rf"^  {op} .* forward\+backward .*x  error \S+  same results$", out, re.M), out
    assert "MNIST example" not in out and "MNIST files" not in out
    assert re.fullmatch(r"demo finished in \d+ s \(MNIST part skipped: --skip-mnist\)", out.splitlines()[-1]), out
