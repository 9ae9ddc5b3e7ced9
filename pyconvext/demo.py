"""python -m pyconvext demo: what pyconvext is, in under a minute on 2 CPU cores.

1. the build: backends, instruction set, the torch it runs on;
2. one layer per operator, ours against native on the same inputs: the
   results compared (outputs and every gradient), then raced;
3. one epoch of the classic MNIST example on our kernels and on native ones,
   side by side: test accuracy and training time.
"""

import platform
import time

import torch

import pyconvext

from . import bench, mnist_example
from .data import mnist

# One layer per operator, from the catalog: the MNIST net's second convolution
# and first pooling, and the small LSTM step.
LAYERS = (("conv2d", "mnist.conv2"), ("max_pool2d", "mnist.pool1"), ("lstm", "cell.small"))


def _layer(op, name):
    return next(layer for layer in bench.CATALOGS[op] if layer.name == name)


def build(log=print):
    info = pyconvext.build_info()
    log("pyconvext build")
    log(f"  backends: {', '.join(info['backends'])}; CPU kernels: {info['cpu_capability']}; "
        f"{torch.get_num_threads()} threads on {bench._cpu_model()}")
    log(f"  torch {torch.__version__}, Python {platform.python_version()}")
    for key in ("cuda_archs", "compiler"):
        if info.get(key):
            log(f"  {key}: {info[key]}")


def operators(device, min_time, log=print):
    """Races one layer per operator; returns False if any result disagrees with native."""
    log(f"\nOur kernels against native PyTorch ({device}, float32; speedup = native time / ours)")
    bench.keep_freed_memory()
    if device == "cuda":  # native float32 in full precision, as ours
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    all_agree = True
    for op, name in LAYERS:
        layer = _layer(op, name)
        if not bench.has_kernel(op, device):
            log(f"  {op:<10} {name:<12} no {device} kernel in this build yet")
            continue
        for mode, native, ours, _ in bench.CASES[op](layer, device):
            if "channels_last" in mode or "indices" in mode:
                continue
            error = relative_error(ours(), native())
            agree = error <= TOLERANCE
            all_agree &= agree
            native_s, ours_s = bench.race(native, ours, min_time=min_time)
            log(f"  {op:<10} {name:<12} {layer.shape():<22} {mode:<17} native {native_s * 1e3:8.3f} ms"
                f"  ours {ours_s * 1e3:8.3f} ms  {native_s / ours_s:5.2f}x  error {error:.1e}  "
                + ("same results" if agree else "DIFFERENT"))
    return all_agree


# float32 sums of hundreds of products round differently in any two kernels:
# ~100 units in the last place of the largest value is still the same result.
TOLERANCE = 1e-5


def relative_error(ours, native):
    """The largest |ours - native| over every output and gradient, each relative
    to the largest |native| of its tensor."""
    if isinstance(ours, torch.Tensor):
        if not ours.is_floating_point():
            return 0.0 if torch.equal(ours, native) else float("inf")
        scale = native.abs().max().clamp_min(torch.finfo(native.dtype).tiny)
        return ((ours - native).abs().max() / scale).item()
    return max(relative_error(a, b) for a, b in zip(ours, native, strict=True))


def mnist_epoch(device, data_dir, log=print):
    """One epoch of the MNIST example per backend; False when the data is missing."""
    log("\nThe classic MNIST example, one epoch (SGD lr 0.01, batch 64, seed 1), ours and native")
    try:
        start = time.perf_counter()
        train_set, test_set = mnist.Dataset(True, data_dir), mnist.Dataset(False, data_dir)
    except mnist.MNISTUnavailable as error:
        log(f"  {error}\n  Then run the demo again (--data-dir D names the folder; --skip-mnist leaves "
            "this part out).")
        return False
    log(f"  data: {mnist.data_dir(data_dir)} ({time.perf_counter() - start:.1f} s to read)")
    _, history = mnist_example.train(
        mnist_example.BACKENDS, epochs=1, device=device.type, train_set=train_set,
        test_set=test_set, log_interval=300, log=lambda line: line.strip() and log("  " + line.strip()))
    log("")
    for e in history:
        log(f"  {e.backend:<9}: accuracy {e.correct}/{e.total} ({100 * e.correct / e.total:.2f}%), "
            f"training epoch {e.train_s:.1f} s")
    times = {e.backend: e.train_s for e in history}
    log(f"  pyconvext's training epoch: {times['native'] / times['pyconvext']:.2f}x native's speed. "
        "Ten epochs: python -m pyconvext train-mnist --backend both")
    return True


def main(data_dir=None, min_time=1.0, skip_mnist=False, log=lambda line: print(line, flush=True)):
    """The demo; returns the exit status: 1 when a result disagreed with native
    or the MNIST part could not run (the last line says which), 0 otherwise
    (also with skip_mnist, which leaves the MNIST part out)."""
    start = time.perf_counter()
    device = mnist_example.pick_device()
    build(log)
    agree = operators(device.type, min_time, log)
    trained = None if skip_mnist else mnist_epoch(device, data_dir, log)
    failures = ([] if agree else ["results DIFFERENT from native's"]) + (
        ["the MNIST part did not run (no MNIST files; see above)"] if trained is False else [])
    took = f"{time.perf_counter() - start:.0f} s"
    if failures:
        log(f"\ndemo FAILED after {took}: {'; '.join(failures)}")
    else:
        log(f"\ndemo finished in {took}" + (" (MNIST part skipped: --skip-mnist)" if skip_mnist else ""))
    return 1 if failures else 0
