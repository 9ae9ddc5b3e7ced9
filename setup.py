"""Builds pyconvext._C, the compiled kernels, against the installed torch.

Environment:
  USE_CUDA=0              build the CPU kernels only.
  FORCE_CUDA=1            fail if the CUDA kernels cannot be built.
  CUDA_HOME               CUDA toolkit (default: /usr/local/cuda, else the nvcc on PATH).
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default: those of the GPUs visible at build
                          time, plus PTX; DEFAULT_CUDA_ARCHS where none is visible).

Build with the torch that will run the kernels:
  pip install --no-build-isolation .       (or -e . for a development checkout)
"""

import glob
import os
import pprint
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Where no GPU is visible at build time: Turing (T4, RTX 20), Ampere and Ada
# (8.x run 8.0 code), Hopper, and PTX for newer GPUs. (float16 and bfloat16
# need 8.0 or newer.)
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def cuda_archs(torch, environ=os.environ):
    """The CUDA architectures to build: TORCH_CUDA_ARCH_LIST where set, else the
    compute capabilities of the GPUs visible at build time, the newest also as
    PTX (nvcc compiles the device code once per architecture), else
    DEFAULT_CUDA_ARCHS."""
    if environ.get("TORCH_CUDA_ARCH_LIST"):
        return environ["TORCH_CUDA_ARCH_LIST"]
    if not torch.cuda.is_available():
        return DEFAULT_CUDA_ARCHS
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in capabilities) + "+PTX"


def find_cuda_home(environ=os.environ, default="/usr/local/cuda"):
    """CUDA_HOME, else /usr/local/cuda, else the toolkit of the nvcc on PATH."""
    if environ.get("CUDA_HOME"):
        return environ["CUDA_HOME"]
    if os.path.exists(os.path.join(default, "bin", "nvcc")):
        return default
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc is None:
        return None
    # The nvcc on PATH may be a wrapper script; nvcc itself reports its TOP folder.
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        match = re.search(r"^#\$ TOP=(.+)$", dry_run.stderr + dry_run.stdout, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        match = None
    return os.path.realpath(match.group(1).strip()) if match else None


def cuda_plan(torch):
    """(build CUDA?, reason when not)."""
    if os.environ.get("USE_CUDA") == "0":
        return False, "USE_CUDA=0"
    if torch.version.cuda is None:
        return False, "the installed torch is a CPU-only build"
    cuda_home = find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return False, "no CUDA toolkit found (set CUDA_HOME to the toolkit folder)"
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    return True, None


def cuda_library_includes():
    """Header folders of the pip wheels of the CUDA libraries torch depends on
    (nvidia-cublas, nvidia-cusparse, ...). ATen's CUDA headers include cuBLAS and
    cuSPARSE headers that a minimal toolkit may lack; these folders are searched
    after the toolkit's own."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(
        include for root in nvidia.__path__ for include in glob.glob(os.path.join(root, "*", "include"))
    )


def loaded_libstdcxx():
    """The libstdc++ shared library this process (torch) runs with, on Linux.

    _C links it by path, so that libstdc++ is shared even where the compiler
    would link its static archive (a toolchain whose library folder holds
    only libstdc++.a): a private copy inside _C never sets up its streams, so
    every error message that formats a number came out cut short, or crashed
    the process."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        pass
    return None


def object_folder():
    """Where the compiled objects stay between builds: the source folder's
    build/temp.<platform>-<python>, as `python setup.py build_ext` uses. pip
    builds (editable ones too) would compile into a fresh temporary folder each
    time, every source again (minutes; the Quick start's second command would
    redo the first one's compile); in this folder ninja recompiles only the
    objects whose source, headers or command line changed."""
    return os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


def version_line(command, pattern=r".+"):
    """The first line of `command --version` that matches pattern."""
    try:
        out = subprocess.run(command + ["--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(pattern, out.stdout)
    return match.group(0).strip() if match else "unknown"


def main():
    import torch

    with_cuda, no_cuda_reason = cuda_plan(torch)
    if not with_cuda and os.environ.get("FORCE_CUDA") == "1":
        sys.exit(f"pyconvext: FORCE_CUDA=1 but the CUDA kernels cannot be built: {no_cuda_reason}")
    if with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs(torch)
    else:
        print(f"pyconvext: building the CPU kernels only ({no_cuda_reason})", file=sys.stderr)

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(
        glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp")
        + glob.glob("csrc/autograd/*.cpp")
    )
    cxx_flags = ["-O3", "-fopenmp"]
    libstdcxx = loaded_libstdcxx()
    link_args = ["-fopenmp"] + ([libstdcxx] if libstdcxx else [])
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        cxx_flags.append("-DWITH_CUDA")
        extension = CUDAExtension(
            "pyconvext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-DWITH_CUDA"]},
            extra_link_args=link_args,
        )
        extension.include_dirs += cuda_library_includes()
    else:
        extension = CppExtension(
            "pyconvext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args,
        )

    build_info = {
        "backends": ["cpu", "cuda"] if with_cuda else ["cpu"],
        "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None,
        "cuda_toolkit": (
            version_line([os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")], r"(?<=, V)[\d.]+")
            if with_cuda else None
        ),
        "no_cuda_reason": no_cuda_reason,
        "torch_version": torch.__version__,
        "torch_git_version": torch.version.git_version,
        "torch_cuda_version": torch.version.cuda,
        "compiler": version_line([os.environ.get("CXX", "c++")]),
    }

    class BuildWithInfo(BuildExtension):
        """Keeps the objects in object_folder(); writes pyconvext/_build_info.py
        beside the compiled library."""

        def finalize_options(self):
            super().finalize_options()
            if os.access(ROOT, os.W_OK):
                self.build_temp = object_folder()

        def run(self):
            super().run()
            # With --inplace (editable installs) this is the source folder.
            target = os.path.join(
                os.path.dirname(self.get_ext_fullpath("pyconvext._C")), "_build_info.py"
            )
            with open(target, "w") as f:
                f.write("# Written by setup.py when pyconvext._C was built.\n")
                f.write(f"BUILD_INFO = {pprint.pformat(build_info)}\n")

    setup(ext_modules=[extension], cmdclass={"build_ext": BuildWithInfo})


if __name__ == "__main__":
    main()
