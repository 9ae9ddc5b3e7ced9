"""pytest-benchmark suite over the conv2d catalog of pyconvext.bench: native and
pyconvext side by side, forward and forward+backward, grouped per layer.

    python -m pytest benchmarks --benchmark-only --benchmark-group-by=group

`python -m pyconvext bench` races the same cases interleaved and prints the
speedups; this suite is for pytest-benchmark's statistics, history and
comparisons between runs (--benchmark-autosave, --benchmark-compare).
"""

import pytest
import torch

from pyconvext.bench import CONV2D_CATALOG, conv2d_cases


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")),
]


@pytest.mark.parametrize("impl", ["native", "pyconvext"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("layer", CONV2D_CATALOG, ids=lambda layer: layer.name)
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d(benchmark, device, layer, mode, impl):
    cases = {name: (native, ours) for name, native, ours, _ in conv2d_cases(layer, device)}
    fn = cases[mode][0 if impl == "native" else 1]
    benchmark.group = f"conv2d {device} {layer.name} {mode}"
    if device == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # both sides in true float32
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark.extra_info["threads"] = torch.get_num_threads()
        benchmark(fn)
