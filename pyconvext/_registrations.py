"""Fake (shape) kernels for every pyconvext operator, and autocast for the LSTM.

The compiled library defines the operators with their CPU, CUDA and autograd
kernels (csrc/autograd/); this module teaches the rest of PyTorch their output
metadata (register_fake) for torch.compile, torch.export and fake tensors.
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


# --- LSTM: float32 under autocast ---------------------------------------------------

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
