"""The CPU kernels are compiled for AVX-512, AVX2 and the baseline instruction
set and pick the widest the CPU has. Run the conv2d, max_pool2d and LSTM tests once more under each
narrower variant this CPU can run (PYCONVEXT_CPU_CAPABILITY lowers the choice)."""

import os
import subprocess
import sys

import pytest

import pyconvext
from test_build import ROOT

ORDER = ["default", "avx2", "avx512"]
NATIVE = pyconvext.build_info()["cpu_capability"]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_kernels_under_capability(capability):
    if ORDER.index(capability) >= ORDER.index(NATIVE):
        pytest.skip(f"the kernels already run as {NATIVE} here")
    env = {**os.environ, "PYCONVEXT_CPU_CAPABILITY": capability}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_conv2d.py",
         "tests/test_max_pool2d.py", "tests/test_lstm.py", "-k", "not compile"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
