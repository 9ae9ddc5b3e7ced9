"""ONNX translations of pyconvext's operators to standard ONNX nodes.

A model converted to pyconvext's modules exports with torch.onnx.export as the
native model does, with either exporter, and its graph holds only standard
ONNX operators (the default domain, opset 17 and newer), so any ONNX runtime
runs it:

- pyconvext::conv2d                        -> Conv
- pyconvext::max_pool2d / max_pool2d_values -> MaxPool (its Indices output, made
  per plane as torch's, only where the model uses the indices)
- pyconvext::lstm_layer / lstm_layer_values -> LSTM (one node per layer and
  direction; gates reordered from torch's i, f, g, o to ONNX's i, o, f, c, the
  two biases concatenated). ONNX's LSTM has no projection: a layer with
  proj_size is unrolled over its steps into MatMul / Add / Sigmoid / Tanh
  nodes, so its sequence length is the one exported
- pyconvext::lstm_cell                     -> Gemm / Add / Sigmoid / Tanh / Mul

Registration happens when pyconvext is imported, and costs nothing until an
exporter loads:

- the TorchScript exporter (dynamo=False): symbolic functions, registered with
  torch.onnx.register_custom_op_symbolic when torch.onnx is imported;
- the torch.export-based exporter (dynamo=True, the default): torch 2.14 has
  no public global registry for it, only the per-call
  custom_translation_table. Every call builds its registry with
  ONNXRegistry.from_torchlib (torch/onnx/_internal/exporter/_registration.py);
  when that module is imported (it imports onnxscript, ~5 s, which is why this
  is not done at pyconvext's import), pyconvext wraps from_torchlib so that
  each registry it builds also holds TABLE, exactly as a
  custom_translation_table would (a table the user passes still wins). Should
  a later torch rename that module, export with
  torch.onnx.export(..., custom_translation_table=pyconvext.onnx.TABLE).

Both exporters run the same translation code (below, written once against a
small builder of ONNX nodes, _TorchScriptBuilder or _ScriptBuilder).

Not translated: packed sequences (PackedSequence input to nn.LSTM; pad the
batch instead) and the backward operators (ONNX graphs here are for inference).
"""

from __future__ import annotations

import functools
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence

import torch

__all__ = ["MIN_OPSET", "TABLE", "register"]

MIN_OPSET = 17
_TORCHSCRIPT_REGISTRY_MODULE = "torch.onnx"
_DYNAMO_REGISTRY_MODULE = "torch.onnx._internal.exporter._registration"


class ExportError(RuntimeError):
    """A pyconvext operator whose call has no ONNX translation."""


# --- builders: the same translation code for both exporters ------------------------------

class _TorchScriptBuilder:
    """Nodes for the TorchScript exporter (a GraphContext's g.op)."""

    def __init__(self, g):
        self.g = g
        if g.opset < MIN_OPSET:
            raise ExportError(f"pyconvext.onnx: opset {g.opset} asked for; pyconvext's operators "
                              f"export to opset {MIN_OPSET} and newer")

    def op(self, name, *inputs, outputs=1, **attributes):
        inputs = _strip_trailing_none(inputs)
        from torch.onnx import symbolic_helper

        inputs = [symbolic_helper._optional_input_placeholder_tensor(self.g) if x is None else x
                  for x in inputs]
        suffixed = {f"{key}_{_attribute_kind(value)}": value for key, value in attributes.items()}
        return self.g.op(name, *inputs, outputs=outputs, **suffixed)

    def ints(self, values):
        """An int64 constant: 1-D from a list, 0-D from an int."""
        return self.g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    def float_scalar(self, value):
        return self.g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))

    def shape(self, value):
        """Sizes, None where not static."""
        from torch.onnx import symbolic_helper

        sizes = symbolic_helper._get_tensor_sizes(value)
        if sizes is None:
            raise ExportError("pyconvext.onnx: a tensor of unknown rank reached an operator")
        return list(sizes)


