"""pytest-benchmark suite over the max_pool2d catalog of pyconvext.bench: native
and pyconvext side by side, NCHW and channels_last, forward (values only),
forward with indices and forward+backward, grouped per layer and mode.

    python -m pytest benchmarks/test_max_pool2d_speed.py --benchmark-only --benchmark-group-by=group

`python -m pyconvext bench --op max_pool2d` races the same cases interleaved
and prints the speedups and the bandwidth floor.
"""

import pytest
import torch

from pyconvext.bench import MAX_POOL2D_CATALOG, max_pool2d_cases
from test_conv2d_speed import DEVICES


@pytest.mark.parametrize("impl", ["native", "pyconvext"])
@pytest.mark.parametrize("mode", ["forward", "forward+indices", "forward+backward",
                                  "forward channels_last", "forward+indices channels_last",
                                  "forward+backward channels_last"])
@pytest.mark.parametrize("layer", MAX_POOL2D_CATALOG, ids=lambda layer: layer.name)
@pytest.mark.parametrize("device", DEVICES)
def test_max_pool2d(benchmark, device, layer, mode, impl):
    cases = {name: (native, ours) for name, native, ours, _ in max_pool2d_cases(layer, device)}
    fn = cases[mode][0 if impl == "native" else 1]
    benchmark.group = f"max_pool2d {device} {layer.name} {mode}"
    if device == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark.extra_info["threads"] = torch.get_num_threads()
        benchmark(fn)
