"""Fake (shape) kernels and autograd for every pyconvext operator.

The compiled library defines the operators and their CPU / CUDA kernels; this
module teaches the rest of PyTorch about them: register_fake gives the output
metadata for torch.compile, torch.export and fake tensors; register_autograd
wires each operator to its backward operator. (max_pool2d_values has no
gradient: its autograd kernel, in csrc/ops.cpp, refuses inputs that need one.)
"""

import torch

from . import _BUILD_INFO

OPS = ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_values", "max_pool2d_backward",
       "lstm_cell", "lstm_cell_backward", "lstm_layer", "lstm_layer_values", "lstm_layer_backward")

# Dispatch keys with a compiled kernel, per operator (read before any Python
# kernel below is registered).
KERNELS = {
    op: tuple(
        key for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"pyconvext::{op}", key)
    )
    for op in OPS
}


def _output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_memory_format(input4d, weight):
    """Native's rule: channels_last if the input or the weight suggests it,
    except for float64 on CUDA, which native (cuDNN) keeps in NCHW."""
    if input4d.device.type == "cuda" and input4d.dtype == torch.float64:
        return torch.contiguous_format
    suggest = torch._prims_common.suggest_memory_format
    if torch.channels_last in (suggest(input4d), suggest(weight)):
        return torch.channels_last
    return torch.contiguous_format


# --- conv2d -----------------------------------------------------------------

@torch.library.register_fake("pyconvext::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups):
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    out_h = _output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    out_w = _output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    out = torch.empty(
        (x.shape[0], weight.shape[0], out_h, out_w), dtype=x.dtype, device=x.device,
        memory_format=_conv_memory_format(x, weight),
    )
    return out if batched else out.squeeze(0)


def _conv2d_setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.params = (stride, padding, dilation, groups)


def _conv2d_backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    grad_input, grad_weight, grad_bias = torch.ops.pyconvext.conv2d_backward(
        grad_output, input, weight, *ctx.params, mask
    )
    return grad_input, grad_weight, grad_bias, None, None, None, None


torch.library.register_autograd(
    "pyconvext::conv2d", _conv2d_backward, setup_context=_conv2d_setup_context
)


# --- conv2d_backward ----------------------------------------------------------

@torch.library.register_fake("pyconvext::conv2d_backward")
def _conv2d_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    memory_format = _conv_memory_format(x, weight)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        grad_input = torch.empty_like(x, memory_format=memory_format)
        grad_input = grad_input if batched else grad_input.squeeze(0)
    if output_mask[1]:
        grad_weight = torch.empty_like(weight, memory_format=memory_format)
    if output_mask[2]:
        grad_bias = weight.new_empty((weight.shape[0],))
    return grad_input, grad_weight, grad_bias


def _conv2d_backward_setup_context(ctx, inputs, output):
    grad_output, input, weight, stride, padding, dilation, groups, output_mask = inputs
    ctx.save_for_backward(grad_output, input, weight)
    ctx.params = (stride, padding, dilation, groups)


def _conv2d_double_backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias):
    """conv2d_backward is bilinear: grad_input in (grad_output, weight),
    grad_weight in (grad_output, input), so its derivatives are convolutions
    again, computed with our own operators."""
    grad_output, input, weight = ctx.saved_tensors
    ops = torch.ops.pyconvext
    need_grad_output, need_input, need_weight = ctx.needs_input_grad[:3]
    g_grad_output = g_input = g_weight = None
    if need_grad_output:
        terms = []
        if grad_grad_input is not None:
            terms.append(ops.conv2d(grad_grad_input, weight, grad_grad_bias, *ctx.params))
        elif grad_grad_bias is not None:
            terms.append(grad_grad_bias.view(-1, 1, 1).expand_as(grad_output))
        if grad_grad_weight is not None:
            terms.append(ops.conv2d(input, grad_grad_weight, None, *ctx.params))
        g_grad_output = sum(terms) if terms else None
    if need_input and grad_grad_weight is not None:
        g_input = ops.conv2d_backward(
            grad_output, input, grad_grad_weight, *ctx.params, [True, False, False]
        )[0]
    if need_weight and grad_grad_input is not None:
        g_weight = ops.conv2d_backward(
            grad_output, grad_grad_input, weight, *ctx.params, [False, True, False]
        )[1]
    return g_grad_output, g_input, g_weight, None, None, None, None, None


