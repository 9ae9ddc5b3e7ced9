"""Benchmark harness: the shape catalog of the seed architectures, and a race of
pyconvext's operators against native PyTorch on the same inputs.

Speedup = native time / ours. Both run in this process on the same tensors,
interleaved round by round (so a noisy machine slows both alike), after
warm-up, through torch.utils.benchmark.Timer (which synchronizes CUDA) with all
of torch's threads; each time is the median over the rounds. With glibc, freed
memory is kept in the process (see keep_freed_memory).
"""

import csv
import ctypes
import dataclasses
import functools
import logging
import math
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

def _import_benchmark():
    # torch.utils.benchmark imports cpp_extension, which logs a warning about
    # CUDA_HOME on machines without a CUDA runtime: noise for timing kernels.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        log.setLevel(level)
    return benchmark


benchmark = _import_benchmark()
from . import functional, nn
from ._registrations import KERNELS
from .convert import convert


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One conv2d layer: input (batch, in_channels, height, width), out_channels
    square kernels of side `kernel`."""

    name: str
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    def output_size(self):
        def size(n):
            return (n + 2 * self.padding - self.kernel) // self.stride + 1

        return size(self.height), size(self.width)

    def flops(self):
        """Forward multiply-adds × 2."""
        out_h, out_w = self.output_size()
        per_output = self.in_channels // self.groups * self.kernel * self.kernel
        return 2 * self.batch * self.out_channels * out_h * out_w * per_output

    def shape(self):
        text = (f"{self.batch}x{self.in_channels}x{self.height}x{self.width}"
                f"->{self.out_channels} k{self.kernel}")
        text += f" s{self.stride}" if self.stride != 1 else ""
        text += f" p{self.padding}" if self.padding else ""
        text += f" g{self.groups}" if self.groups != 1 else ""
        return text


# The convolution layers of the seed architectures (batch sizes of a CPU run).
CONV2D_CATALOG = (
    ConvLayer("mnist.conv1", 64, 1, 28, 28, 10, 5),
    ConvLayer("mnist.conv2", 64, 10, 12, 12, 20, 5),
    ConvLayer("lenet5.c3", 64, 6, 14, 14, 16, 5),
    ConvLayer("alexnet.conv1", 8, 3, 224, 224, 64, 11, stride=4, padding=2),
    ConvLayer("zfnet.conv1", 8, 3, 224, 224, 96, 7, stride=2, padding=1),
    ConvLayer("vgg.conv3", 4, 128, 56, 56, 256, 3, padding=1),
    ConvLayer("googlenet.5x5", 8, 16, 28, 28, 32, 5, padding=2),
    ConvLayer("googlenet.1x1", 8, 192, 28, 28, 64, 1),
    ConvLayer("resnet.stem", 8, 3, 224, 224, 64, 7, stride=2, padding=3),
    ConvLayer("resnet.l3", 8, 256, 14, 14, 256, 3, padding=1),
    ConvLayer("depthwise", 8, 32, 112, 112, 32, 3, padding=1, groups=32),
)


@dataclasses.dataclass(frozen=True)
class PoolLayer:
    """One max_pool2d layer: input (batch, channels, height, width), square
    windows of side `kernel`."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    kernel: int
    stride: int
    padding: int = 0
    ceil_mode: bool = False

    def output_size(self):
        def size(n):
            span = n + 2 * self.padding - self.kernel + (self.stride - 1 if self.ceil_mode else 0)
            out = span // self.stride + 1
            # ceil_mode: the last window must start inside the input or its left padding.
            return out - 1 if self.ceil_mode and (out - 1) * self.stride >= n + self.padding else out

        return size(self.height), size(self.width)

    def shape(self):
        text = f"{self.batch}x{self.channels}x{self.height}x{self.width} k{self.kernel} s{self.stride}"
        text += f" p{self.padding}" if self.padding else ""
        text += " ceil" if self.ceil_mode else ""
        return text


# The max-pooling layers of the seed architectures.
MAX_POOL2D_CATALOG = (
    PoolLayer("mnist.pool1", 64, 10, 24, 24, 2, 2),
    PoolLayer("mnist.pool2", 64, 20, 8, 8, 2, 2),
    PoolLayer("alexnet.pool", 8, 64, 55, 55, 3, 2),
    PoolLayer("vgg.pool", 8, 64, 224, 224, 2, 2),
    PoolLayer("googlenet.pool", 8, 192, 56, 56, 3, 2, ceil_mode=True),
    PoolLayer("resnet.pool", 8, 64, 112, 112, 3, 2, padding=1),
)