class _ScriptBuilder:
    """Nodes for the torch.export-based exporter (onnxscript ops, recorded by
    the exporter's tracer into the graph under construction)."""

    def __init__(self):
        from onnxscript import opset18

        self.opset = opset18

    def op(self, name, *inputs, outputs=1, **attributes):
        result = getattr(self.opset, name)(*_strip_trailing_none(inputs), **attributes)
        # The exporter's tracer gives every output the schema declares.
        results = tuple(result) if isinstance(result, Sequence) else (result,)
        return results[0] if outputs == 1 else results[:outputs]

    def ints(self, values):
        """An int64 constant: 1-D from a list, 0-D from an int."""
        if isinstance(values, int):
            return self.opset.Constant(value_int=values)
        return self.opset.Constant(value_ints=list(values))

    def float_scalar(self, value):
        return self.opset.Constant(value_float=float(value))

    def shape(self, value):
        if value.shape is None:
            raise ExportError("pyconvext.onnx: a tensor of unknown rank reached an operator")
        return [d if isinstance(d, int) else None for d in value.shape]


def _strip_trailing_none(inputs):
    inputs = list(inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


def _attribute_kind(value):
    """The TorchScript exporter's attribute suffix for a Python value."""
    if isinstance(value, str):
        return "s"
    if isinstance(value, torch.Tensor):
        return "t"
    items = value if isinstance(value, (list, tuple)) else [value]
    return "f" if any(isinstance(v, float) for v in items) else "i"


# --- translations --------------------------------------------------------------------------

def _pads(padding):
    """torch's symmetric (top, left) padding as ONNX's [begin..., end...]."""
    return [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])]


def _batched(b, x):
    """(x as N, C, H, W; whether it was one unbatched C, H, W image)."""
    if len(b.shape(x)) == 3:
        return b.op("Unsqueeze", x, b.ints([0])), True
    return x, False


def _unbatch(b, x, unbatched):
    return b.op("Squeeze", x, b.ints([0])) if unbatched else x


def _conv2d(b, input, weight, bias, stride, padding, dilation, groups):
    x, unbatched = _batched(b, input)
    kernel = b.shape(weight)[2:]
    y = b.op("Conv", x, weight, bias, kernel_shape=kernel, strides=list(stride), pads=_pads(padding),
             dilations=list(dilation), group=int(groups))
    return _unbatch(b, y, unbatched)


def _max_pool2d(b, input, kernel_size, stride, padding, dilation, ceil_mode, with_indices):
    x, unbatched = _batched(b, input)
    attributes = dict(kernel_shape=list(kernel_size), strides=list(stride), pads=_pads(padding),
                      dilations=list(dilation), ceil_mode=int(bool(ceil_mode)))
    if not with_indices:
        return _unbatch(b, b.op("MaxPool", x, **attributes), unbatched)
    values, flat = b.op("MaxPool", x, outputs=2, **attributes)
    # ONNX's indices count over the whole N, C, H, W tensor (row-major); torch's
    # within each H, W plane: ((n * C + c) * H + h) * W + w  mod  H * W.
    height, width = b.shape(input)[-2:]
    if height is not None and width is not None:
        plane = b.ints([height * width])
    else:
        plane = b.op("Mul", b.op("Shape", x, start=2, end=3), b.op("Shape", x, start=3, end=4))
    indices = b.op("Mod", flat, plane)
    return _unbatch(b, values, unbatched), _unbatch(b, indices, unbatched)


def _zeros(b, shape, like):
    """Zeros of a shape (an int64 1-D value) and like's dtype."""
    return b.op("Expand", b.op("CastLike", b.float_scalar(0.0), like), shape)


def _gate_slices(b, gates, hidden):
    """torch's gates i, f, g, o (columns of gates) activated."""
    def part(k):
        return b.op("Slice", gates, b.ints([k * hidden]), b.ints([(k + 1) * hidden]), b.ints([-1]))

    return (b.op("Sigmoid", part(0)), b.op("Sigmoid", part(1)), b.op("Tanh", part(2)),
            b.op("Sigmoid", part(3)))


def _lstm_step(b, gates, c, hidden):
    """One step from the gate pre-activations: (h, c, tanh(c), (i, f, g, o))."""
    i, f, g, o = _gate_slices(b, gates, hidden)
    c = b.op("Add", b.op("Mul", f, c), b.op("Mul", i, g))
    tanh_c = b.op("Tanh", c)
    return b.op("Mul", o, tanh_c), c, tanh_c, (i, f, g, o)


