"""Functional interface: the signatures of torch.nn.functional, on pyconvext's kernels."""

import torch
from torch.nn.modules.utils import _pair

__all__ = ["conv2d", "lstm", "lstm_cell", "max_pool2d"]


_ops = torch.ops.pyconvext
_conv2d = _ops.conv2d.default
_max_pool2d = _ops.max_pool2d.default
_max_pool2d_values = _ops.max_pool2d_values.default


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d on pyconvext's kernels.

    input (N, C, H, W) or (C, H, W); weight (K, C / groups, kH, kW); bias (K,) or None.
    stride, dilation: int or pair. padding: int, pair, 'valid' or 'same' (unit stride only;
    an odd total padding puts the extra row / column at the bottom / right, as native does).
    """
    # An int passes as it is: the operator's int[2] arguments take one for both.
    if padding.__class__ is str:
        input, padding = _string_padding(input, weight, stride, padding, dilation)
    return _conv2d(input, weight, bias, stride, padding, dilation, groups)


def _string_padding(input, weight, stride, padding, dilation):
    """The input and the numeric padding for padding='valid' or 'same'."""
    if padding == "valid":
        return input, 0
    if padding != "same":
        raise RuntimeError(f"pyconvext.conv2d: invalid padding string {padding!r}, expected 'valid' or 'same'")
    if any(s != 1 for s in _pair(stride)):
        raise RuntimeError("pyconvext.conv2d: padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(_pair(dilation), weight.shape[-2:])]
    padding = tuple(t // 2 for t in total)
    extra = [t - 2 * p for t, p in zip(total, padding)]
    if any(extra):
        input = torch.nn.functional.pad(input, (0, extra[1], 0, extra[0]))
    return input, padding


def _pool_pair(value):
    """An int or a sequence of 1 or 2 ints, as native's max_pool2d takes them;
    other lengths go on to the operator, which names the problem."""
    if value.__class__ is int:
        return value
    value = tuple(value)
    return value * 2 if len(value) == 1 else value


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """torch.nn.functional.max_pool2d on pyconvext's kernels.

    input (N, C, H, W) or (C, H, W). kernel_size, stride (default: kernel_size), padding (at
    most half the kernel), dilation: int or pair. Returns the output, and with
    return_indices=True also int64 indices: flat positions of the maxima in each H*W plane.
    Without indices and gradients, runs the values-only forward, which writes no indices.
    """
    kernel_size = _pool_pair(kernel_size)
    stride = kernel_size if stride is None or stride == [] or stride == () else _pool_pair(stride)
    padding, dilation = _pool_pair(padding), _pool_pair(dilation)
    if return_indices:
        return _max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    if input.requires_grad and torch.is_grad_enabled():
        return _max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)[0]
    return _max_pool2d_values(input, kernel_size, stride, padding, dilation, ceil_mode)


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One LSTM step on pyconvext's kernels, as torch.nn.LSTMCell computes it.

    input (batch, input_size) or (input_size,); hx = (h, c), each (batch, hidden_size) or
    (hidden_size,); w_ih (4 * hidden_size, input_size), w_hh (4 * hidden_size, hidden_size),
    biases (4 * hidden_size,) or None; gates in the order i, f, g, o. Returns (h, c).
    """
    h, c = hx
    batched = input.dim() != 1
    if not batched:
        input, h, c = input.unsqueeze(0), h.unsqueeze(0), c.unsqueeze(0)
    h, c, _ = torch.ops.pyconvext.lstm_cell(input, h, c, w_ih, w_hh, b_ih, b_hh)
    return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first=False,
         batch_sizes=None):
    """A multi-layer LSTM on pyconvext's kernels, as torch.lstm (torch.nn.LSTM's engine).

    input (steps, batch, input_size), (batch, steps, input_size) with batch_first, or the data of
    a PackedSequence with its batch_sizes; hx = (h0, c0) of (num_layers * directions, batch,
    proj_size or hidden_size) and (num_layers * directions, batch, hidden_size); params the
    module's flat weights (per layer and direction: w_ih, w_hh, then b_ih, b_hh with has_biases,
    then w_hr with a projection). Dropout applies between layers in training. Returns
    (output, h_n, c_n).
    """
    directions = 2 if bidirectional else 1
    per_layer = len(params) // (num_layers * directions)
    has_projection = per_layer == (4 if has_biases else 2) + 1
    if batch_sizes is None and batch_first:
        input = input.transpose(0, 1)
    h0, c0 = hx
    # Without gradients to compute, the layers save no activations for a backward.
    values_only = not (torch.is_grad_enabled() and any(t.requires_grad for t in (input, h0, c0, *params)))
    x, h_n, c_n = input, [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = params[k * per_layer:(k + 1) * per_layer]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if has_projection else None
            op = torch.ops.pyconvext.lstm_layer_values if values_only else torch.ops.pyconvext.lstm_layer
            output, h, c = op(x, h0[k], c0[k], w[0], w[1], b_ih, b_hh, w_hr, batch_sizes, direction == 1)[:3]
            outputs.append(output)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if dropout and train and layer < num_layers - 1:
            x = torch.nn.functional.dropout(x, dropout, training=True)
    if batch_sizes is None and batch_first:
        x = x.transpose(0, 1)
    return x, torch.stack(h_n), torch.stack(c_n)
