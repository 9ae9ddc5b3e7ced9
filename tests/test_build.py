"""The build: what build_info() reports, the guards against a mismatched torch
or a missing CUDA kernel, and setup.py's choice of CUDA toolkit."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import pyconvext

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_setup_module():
    spec = importlib.util.spec_from_file_location("pyconvext_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_info():
    info = pyconvext.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["torch_git_version"] == torch.version.git_version
    assert info["backends"][0] == "cpu"
    assert info["compiler"] not in ("", "unknown")
    assert info["kernels"]["conv2d"][0] == "CPU"
    assert info["kernels"]["conv2d_backward"][0] == "CPU"
    if "cuda" in info["backends"]:
        assert info["cuda_archs"] and info["cuda_toolkit"] not in (None, "unknown")
        assert info["no_cuda_reason"] is None
    else:
        assert info["cuda_archs"] is None and info["no_cuda_reason"]


def test_import_gives_every_subpackage_lazily():
    """After a bare `import pyconvext` every public submodule and subpackage is
    an attribute (pyconvext.models.LeNet5() as the README writes it), and the
    ones not needed by the operators load on first use only."""
    code = (
        "import pkgutil, sys, pyconvext\n"
        "lazy = [m for m in pyconvext._LAZY if f'pyconvext.{m}' in sys.modules]\n"
        "assert not lazy, f'imported at once: {lazy}'\n"
        "public = [m.name for m in pkgutil.iter_modules(pyconvext.__path__) if not m.name.startswith('_')]\n"
        "assert {'models', 'data', 'functional', 'nn'} <= set(public), public\n"
        "for name in public:  # (pyconvext.convert is the function of the module convert)\n"
        "    found = getattr(pyconvext, name)\n"
        "    assert found is sys.modules[f'pyconvext.{name}'] or found.__module__ == f'pyconvext.{name}', name\n"
        "    assert name in dir(pyconvext), name\n"
        "pyconvext.models.LeNet5(); pyconvext.data.mnist.MNISTUnavailable\n"
        "try:\n"
        "    pyconvext.no_such_module\n"
        "except AttributeError as error:\n"
        "    assert str(error) == \"module 'pyconvext' has no attribute 'no_such_module'\", error\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_import_under_another_torch_is_refused():
    """A library built against another torch is never loaded (its ABI may differ)."""
    code = "import torch; torch.__version__ = '0.0.1'; import pyconvext"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stderr  # an exception, not a crash
    assert "ImportError: pyconvext was built against torch " + torch.__version__ in result.stderr
    assert "but torch 0.0.1" in result.stderr
    assert "Rebuild pyconvext against the installed torch: pip install --no-build-isolation" in result.stderr


@pytest.mark.parametrize("op", ["conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_values",
                                "max_pool2d_backward", "lstm_cell", "lstm_cell_backward", "lstm_layer",
                                "lstm_layer_backward"])
def test_cuda_call_without_cuda_kernel_names_the_fix(op):
    """Operators without a compiled CUDA kernel refuse CUDA tensors with a message
    that says why and how to rebuild. (Reached here without a GPU by
    dispatching straight to the CUDA key.)"""
    if "CUDA" in pyconvext.build_info()["kernels"][op]:
        pytest.skip(f"this build has a CUDA kernel for {op}")
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    h = torch.randn(2, 4)
    args = {
        "conv2d": (x, w, None, [1, 1], [0, 0], [1, 1], 1),
        "conv2d_backward": (torch.randn(1, 4, 6, 6), x, w, [1, 1], [0, 0], [1, 1], 1, [True] * 3),
        "max_pool2d": (x, *pool),
        "max_pool2d_values": (x, *pool),
        "max_pool2d_backward": (torch.randn(1, 3, 4, 4), x, torch.zeros(1, 3, 4, 4, dtype=torch.long), *pool),
        "lstm_cell": (torch.randn(2, 3), h, h, torch.randn(16, 3), torch.randn(16, 4), None, None),
        "lstm_cell_backward": (h, h, torch.randn(2, 3), h, h, torch.randn(16, 3), torch.randn(16, 4),
                               torch.randn(2, 20), False),
        "lstm_layer": (torch.randn(5, 2, 3), h, h, torch.randn(16, 3), torch.randn(16, 4), None, None, None,
                       None, False),
        "lstm_layer_backward": (torch.randn(5, 2, 4), h, h, torch.randn(5, 2, 3), h, h, torch.randn(16, 3),
                                torch.randn(16, 4), None, None, False, torch.randn(5, 2, 4),
                                torch.randn(10, 24), False),
    }[op]
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(NotImplementedError, match=rf"^pyconvext.{op}: got CUDA tensors, but .*Rebuild pyconvext"):
        getattr(torch.ops.pyconvext, op).default.redispatch(cuda, *args)


@pytest.mark.cuda
def test_cuda_tensors_get_a_kernel_or_a_clear_error():
    x, w = torch.randn(1, 3, 8, 8, device="cuda"), torch.randn(4, 3, 3, 3, device="cuda")
    if "CUDA" in pyconvext.build_info()["kernels"]["conv2d"]:
        torch.testing.assert_close(pyconvext.functional.conv2d(x, w), torch.nn.functional.conv2d(x, w))
    else:
        with pytest.raises(NotImplementedError, match=r"^pyconvext.conv2d: got CUDA tensors"):
            pyconvext.functional.conv2d(x, w)


# --- setup.py ----------------------------------------------------------------------------

def fake_nvcc(folder, top):
    """An nvcc wrapper script that reports `top` as its toolkit, as nvcc --dryrun does."""
    nvcc = folder / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={top}/bin/..' >&2\n")
    nvcc.chmod(0o755)
    return nvcc


def test_cuda_home_order(tmp_path):
    setup = load_setup_module()
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").touch()
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    fake_nvcc(wrappers, toolkit)
    no_default = str(tmp_path / "absent")

    assert setup.find_cuda_home({"CUDA_HOME": "/opt/cuda", "PATH": ""}, no_default) == "/opt/cuda"
    assert setup.find_cuda_home({"PATH": str(wrappers)}, str(toolkit)) == str(toolkit)
    assert setup.find_cuda_home({"PATH": str(wrappers)}, no_default) == str(toolkit)
    assert setup.find_cuda_home({"PATH": str(tmp_path / "empty")}, no_default) is None


def test_setup_refuses_force_cuda_without_cuda():
    env = {**os.environ, "USE_CUDA": "0", "FORCE_CUDA": "1"}
    result = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True,
                            cwd=ROOT, env=env)
    assert result.returncode != 0
    assert "FORCE_CUDA=1 but the CUDA kernels cannot be built: USE_CUDA=0" in result.stderr


def test_setup_cpu_only_plan(monkeypatch):
    setup = load_setup_module()
    monkeypatch.setenv("USE_CUDA", "0")
    assert setup.cuda_plan(torch) == (False, "USE_CUDA=0")


def test_cuda_archs_default_to_the_visible_gpus(monkeypatch):
    """Where a GPU is visible at build time the build targets it (plus PTX),
    not the three architectures of DEFAULT_CUDA_ARCHS; TORCH_CUDA_ARCH_LIST
    overrides either."""
    setup = load_setup_module()
    capabilities = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])

    assert setup.cuda_archs(torch, {}) == setup.DEFAULT_CUDA_ARCHS == "7.5;8.0;9.0+PTX"
    assert setup.cuda_archs(torch, {"TORCH_CUDA_ARCH_LIST": "8.0"}) == "8.0"
    capabilities[:] = [(9, 0)]
    assert setup.cuda_archs(torch, {}) == "9.0+PTX"
    assert setup.cuda_archs(torch, {"TORCH_CUDA_ARCH_LIST": ""}) == "9.0+PTX"
    assert setup.cuda_archs(torch, {"TORCH_CUDA_ARCH_LIST": "7.5;8.0"}) == "7.5;8.0"
    capabilities[:] = [(9, 0), (8, 6), (9, 0)]
    assert setup.cuda_archs(torch, {}) == "8.6;9.0+PTX"


def test_pip_builds_keep_their_objects_where_build_ext_does():
    """pip's builds use the objects folder of `python setup.py build_ext`, not a
    fresh temporary one, so a second `pip install -e .` recompiles nothing unchanged."""
    from setuptools.dist import Distribution

    build = Distribution().get_command_obj("build")
    build.finalize_options()
    assert load_setup_module().object_folder() == str(ROOT / build.build_temp)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF shared libraries")
def test_links_libstdcxx_as_a_shared_library():
    """A copy of libstdc++ inside _C (a driver that links it statically) never
    sets up its streams: error messages that format numbers came out cut
    short, or crashed the process, on such a toolchain."""
    readelf = subprocess.run(["readelf", "-d", pyconvext._C.__file__], capture_output=True, text=True)
    if readelf.returncode != 0:
        pytest.skip("readelf is not available")
    assert "libstdc++.so" in readelf.stdout
    assert "libstdc++.so" in load_setup_module().loaded_libstdcxx()
