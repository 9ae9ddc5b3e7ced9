"""The CMake build for libtorch programs: builds the library and
tests/cpp/conv2d_check.cpp and max_pool2d_check.cpp (pyconvext's operators
through csrc/pyconvext.h against ATen's) and autograd_check.cpp (backward()
through them, against ATen's gradients) and runs the programs, without and (where a CUDA toolkit is found)
with WITH_CUDA."""

import glob
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

from test_build import ROOT, load_setup_module


def cuda_home_or_skip():
    cuda_home = load_setup_module().find_cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit found")
    return cuda_home


def cmake_cuda_arguments(cuda_home):
    """A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit,
    and for libnvrtc, which pip installs beside torch rather than in the toolkit."""
    arguments = [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}"]
    if not glob.glob(os.path.join(cuda_home, "lib*", "libnvrtc.so*")):
        import nvidia

        nvrtc = sorted(lib for root in nvidia.__path__ for lib in glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
        if nvrtc:
            arguments.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return arguments


@pytest.mark.parametrize("with_cuda", [False, True], ids=["cpu", "with_cuda"])
def test_cmake_build_and_cpp_api(tmp_path, with_cuda):
    cmake = shutil.which("cmake")
    assert cmake, "cmake is required (pip install cmake)"
    configure = [cmake, "-S", str(ROOT), "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda or with_cuda:
        if with_cuda and not torch.version.cuda:
            pytest.skip("torch is a CPU-only build")
        # torch's CMake config needs the toolkit whenever torch is a CUDA build.
        cuda_home = cuda_home_or_skip()
        configure += cmake_cuda_arguments(cuda_home)
    if with_cuda:
        configure += ["-DWITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc", "-DCMAKE_CUDA_ARCHITECTURES=90"]
    # Without it, torch's CMake config probes for GPUs by compiling a CUDA program.
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
    for command in (configure, [cmake, "--build", str(tmp_path), "-j", str(os.cpu_count() or 1)]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for program, cases in (("conv2d_check", 5), ("max_pool2d_check", 4), ("autograd_check", 4)):
        check = subprocess.run([str(pathlib.Path(tmp_path) / program)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert f"ok: {cases} cases match ATen" in check.stdout
