"""pyconvext: our own CPU and CUDA kernels for 2-D convolution, max pooling and LSTMs, registered as
PyTorch operators (torch.ops.pyconvext.*) with autograd, and drop-in
replacements for the torch.nn modules that use them."""

import importlib

import torch

_REBUILD = (
    "Rebuild pyconvext against the installed torch: "
    "pip install --no-build-isolation --no-deps --force-reinstall <pyconvext source folder> "
    "(add -e for a development checkout)."
)


def _check_torch_version(built: dict) -> None:
    """Refuses to load kernels compiled against another torch (its C++ ABI may differ)."""
    built_version = (built["torch_version"], built["torch_git_version"])
    running_version = (torch.__version__, torch.version.git_version)
    if built_version != running_version:
        raise ImportError(
            f"pyconvext was built against torch {built_version[0]} (git {built_version[1]}), "
            f"but torch {running_version[0]} (git {running_version[1]}) is installed. "
            + _REBUILD
        )


def _load_library() -> dict:
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        raise ImportError(
            "pyconvext's compiled kernels are missing (pyconvext/_build_info.py not found): "
            "build them with: pip install --no-build-isolation -e ."
        ) from None
    _check_torch_version(BUILD_INFO)
    try:
        from . import _C  # noqa: F401  (loading the library registers the operators)
    except ImportError as error:
        raise ImportError(f"pyconvext's compiled library failed to load ({error}). " + _REBUILD) from error
    return BUILD_INFO


_BUILD_INFO = _load_library()

from . import _registrations  # noqa: E402
from . import functional, nn  # noqa: E402
from . import onnx  # noqa: E402
from .convert import convert, revert  # noqa: E402

onnx.register()  # ONNX translations of our operators, registered as each exporter loads


def build_info() -> dict:
    """What this installation of pyconvext was compiled with: backends, CUDA
    architectures and toolkit, the torch it was built against, the compiler;
    the vector instructions its CPU kernels use on this machine
    (cpu_capability: avx512, avx2 or default, lowered by the environment
    variable PYCONVEXT_CPU_CAPABILITY); and, per operator, the dispatch keys
    that have one of our kernels."""
    from . import _C

    return {
        **_BUILD_INFO,
        "cpu_capability": _C.cpu_capability,
        "kernels": {op: list(keys) for op, keys in _registrations.KERNELS.items()},
    }


# The other submodules and subpackages (models, data, bench, demo,
# mnist_example, ...) load on first use: pyconvext.models works after a bare
# `import pyconvext`, which stays as quick as loading the kernels.
_LAZY = ("bench", "data", "demo", "mnist_example", "models")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["build_info", "convert", "functional", "nn", "onnx", "revert"]
