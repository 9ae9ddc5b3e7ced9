"""convert(model) / revert(model): swap torch.nn's Conv2d, MaxPool2d, LSTMCell
and LSTM for pyconvext's, and back.

A module is swapped by changing its class, not by building a new module:
pyconvext's modules are subclasses of the native ones that only change how
forward computes. So the object keeps its parameters and buffers (the same
Parameter objects: an optimizer built before, tied weights, requires_grad,
device and dtype all carry on), its hooks, training mode, extra attributes and
state_dict keys, and a module shared under two names stays one module.
"""

import copy
import dataclasses
import fnmatch
import functools
import sys

import torch
from torch.nn.utils import parametrize

from . import _registrations, nn

# native class -> (pyconvext class, operator that runs it, dtypes it takes)
SWAPS = {
    torch.nn.Conv2d: (nn.Conv2d, "conv2d",
                      (torch.float32, torch.float64, torch.float16, torch.bfloat16)),
    torch.nn.MaxPool2d: (nn.MaxPool2d, "max_pool2d", None),  # no parameters: any dtype at call time
    torch.nn.LSTMCell: (nn.LSTMCell, "lstm_cell", (torch.float32, torch.float64)),
    torch.nn.LSTM: (nn.LSTM, "lstm_layer", (torch.float32, torch.float64)),
}
NATIVE = {ours: native for native, (ours, _, _) in SWAPS.items()}
# Devices whose tensors our operators take without a compiled kernel (shapes only).
_SHAPE_ONLY_DEVICES = ("meta",)


@dataclasses.dataclass
class Entry:
    name: str  # qualified name in the model ("" for the model itself)
    type: str  # the module's class before convert() / revert()
    action: str  # "converted", "already pyconvext", "left", "reverted"
    reason: str = ""


class Report(list):
    """What convert() or revert() did to each candidate module, and why."""

    def __str__(self):
        width = max([len(e.name or "(model)") for e in self] + [4])
        lines = [f"{'name':<{width}}  {'type':<24} action"]
        for e in self:
            action = e.action + (f": {e.reason}" if e.reason else "")
            lines.append(f"{e.name or '(model)':<{width}}  {e.type:<24} {action}")
        counts = {action: sum(e.action == action for e in self) for action in dict.fromkeys(e.action for e in self)}
        lines.append(", ".join(f"{n} {action}" for action, n in counts.items()) or "no candidate modules")
        return "\n".join(lines)


def _native_base(cls):
    """The torch.nn class of SWAPS that cls is or derives from, else None."""
    return next((native for native in SWAPS if issubclass(cls, native)), None)


def _overridden(cls, native):
    """The methods pyconvext replaces (and forward) that a subclass of native
    defines itself: converting it would silently drop them."""
    replaced = {"forward"} | {name for name, value in vars(SWAPS[native][0]).items() if callable(value)}
    defined = set()
    for klass in cls.__mro__[:cls.__mro__.index(native)]:
        defined |= replaced & set(vars(klass))
    return sorted(defined)


@functools.cache
def _converted_class(cls):
    """pyconvext's class for a native class; for a subclass of one, a class
    made here that puts pyconvext's forward in front of it (pickled as the
    native subclass and converted again on loading)."""
    native = _native_base(cls)
    ours = SWAPS[native][0]
    if cls is native:
        return ours
    return type(cls.__name__, (ours, cls), {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "_pyconvext_native": cls,
        "__reduce_ex__": _reduce_converted,
    })


def _reduce_converted(self, protocol):
    constructor, args, *rest = torch.nn.Module.__reduce_ex__(self, protocol)
    return (_rebuild_converted, (constructor, (type(self)._pyconvext_native, *args[1:])), *rest)


def _rebuild_converted(constructor, args):
    module = constructor(*args)
    module.__class__ = _converted_class(type(module))
    return module


def _native_class(cls):
    """The native class a pyconvext class (or a converted subclass) came from."""
    return vars(cls).get("_pyconvext_native") or NATIVE.get(cls)