def _lstm_cell(b, input, hx, cx, w_ih, w_hh, b_ih, b_hh, with_workspace):
    hidden = b.shape(w_hh)[0] // 4
    gates = b.op("Add", b.op("Gemm", input, w_ih, b_ih, transB=1), b.op("Gemm", hx, w_hh, b_hh, transB=1))
    h, c, tanh_c, (i, f, g, o) = _lstm_step(b, gates, cx, hidden)
    # The workspace the backward reads: rows of i, f, g, o, tanh(c).
    workspace = b.op("Concat", i, f, g, o, tanh_c, axis=1) if with_workspace else None
    return h, c, workspace


def _onnx_gate_order(hidden):
    """Rows of torch's i, f, g, o in ONNX's order i, o, f, c."""
    rows = lambda k: list(range(k * hidden, (k + 1) * hidden))  # noqa: E731
    return rows(0) + rows(3) + rows(1) + rows(2)


def _lstm_layer(b, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, with_workspace):
    if batch_sizes is not None:
        raise ExportError("pyconvext.onnx: an LSTM on a PackedSequence has no ONNX translation; "
                          "export the model with padded (dense) input")
    hidden = b.shape(w_hh)[0] // 4
    if w_hr is None:
        outputs = _lstm_node(b, input, hx, cx, w_ih, w_hh, b_ih, b_hh, reverse, hidden)
    else:
        outputs = _lstm_unrolled(b, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, hidden)
    if not with_workspace:
        return outputs
    # The workspace holds activations for pyconvext's backward, which has no
    # ONNX form; an inference graph never reads it. Zeros of its shape stand in
    # (rows = steps * batch; 6 or 7 columns per hidden unit), dropped as unused.
    columns = (7 if w_hr is not None else 6) * hidden
    rows = b.op("Mul", b.op("Shape", input, start=0, end=1), b.op("Shape", input, start=1, end=2))
    return (*outputs, _zeros(b, b.op("Concat", rows, b.ints([columns]), axis=0), input))


def _lstm_node(b, input, hx, cx, w_ih, w_hh, b_ih, b_hh, reverse, hidden):
    order = b.ints(_onnx_gate_order(hidden))

    def reordered(tensor):
        return b.op("Gather", tensor, order, axis=0)

    def direction_axis(tensor):
        return b.op("Unsqueeze", tensor, b.ints([0]))

    bias = None
    if b_ih is not None or b_hh is not None:
        present = b_ih if b_ih is not None else b_hh
        halves = [reordered(t) if t is not None else _zeros(b, b.ints([4 * hidden]), present)
                  for t in (b_ih, b_hh)]
        bias = direction_axis(b.op("Concat", *halves, axis=0))
    y, y_h, y_c = b.op(
        "LSTM", input, direction_axis(reordered(w_ih)), direction_axis(reordered(w_hh)), bias, None,
        direction_axis(hx), direction_axis(cx), outputs=3, hidden_size=hidden,
        direction="reverse" if reverse else "forward",
    )
    # Y is (steps, directions = 1, batch, hidden); Y_h, Y_c (1, batch, hidden).
    zero = b.ints([0])
    return b.op("Squeeze", y, b.ints([1])), b.op("Squeeze", y_h, zero), b.op("Squeeze", y_c, zero)


def _lstm_unrolled(b, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, hidden):
    steps = b.shape(input)[0]
    if not steps:
        raise ExportError("pyconvext.onnx: an LSTM with proj_size exports unrolled over its steps "
                          "(ONNX's LSTM has no projection), so its sequence length must be static "
                          f"and positive (got {steps})")
    # The input's share of every step's gates in one MatMul, with both biases.
    gates_x = b.op("MatMul", input, b.op("Transpose", w_ih, perm=[1, 0]))
    for bias in (b_ih, b_hh):
        if bias is not None:
            gates_x = b.op("Add", gates_x, bias)
    w_hh_t = b.op("Transpose", w_hh, perm=[1, 0])
    w_hr_t = b.op("Transpose", w_hr, perm=[1, 0])
    h, c = hx, cx
    outputs = [None] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        step_x = b.op("Gather", gates_x, b.ints(t), axis=0)
        gates = b.op("Add", step_x, b.op("MatMul", h, w_hh_t))
        h_full, c, _, _ = _lstm_step(b, gates, c, hidden)
        h = b.op("MatMul", h_full, w_hr_t)
        outputs[t] = b.op("Unsqueeze", h, b.ints([0]))
    output = b.op("Concat", *outputs, axis=0) if steps > 1 else outputs[0]
    return output, h, c