@dataclasses.dataclass(frozen=True)
class LstmCellLayer:
    """One LSTM step of a batch of `batch` inputs of input_size features."""

    name: str
    batch: int
    input_size: int
    hidden_size: int

    def flops(self):
        """Forward multiply-adds of the two matrix products × 2."""
        return 2 * self.batch * 4 * self.hidden_size * (self.input_size + self.hidden_size)

    def shape(self):
        return f"B{self.batch} I{self.input_size} H{self.hidden_size}"


@dataclasses.dataclass(frozen=True)
class LstmSequence:
    """An nn.LSTM over `steps` steps of a batch of sequences."""

    name: str
    steps: int
    batch: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False

    def flops(self):
        """Forward multiply-adds of the matrix products × 2, over layers and directions."""
        directions = 2 if self.bidirectional else 1
        total, inputs = 0, self.input_size
        for _ in range(self.num_layers):
            total += directions * 2 * self.steps * self.batch * 4 * self.hidden_size * (inputs + self.hidden_size)
            inputs = directions * self.hidden_size
        return total

    def shape(self):
        text = f"T{self.steps} B{self.batch} I{self.input_size} H{self.hidden_size}"
        text += f" L{self.num_layers}" if self.num_layers > 1 else ""
        return text + (" bidir" if self.bidirectional else "")


# LSTM steps and sequences of language models, captioning and translation.
LSTM_CATALOG = (
    LstmCellLayer("cell.small", 64, 128, 256),
    LstmCellLayer("cell.large", 64, 512, 512),
    LstmCellLayer("cell.b1", 1, 256, 256),
    LstmSequence("lstm.lm", 35, 32, 256, 256),
    LstmSequence("lstm.caption", 20, 64, 512, 512),
    LstmSequence("lstm.seq2seq", 30, 32, 256, 256, num_layers=2, bidirectional=True),
)


@dataclasses.dataclass(frozen=True)
class Model:
    """A whole network on a batch of images: the native model against
    pyconvext.convert() of a copy of it."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    torchvision: bool = False  # built by torchvision (an optional dependency)

    def shape(self):
        return f"{self.batch}x{self.channels}x{self.height}x{self.width}"

    def build(self):
        """The native model, random weights."""
        if self.torchvision:
            import torchvision

            options = dict(aux_logits=False, init_weights=True) if self.name == "googlenet" else {}
            return getattr(torchvision.models, self.name)(**options)
        from . import models

        return {"mnist": models.MNISTNet, "lenet5": models.LeNet5, "zfnet": models.ZFNet}[self.name](native=True)


MODEL_CATALOG = (
    Model("mnist", 64, 1, 28, 28),
    Model("lenet5", 64, 1, 28, 28),
    Model("alexnet", 8, 3, 224, 224, torchvision=True),
    Model("zfnet", 8, 3, 224, 224),
    Model("vgg11", 2, 3, 224, 224, torchvision=True),
    Model("googlenet", 8, 3, 224, 224, torchvision=True),
    Model("resnet18", 8, 3, 112, 112, torchvision=True),
    Model("resnet50", 8, 3, 112, 112, torchvision=True),
)


def has_kernel(op, device):
    """Whether this build has our kernel for a catalog's operator on `device`."""
    name = {"lstm": "lstm_cell", "models": "conv2d", "overhead": "conv2d"}.get(op, op)
    return device.upper() in KERNELS[name]


def has_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class OverheadCase:
    """One call of an operator on a tiny input: what the call costs beyond
    its arithmetic (argument handling, dispatch, autograd), ours against native."""

    name: str
    batch: int = 1

    def shape(self):
        return {"conv2d": "1x1x4x4 k3", "max_pool2d": "1x1x4x4 k2", "max_pool2d.indices": "1x1x4x4 k2",
                "lstm_cell": "B1 I4 H4", "lstm.step": "T1 B1 I4 H4"}[self.name]


OVERHEAD_CATALOG = tuple(OverheadCase(name) for name in
                         ("conv2d", "max_pool2d", "max_pool2d.indices", "lstm_cell", "lstm.step"))