def _why_not(module, native):
    """Why `module` (a native module of class or subclass `native`) cannot run
    on pyconvext's kernels, or None."""
    # Both replace the module's class themselves (parametrize to add and
    # remove properties, lazy modules on their first call).
    if parametrize.is_parametrized(module):
        return "it has parametrizations (convert before registering them)"
    if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin):
        return "it is a lazy module (convert after its first call)"
    overridden = _overridden(type(module), native)
    if overridden:
        return f"{type(module).__name__} overrides {', '.join(overridden)}"
    _, op, dtypes = SWAPS[native]
    for tensor in module.parameters(recurse=False):
        if dtypes is not None and tensor.dtype not in dtypes:
            return f"dtype {tensor.dtype} is not supported by pyconvext.{op}"
        device = tensor.device.type
        if device not in _SHAPE_ONLY_DEVICES and device.upper() not in _registrations.KERNELS[op]:
            return f"this build of pyconvext has no {device} kernel for {op}"
    return None


def _matches(names, module, patterns):
    """Whether a module is named by one of the patterns: a class it is an
    instance of (torch.nn.Conv2d names native and pyconvext convolutions
    alike), or an fnmatch pattern of one of its qualified names ("features.0",
    "layer1.*"; a shared module has several)."""
    if isinstance(patterns, (str, type)):
        patterns = (patterns,)
    return any(isinstance(module, pattern) if isinstance(pattern, type)
               else any(fnmatch.fnmatchcase(name, pattern) for name in names)
               for pattern in patterns)


def _check(model, verb):
    """Refuses what is not a module, and models wrapped by torch.compile."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyconvext.{verb}: expected a torch.nn.Module, got {type(model).__name__}")
    # An OptimizedModule only exists once torch._dynamo has been imported.
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, dynamo.eval_frame.OptimizedModule):
            where = f" (at {name!r})" if name else ""
            raise TypeError(
                f"pyconvext.{verb}: the model{where} is wrapped by torch.compile; {verb} the model "
                f"before compiling it: torch.compile(pyconvext.{verb}(model))"
            )


def _candidates(model, include, exclude):
    """(first name, module) of each module once, with all its names matched."""
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), (module, []))[1].append(name)
    for module, module_names in names.values():
        if include is not None and not _matches(module_names, module, include):
            continue
        if exclude is not None and _matches(module_names, module, exclude):
            continue
        yield module_names[0], module


def convert(model, *, include=None, exclude=None, inplace=True, return_report=False):
    """Swaps every torch.nn.Conv2d, MaxPool2d, LSTMCell and LSTM in `model`
    (the model itself too), recursively, for pyconvext's module: exact types,
    and subclasses that do not override forward. Modules whose dtype or
    device pyconvext cannot run are left native.

    include / exclude: a class (e.g. torch.nn.LSTM) or an fnmatch pattern of
    qualified module names (e.g. "features.*"), or a list of them; only modules
    included and not excluded are considered (a shared module by any of its
    names). Parametrized and lazy modules are left (they swap classes
    themselves). inplace=False converts a deep copy. Returns the
    model, or (model, Report) with return_report=True: each candidate module,
    what was done to it, and why it was left.

    DataParallel and DistributedDataParallel wrappers are converted through
    (their module is swapped in place; call it before or after wrapping). A
    model wrapped by torch.compile is refused: convert before compiling."""
    _check(model, "convert")
    if not inplace:
        model = copy.deepcopy(model)
    report = Report()
    for name, module in _candidates(model, include, exclude):
        cls = type(module)
        if _native_class(cls) is not None:
            report.append(Entry(name, cls.__name__, "already pyconvext"))
            continue
        native = _native_base(cls)
        if native is None:
            continue
        reason = _why_not(module, native)
        if reason:
            report.append(Entry(name, cls.__name__, "left", reason))
            continue
        module.__class__ = _converted_class(cls)
        report.append(Entry(name, cls.__name__, "converted"))
    return (model, report) if return_report else model


def revert(model, *, include=None, exclude=None, inplace=True, return_report=False):
    """Turns every pyconvext Conv2d, MaxPool2d, LSTMCell and LSTM in `model`
    (converted, or built as pyconvext's) back into the native module: the
    inverse of convert(), with the same arguments."""
    _check(model, "revert")
    if not inplace:
        model = copy.deepcopy(model)
    report = Report()
    for name, module in _candidates(model, include, exclude):
        native = _native_class(type(module))
        if native is not None:
            report.append(Entry(name, type(module).__name__, "reverted"))
            module.__class__ = native
    return (model, report) if return_report else model