# --- the torch.export-based exporter (dynamo=True): the translation table ------------------

def _onnx_conv2d(input, weight, bias=None, stride: Sequence[int] = (1, 1),
                 padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1):
    return _conv2d(_ScriptBuilder(), input, weight, bias, stride, padding, dilation, groups)


def _onnx_max_pool2d(input, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], ceil_mode: bool):
    return _max_pool2d(_ScriptBuilder(), input, kernel_size, stride, padding, dilation, ceil_mode, True)


def _onnx_max_pool2d_values(input, kernel_size: Sequence[int], stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int], ceil_mode: bool):
    return _max_pool2d(_ScriptBuilder(), input, kernel_size, stride, padding, dilation, ceil_mode, False)


def _onnx_lstm_cell(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    return _lstm_cell(_ScriptBuilder(), input, hx, cx, w_ih, w_hh, b_ih, b_hh, True)


def _onnx_lstm_layer(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, batch_sizes=None,
                     reverse: bool = False):
    return _lstm_layer(_ScriptBuilder(), input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                       reverse, True)


def _onnx_lstm_layer_values(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None,
                            batch_sizes=None, reverse: bool = False):
    return _lstm_layer(_ScriptBuilder(), input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
                       reverse, False)


_ops = torch.ops.pyconvext
#: {operator overload: translation} for torch.onnx.export(..., custom_translation_table=TABLE)
TABLE = {
    _ops.conv2d.default: _onnx_conv2d,
    _ops.max_pool2d.default: _onnx_max_pool2d,
    _ops.max_pool2d_values.default: _onnx_max_pool2d_values,
    _ops.lstm_cell.default: _onnx_lstm_cell,
    _ops.lstm_layer.default: _onnx_lstm_layer,
    _ops.lstm_layer_values.default: _onnx_lstm_layer_values,
}


# --- the TorchScript exporter (dynamo=False): symbolic functions ---------------------------

def _used(g, output):
    """Whether output `output` of the node being converted is read."""
    return bool(list(g.original_node.outputs())[output].uses())


def _refuse_used(g, output, what):
    if _used(g, output):
        raise ExportError(f"pyconvext.onnx: {what} is read in the graph; it exists for pyconvext's "
                          "backward, which has no ONNX translation")


def _symbolic_conv2d(g, input, weight, bias, stride, padding, dilation, groups):
    from torch.onnx import symbolic_helper as sh

    bias = None if sh._is_none(bias) else bias
    return _conv2d(_TorchScriptBuilder(g), input, weight, bias, sh._get_const(stride, "is", "stride"),
                   sh._get_const(padding, "is", "padding"), sh._get_const(dilation, "is", "dilation"),
                   sh._get_const(groups, "i", "groups"))


def _pool_arguments(kernel_size, stride, padding, dilation, ceil_mode):
    from torch.onnx import symbolic_helper as sh

    return (sh._get_const(kernel_size, "is", "kernel_size"), sh._get_const(stride, "is", "stride"),
            sh._get_const(padding, "is", "padding"), sh._get_const(dilation, "is", "dilation"),
            sh._get_const(ceil_mode, "b", "ceil_mode"))


def _symbolic_max_pool2d(g, input, kernel_size, stride, padding, dilation, ceil_mode):
    arguments = _pool_arguments(kernel_size, stride, padding, dilation, ceil_mode)
    if not _used(g, 1):  # the values only: no Indices output
        return _max_pool2d(_TorchScriptBuilder(g), input, *arguments, False), None
    return _max_pool2d(_TorchScriptBuilder(g), input, *arguments, True)


def _symbolic_max_pool2d_values(g, input, kernel_size, stride, padding, dilation, ceil_mode):
    arguments = _pool_arguments(kernel_size, stride, padding, dilation, ceil_mode)
    return _max_pool2d(_TorchScriptBuilder(g), input, *arguments, False)


def _optional(value):
    from torch.onnx import symbolic_helper as sh

    return None if sh._is_none(value) else value


def _symbolic_lstm_cell(g, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return _lstm_cell(_TorchScriptBuilder(g), input, hx, cx, w_ih, w_hh, _optional(b_ih), _optional(b_hh),
                      _used(g, 2))


def _symbolic_lstm_layer_values(g, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    from torch.onnx import symbolic_helper as sh

    return _lstm_layer(_TorchScriptBuilder(g), input, hx, cx, w_ih, w_hh, _optional(b_ih), _optional(b_hh),
                       _optional(w_hr), _optional(batch_sizes), sh._get_const(reverse, "b", "reverse"), False)


def _symbolic_lstm_layer(g, *args):
    _refuse_used(g, 3, "the workspace output of pyconvext::lstm_layer")
    return (*_symbolic_lstm_layer_values(g, *args), None)


SYMBOLICS = {
    "pyconvext::conv2d": _symbolic_conv2d,
    "pyconvext::max_pool2d": _symbolic_max_pool2d,
    "pyconvext::max_pool2d_values": _symbolic_max_pool2d_values,
    "pyconvext::lstm_cell": _symbolic_lstm_cell,
    "pyconvext::lstm_layer": _symbolic_lstm_layer,
    "pyconvext::lstm_layer_values": _symbolic_lstm_layer_values,
}
# Registered from the oldest opset the TorchScript exporter knows, so that an
# export below MIN_OPSET gets our message rather than "unrecognized operator".
_SYMBOLIC_OPSET = 7


def _register_symbolics(torch_onnx):
    for name, function in SYMBOLICS.items():
        torch_onnx.register_custom_op_symbolic(name, function, _SYMBOLIC_OPSET)


def _register_table(registration):
    """Makes every registry the exporter builds hold TABLE (see the module's doc)."""
    cls = registration.ONNXRegistry
    original = cls.__dict__["from_torchlib"].__func__
    if getattr(original, "_pyconvext_table", False):
        return

    @functools.wraps(original)
    def from_torchlib(klass, *args, **kwargs):
        registry = original(klass, *args, **kwargs)
        for target, function in TABLE.items():
            registry.register_op(target, function)
        return registry

    from_torchlib._pyconvext_table = True
    cls.from_torchlib = classmethod(from_torchlib)


# --- registration at import -------------------------------------------------------------------

class _AfterImport:
    """A meta path finder that runs callbacks right after a module's first
    import (when the module is already imported, they run at once)."""

    callbacks: dict = {}

    @classmethod
    def add(cls, name, callback):
        module = sys.modules.get(name)
        if module is not None:
            _run(callback, module)
            return
        cls.callbacks.setdefault(name, []).append(callback)
        if not any(isinstance(finder, cls) for finder in sys.meta_path):
            sys.meta_path.insert(0, cls())

    def find_spec(self, fullname, path, target=None):
        callbacks = self.callbacks.pop(fullname, None)
        if callbacks is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            for callback in callbacks:
                _run(callback, module)

        spec.loader.exec_module = exec_then_register  # this spec's own loader only
        return spec


def _run(callback, module):
    try:
        callback(module)
    except Exception as error:  # an exporter must keep loading whatever happens here
        warnings.warn(f"pyconvext.onnx: could not register pyconvext's ONNX translations with "
                      f"{module.__name__} ({error!r}); pass "
                      "custom_translation_table=pyconvext.onnx.TABLE to torch.onnx.export", stacklevel=2)


@functools.cache
def register():
    """Registers the translations with both exporters, each as it loads
    (idempotent; pyconvext's import calls it)."""
    _AfterImport.add(_TORCHSCRIPT_REGISTRY_MODULE, _register_symbolics)
    _AfterImport.add(_DYNAMO_REGISTRY_MODULE, _register_table)