CATALOGS = {"conv2d": CONV2D_CATALOG, "max_pool2d": MAX_POOL2D_CATALOG, "lstm": LSTM_CATALOG,
            "models": MODEL_CATALOG, "overhead": OVERHEAD_CATALOG}


@dataclasses.dataclass
class Result:
    op: str
    layer: str
    shape: str
    mode: str  # "forward" or "forward+backward"
    native_ms: float
    ours_ms: float
    rate: float  # ours, in UNITS[op]: work (flops or bytes moved) per second
    floor_ms: float | None = None  # bytes moved at the copy bandwidth of this run (max_pool2d)

    @property
    def speedup(self):
        return self.native_ms / self.ours_ms


@functools.cache
def keep_freed_memory():
    """Stops glibc's malloc from handing large freed blocks back to the OS.

    By default glibc maps allocations above a threshold that moves with the
    allocation history, and unmaps them when freed, so code that allocates a
    large workspace per call may pay its page faults on every call, or not,
    depending on what ran before. Native conv2d's times swing up to 3x between
    processes this way. Fixing both thresholds removes that for both sides.
    Applied once; returns whether it took effect (False off glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _timer(fn, threads):
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)


def race(native, ours, min_time=2.0, min_rounds=7):
    """Median seconds per call of native() and ours(), measured interleaved."""
    threads = torch.get_num_threads()
    timers = (_timer(native, threads), _timer(ours, threads))
    numbers = []
    for timer in timers:  # warm-up, and calls per measurement for ~50 ms blocks
        timer.timeit(1)
        single = timer.timeit(1).median
        numbers.append(max(1, int(0.05 / max(single, 1e-7))))
    samples = ([], [])
    start = time.perf_counter()
    while len(samples[0]) < min_rounds or time.perf_counter() - start < min_time:
        for timer, number, times in zip(timers, numbers, samples):
            times.append(timer.timeit(number).median)
    return statistics.median(samples[0]), statistics.median(samples[1])


def conv2d_cases(layer, device="cpu", dtype=torch.float32):
    """(mode, native fn, ours fn, flops) for one catalog layer."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device, dtype)

    x = randn(layer.batch, layer.in_channels, layer.height, layer.width)
    w = randn(layer.out_channels, layer.in_channels // layer.groups, layer.kernel, layer.kernel)
    b = randn(layer.out_channels)
    args = (layer.stride, layer.padding, 1, layer.groups)
    grad_out = randn(layer.batch, layer.out_channels, *layer.output_size())
    leaves = [t.requires_grad_() for t in (x.clone(), w.clone(), b.clone())]

    def forward(conv):
        def run():
            with torch.no_grad():
                return conv(x, w, b, *args)
        return run

    def forward_backward(conv):
        return lambda: torch.autograd.grad(conv(*leaves, *args), leaves, grad_out)

    flops = layer.flops()
    return [
        ("forward", forward(F.conv2d), forward(functional.conv2d), flops),
        ("forward+backward", forward_backward(F.conv2d), forward_backward(functional.conv2d),
         3 * flops),
    ]


def max_pool2d_cases(layer, device="cpu", dtype=torch.float32):
    """(mode, native fn, ours fn, bytes moved) for one catalog layer, in NCHW
    and channels_last. forward: no gradients, so ours writes no indices;
    forward+indices: return_indices=True."""
    gen = torch.Generator().manual_seed(0)
    args = (layer.kernel, layer.stride, layer.padding, 1, layer.ceil_mode)
    out_h, out_w = layer.output_size()
    item = torch.empty((), dtype=dtype).element_size()
    in_bytes = layer.batch * layer.channels * layer.height * layer.width * item
    out_bytes = layer.batch * layer.channels * out_h * out_w * item
    index_bytes = out_bytes // item * 8
    fwd_bytes = in_bytes + out_bytes

    def layout_cases(layout, suffix):
        x = torch.randn(layer.batch, layer.channels, layer.height, layer.width, generator=gen)
        x = x.to(device, dtype).contiguous(memory_format=layout)
        leaf = x.clone().requires_grad_()
        grad_out = torch.randn(layer.batch, layer.channels, out_h, out_w, generator=gen)
        grad_out = grad_out.to(device, dtype).contiguous(memory_format=layout)

        def forward(pool, **kwargs):
            def run():
                with torch.no_grad():
                    return pool(x, *args, **kwargs)
            return run

        def forward_backward(pool):
            return lambda: torch.autograd.grad(pool(leaf, *args), leaf, grad_out)

        return [
            ("forward" + suffix, forward(F.max_pool2d), forward(functional.max_pool2d), fwd_bytes),
            ("forward+indices" + suffix, forward(F.max_pool2d, return_indices=True),
             forward(functional.max_pool2d, return_indices=True), fwd_bytes + index_bytes),
            # The backward reads grad_output and the indices, and writes grad_input.
            ("forward+backward" + suffix, forward_backward(F.max_pool2d),
             forward_backward(functional.max_pool2d), 2 * (fwd_bytes + index_bytes)),
        ]

    return layout_cases(torch.contiguous_format, "") + layout_cases(torch.channels_last,
                                                                    " channels_last")


def lstm_cases(layer, device="cpu", dtype=torch.float32):
    """(mode, native fn, ours fn, flops) for one catalog step or sequence:
    torch.nn.LSTMCell / LSTM against pyconvext's with the same parameters;
    forward+backward takes the gradients of the input, the states and every
    parameter."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    if isinstance(layer, LstmCellLayer):
        native = torch.nn.LSTMCell(layer.input_size, layer.hidden_size, device=device, dtype=dtype)
        ours = nn.LSTMCell(layer.input_size, layer.hidden_size, device=device, dtype=dtype)
        x = randn(layer.batch, layer.input_size)
        state_shape = (layer.batch, layer.hidden_size)
        grads = (randn(*state_shape), randn(*state_shape))
    else:
        options = dict(num_layers=layer.num_layers, bidirectional=layer.bidirectional, device=device, dtype=dtype)
        native = torch.nn.LSTM(layer.input_size, layer.hidden_size, **options)
        ours = nn.LSTM(layer.input_size, layer.hidden_size, **options)
        x = randn(layer.steps, layer.batch, layer.input_size)
        directions = 2 if layer.bidirectional else 1
        state_shape = (layer.num_layers * directions, layer.batch, layer.hidden_size)
        grads = (randn(layer.steps, layer.batch, directions * layer.hidden_size),
                 randn(*state_shape), randn(*state_shape))
    ours.load_state_dict(native.state_dict())
    state = (randn(*state_shape), randn(*state_shape))
    leaves = [t.clone().requires_grad_() for t in (x, *state)]

    def call(module, x, state):
        out = module(x, state)
        return out if isinstance(layer, LstmCellLayer) else (out[0], *out[1])

    def forward(module):
        def run():
            with torch.no_grad():
                return call(module, x, state)
        return run

    def forward_backward(module):
        inputs = leaves + list(module.parameters())
        return lambda: torch.autograd.grad(call(module, leaves[0], tuple(leaves[1:])), inputs, grads)

    flops = layer.flops()
    return [
        ("forward", forward(native), forward(ours), flops),
        ("forward+backward", forward_backward(native), forward_backward(ours), 3 * flops),
    ]


def model_cases(model, device="cpu", dtype=torch.float32):
    """(mode, native fn, ours fn, images) for one catalog model: forward in
    eval mode under no_grad (inference), and forward+backward in training mode
    into every parameter's gradient (a training step without the optimizer)."""
    torch.manual_seed(0)
    native = model.build().to(device, dtype)
    ours = convert(native, inplace=False)
    x = torch.randn(model.batch, model.channels, model.height, model.width,
                    generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def forward(net):
        def run():
            net.eval()
            with torch.no_grad():
                return net(x)
        return run

    def forward_backward(net):
        params = list(net.parameters())

        def run():
            net.train()
            return torch.autograd.grad(net(x).mean(), params)
        return run

    return [
        ("forward", forward(native), forward(ours), model.batch),
        ("forward+backward", forward_backward(native), forward_backward(ours), model.batch),
    ]


def overhead_cases(case, device="cpu", dtype=torch.float32):
    """(mode, native fn, ours fn, calls) for one call on a tiny input: the
    module's forward under no_grad, and forward+backward into the input's and
    every parameter's gradient. (Run with one thread: see run().)"""
    torch.manual_seed(0)
    kind = case.name.split(".")[0]
    native = {"conv2d": lambda: torch.nn.Conv2d(1, 1, 3), "max_pool2d": lambda: torch.nn.MaxPool2d(2),
              "lstm_cell": lambda: torch.nn.LSTMCell(4, 4), "lstm": lambda: torch.nn.LSTM(4, 4)}[kind]()
    if case.name == "max_pool2d.indices":
        native.return_indices = True
    native = native.to(device, dtype)
    ours = convert(native, inplace=False)
    shape = {"conv2d": (1, 1, 4, 4), "max_pool2d": (1, 1, 4, 4), "lstm_cell": (1, 4), "lstm": (1, 1, 4)}[kind]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype).requires_grad_()

    def forward(module):
        def run():
            with torch.no_grad():
                return module(x)
        return run

    def forward_backward(module):
        leaves = [x, *module.parameters()]

        def run():
            out = module(x)
            first = out[0] if isinstance(out, tuple) else out
            return torch.autograd.grad(first.sum(), leaves)
        return run

    return [("forward", forward(native), forward(ours), 1),
            ("forward+backward", forward_backward(native), forward_backward(ours), 1)]


CASES = {"conv2d": conv2d_cases, "max_pool2d": max_pool2d_cases, "lstm": lstm_cases,
         "models": model_cases, "overhead": overhead_cases}
UNITS = {"conv2d": "GFLOP/s", "max_pool2d": "GB/s", "lstm": "GFLOP/s", "models": "images/s",
         "overhead": "calls/s"}
UNIT_SCALE = {"GFLOP/s": 1e9, "GB/s": 1e9, "images/s": 1, "calls/s": 1}


def copy_bandwidth(device="cpu", megabytes=128):
    """Bytes read + written per second by a large tensor copy on `device`."""
    src = torch.ones(megabytes << 18, device=device)
    dst = torch.empty_like(src)
    seconds = _timer(lambda: dst.copy_(src), torch.get_num_threads()).blocked_autorange(
        min_run_time=0.5).median
    return 2 * src.nbytes / seconds


def run(op, device="cpu", dtype=torch.float32, layers=None, min_time=2.0, progress=None,
        batch_scale=1, batch=None):
    """Races every catalog layer of `op` (or those named in `layers`), with the
    catalog's batch sizes times batch_scale (or all at `batch`); returns Results.
    The overhead catalog runs on one thread (per-call costs, without the
    threads' start-up in them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if op == "overhead" else threads)
    try:
        return _run(op, device, dtype, layers, min_time, progress, batch_scale, batch)
    finally:
        torch.set_num_threads(threads)


def _run(op, device, dtype, layers, min_time, progress, batch_scale, batch):
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    keep_freed_memory()
    bandwidth = copy_bandwidth(device) if UNITS[op] == "GB/s" else None
    results = []
    chosen = [layer for layer in CATALOGS[op] if not layers or layer.name in layers]
    if not has_kernel(op, device):
        if chosen and progress:
            progress.note(f"{op}: pyconvext has no {device} kernel for it in this build: left out")
        return []
    if op == "models" and not has_torchvision():
        left_out = [m.name for m in chosen if m.torchvision]
        chosen = [m for m in chosen if not m.torchvision]
        if left_out and progress:
            progress.note(f"torchvision is not installed: left out {', '.join(left_out)}")
    for number, layer in enumerate(chosen, 1):
        layer = dataclasses.replace(layer, batch=batch or layer.batch * batch_scale)
        if progress:
            progress.start(f"{op} {layer.name} ({number}/{len(chosen)})")
        for mode, native, ours, work in CASES[op](layer, device, dtype):
            native_s, ours_s = race(native, ours, min_time=min_time)
            floor_ms = work / bandwidth * 1e3 if bandwidth else None
            result = Result(op, layer.name, layer.shape(), mode, native_s * 1e3, ours_s * 1e3,
                            work / ours_s / UNIT_SCALE[UNITS[op]], floor_ms)
            results.append(result)
            if progress:
                progress.done(result)
    return results


def machine(device="cpu"):
    """The machine line that goes with a table."""
    if device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{_cpu_model()}, {torch.get_num_threads()} threads"
    malloc = "glibc malloc keeping freed memory" if keep_freed_memory() else "default malloc"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}; {malloc}"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


HEADER = ("layer", "shape", "mode", "native ms", "ours ms", "speedup", "ours rate", "vs floor")
WIDTHS = (14, 30, 30, 10, 10, 8, 14, 8)  # of the columns of the console table


def row(result):
    """The table cells; vs floor: our time over the time the bytes moved take
    at the copy bandwidth of this run (1.00x is as fast as a copy)."""
    floor = f"{result.ours_ms / result.floor_ms:.2f}x" if result.floor_ms else ""
    return (result.layer, result.shape, result.mode, f"{result.native_ms:.3f}",
            f"{result.ours_ms:.3f}", f"{result.speedup:.2f}x",
            f"{result.rate:.1f} {UNITS[result.op]}", floor)


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary(results):
    """Geometric mean and minimum speedup per mode (per operator and mode when
    the results span several operators)."""
    several = len({r.op for r in results}) > 1

    def label(r):
        return f"{r.op} {r.mode}" if several else r.mode

    lines = []
    for name in dict.fromkeys(map(label, results)):
        group = [r for r in results if label(r) == name]
        worst = min(group, key=lambda r: r.speedup)
        lines.append(f"{name}: geometric mean speedup {geomean(r.speedup for r in group):.2f}x over "
                     f"{len(group)} layers, lowest {worst.speedup:.2f}x ({worst.layer})")
        if group[0].op == "overhead":
            extra = max(group, key=lambda r: r.ours_ms - r.native_ms)
            lines.append(f"{name}: extra cost per call at most {(extra.ours_ms - extra.native_ms) * 1e3:.2f} us "
                         f"({extra.layer})")
    return lines


def markdown_table(results):
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def write_csv(results, path):
    """Numbers to 6 significant digits: a few-microsecond layer keeps its precision."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["op", "layer", "shape", "mode", "native_ms", "ours_ms", "speedup",
                         "rate", "unit", "floor_ms"])
        for r in results:
            writer.writerow([r.op, r.layer, r.shape, r.mode, f"{r.native_ms:.6g}",
                             f"{r.ours_ms:.6g}", f"{r.speedup:.6g}", f"{r.rate:.6g}",
                             UNITS[r.op], f"{r.floor_ms:.6g}" if r.floor_ms else ""])