torch.library.register_autograd(
    "pyconvext::conv2d_backward",
    _conv2d_double_backward,
    setup_context=_conv2d_backward_setup_context,
)


# --- max_pool2d ----------------------------------------------------------------

def _pool_output_size(size, kernel, stride, padding, dilation, ceil_mode):
    """Native's rule; with ceil_mode the last window must start inside the
    input or its left padding."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_output_fake(input, kernel_size, stride, padding, dilation, ceil_mode, dtype=None):
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    out_h, out_w = (
        _pool_output_size(x.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d], ceil_mode)
        for d in range(2)
    )
    memory_format = torch._prims_common.suggest_memory_format(x) if batched else torch.contiguous_format
    out = torch.empty((x.shape[0], x.shape[1], out_h, out_w), dtype=dtype or x.dtype,
                      device=x.device, memory_format=memory_format)
    return out if batched else out.squeeze(0)


@torch.library.register_fake("pyconvext::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    params = (kernel_size, stride, padding, dilation, ceil_mode)
    return _pool_output_fake(input, *params), _pool_output_fake(input, *params, dtype=torch.int64)


@torch.library.register_fake("pyconvext::max_pool2d_values")
def _max_pool2d_values_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    return _pool_output_fake(input, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.register_fake("pyconvext::max_pool2d_backward")
def _max_pool2d_backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation,
                              ceil_mode):
    if input.dim() == 4:
        return torch.empty_like(
            input, memory_format=torch._prims_common.suggest_memory_format(input)
        )
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _max_pool2d_setup_context(ctx, inputs, output):
    input, *params = inputs
    ctx.save_for_backward(input, output[1])
    ctx.params = params


def _max_pool2d_grad(ctx, grad_output, grad_indices):
    input, indices = ctx.saved_tensors
    return (torch.ops.pyconvext.max_pool2d_backward(grad_output, input, indices, *ctx.params),
            None, None, None, None, None)


torch.library.register_autograd(
    "pyconvext::max_pool2d", _max_pool2d_grad, setup_context=_max_pool2d_setup_context
)


def _max_pool2d_backward_setup_context(ctx, inputs, output):
    grad_output, input, indices, *params = inputs
    ctx.save_for_backward(indices)
    ctx.shape = grad_output.shape


def _max_pool2d_double_backward(ctx, grad_grad_input):
    """max_pool2d_backward is linear in grad_output: it scatters each element
    to its index, so its derivative gathers from the same indices."""
    (indices,) = ctx.saved_tensors
    g_grad_output = torch.gather(
        grad_grad_input.flatten(-2), -1, indices.flatten(-2)
    ).view(ctx.shape)
    return g_grad_output, None, None, None, None, None, None, None


torch.library.register_autograd(
    "pyconvext::max_pool2d_backward", _max_pool2d_double_backward,
    setup_context=_max_pool2d_backward_setup_context,
)


# --- lstm_cell ----------------------------------------------------------------------

@torch.library.register_fake("pyconvext::lstm_cell")
def _lstm_cell_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    batch, hidden = hx.shape
    return hx.new_empty((batch, hidden)), hx.new_empty((batch, hidden)), hx.new_empty((batch, 5 * hidden))


@torch.library.register_fake("pyconvext::lstm_cell_backward")
def _lstm_cell_backward_fake(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, workspace, has_bias):
    grad_bias = w_ih.new_empty((w_ih.shape[0],)) if has_bias else None
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(cx), torch.empty_like(w_ih),
            torch.empty_like(w_hh), grad_bias)


def _lstm_cell_setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh = inputs
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, output[2])
    ctx.biases = (b_ih is not None, b_hh is not None)
    ctx.mark_non_differentiable(output[2])
    # No zeros for the workspace's gradient on every call (nor for an unused state).
    ctx.set_materialize_grads(False)


def _lstm_cell_grad(ctx, grad_hy, grad_cy, grad_workspace):
    input, hx, cx, w_ih, w_hh, workspace = ctx.saved_tensors
    grad_hy = torch.zeros_like(hx) if grad_hy is None else grad_hy
    grad_cy = torch.zeros_like(cx) if grad_cy is None else grad_cy
    grads = torch.ops.pyconvext.lstm_cell_backward(
        grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, workspace, any(ctx.biases)
    )
    # Both biases add to the same gate pre-activations: one gradient for both.
    grad_b_ih, grad_b_hh = (grads[5] if given else None for given in ctx.biases)
    return (*grads[:5], grad_b_ih, grad_b_hh)


torch.library.register_autograd(
    "pyconvext::lstm_cell", _lstm_cell_grad, setup_context=_lstm_cell_setup_context
)


# --- lstm_layer ---------------------------------------------------------------------

@torch.library.register_fake("pyconvext::lstm_layer")
def _lstm_layer_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    hidden, output_size = cx.shape[1], hx.shape[1]
    rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
    output = input.new_empty((*input.shape[:-1], output_size))
    columns = (7 if w_hr is not None else 6) * hidden
    return output, hx.new_empty(hx.shape), cx.new_empty(cx.shape), input.new_empty((rows, columns))


@torch.library.register_fake("pyconvext::lstm_layer_values")
def _lstm_layer_values_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
    return _lstm_layer_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)[:3]


@torch.library.register_fake("pyconvext::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, w_hr,
                              batch_sizes, reverse, output, workspace, has_bias):
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(cx), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_ih.new_empty((w_ih.shape[0],)) if has_bias else None,
            torch.empty_like(w_hr) if w_hr is not None else None)


def _lstm_layer_setup_context(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse = inputs
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, w_hr, batch_sizes, output[0], output[3])
    ctx.biases = (b_ih is not None, b_hh is not None)
    ctx.reverse = reverse
    ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)


def _lstm_layer_grad(ctx, grad_output, grad_hy, grad_cy, grad_workspace):
    input, hx, cx, w_ih, w_hh, w_hr, batch_sizes, output, workspace = ctx.saved_tensors
    grad_output = torch.zeros_like(output) if grad_output is None else grad_output
    grad_hy = torch.zeros_like(hx) if grad_hy is None else grad_hy
    grad_cy = torch.zeros_like(cx) if grad_cy is None else grad_cy
    grads = torch.ops.pyconvext.lstm_layer_backward(
        grad_output, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, w_hr, batch_sizes, ctx.reverse,
        output, workspace, any(ctx.biases),
    )
    grad_b_ih, grad_b_hh = (grads[5] if given else None for given in ctx.biases)
    return (*grads[:5], grad_b_ih, grad_b_hh, grads[6], None, None)


torch.library.register_autograd(
    "pyconvext::lstm_layer", _lstm_layer_grad, setup_context=_lstm_layer_setup_context
)


# --- LSTM: no double backward; float32 under autocast ------------------------------

def _no_double_backward(op):
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"pyconvext.{op}: double backward (a gradient of the LSTM's gradients, e.g. "
            "create_graph=True) is not supported"
        )

    torch.library.register_autograd(f"pyconvext::{op}_backward", backward, setup_context=setup_context)


for _op in ("lstm_cell", "lstm_layer"):
    _no_double_backward(_op)
# The kernels take float32 and float64: under autocast (bfloat16 / float16
# elsewhere) they run in float32, as native's fused LSTM cells do on the CPU.
for _op in ("lstm_cell", "lstm_layer", "lstm_layer_values"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(f"pyconvext::{_op}", _device, torch.float32)


# --- operators without a compiled CUDA kernel -------------------------------------

def _no_cuda_kernel(op):
    if "cuda" in _BUILD_INFO["backends"]:
        reason = f"this version of pyconvext has no CUDA kernel for {op} yet"
    else:
        reason = f"pyconvext was built without CUDA ({_BUILD_INFO['no_cuda_reason']})"

    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"pyconvext.{op}: got CUDA tensors, but {reason}. Rebuild pyconvext with a CUDA "
            "toolkit (CUDA_HOME=/path/to/cuda pip install --no-build-isolation --no-deps "
            "--force-reinstall <pyconvext source folder>), or move the tensors to the CPU."
        )

    return kernel


for _op in OPS:
    if "CUDA" not in KERNELS[_op]:
        torch.library.impl(f"pyconvext::{_op}", "CUDA")(_no_cuda_kernel(_op))