def print_line(cells, file=sys.stdout):
    print("  ".join(f"{cell:>{width}}" for cell, width in zip(cells, WIDTHS)), file=file, flush=True)


class ConsoleProgress:
    """Prints each result as a table row as soon as it is measured, and, on a
    terminal, which layer is being raced meanwhile."""

    def __init__(self, file=sys.stdout):
        self.file = file
        self.live = file.isatty()

    def start(self, what):
        if self.live:
            print(f"\r\033[Kracing {what} ...", end="", file=self.file, flush=True)

    def note(self, text):
        print(f"# {text}", file=self.file, flush=True)

    def done(self, result):
        if self.live:
            print("\r\033[K", end="", file=self.file)
        print_line(row(result), self.file)


def plot(results, path, title=""):
    """A bar chart of the speedups, a panel per operator, a bar per layer and
    mode, with 1x (as fast as native) marked. Needs matplotlib."""
    plt = pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ops = list(dict.fromkeys(r.op for r in results))
    panels = [[r for r in results if r.op == op] for op in ops]
    # A panel's height follows its bars: layers x modes.
    heights = [len({r.layer for r in rs}) * (0.25 + 0.13 * len({r.mode for r in rs})) for rs in panels]
    fig, axes = plt.subplots(len(ops), 1, squeeze=False, figsize=(10, 0.6 + sum(heights) + 0.7 * len(ops)),
                             gridspec_kw={"height_ratios": heights})
    ticks = [0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50, 100]
    for ax, op, ours in zip(axes[:, 0], ops, panels):
        layers = list(dict.fromkeys(r.layer for r in ours))
        modes = list(dict.fromkeys(r.mode for r in ours))
        bar = 0.8 / len(modes)
        for m, mode in enumerate(modes):
            bars = [(layers.index(r.layer) + (m - (len(modes) - 1) / 2) * bar, r.speedup)
                    for r in ours if r.mode == mode]
            ys, speedups = zip(*bars)
            drawn = ax.barh(ys, speedups, height=bar, label=mode)
            ax.bar_label(drawn, labels=[f"{s:.2f}x" for s in speedups], padding=2, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=7)
        ax.set_yticks(range(len(layers)), layers)
        ax.invert_yaxis()
        ax.set_title(f"{op}: speedup over native PyTorch (native time / ours; right of the dashed line is faster)",
                     fontsize=9)
        ax.margins(x=0.12)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.99 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pyplot():
    """matplotlib.pyplot without a display, or an ImportError that says how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib, an optional dependency of pyconvext: "
                          "pip install matplotlib (or pip install 'pyconvext[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
