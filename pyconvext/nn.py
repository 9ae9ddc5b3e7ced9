"""Drop-in modules: subclasses of the torch.nn modules that run pyconvext's kernels.

They keep the native constructor, parameters, buffers, state_dict keys and repr,
so a native checkpoint loads into them with strict=True and back.
"""

import torch
from torch.nn.modules.utils import _pair
from torch.nn.utils.rnn import PackedSequence

from . import functional

__all__ = ["Conv2d", "LSTM", "LSTMCell", "MaxPool2d"]


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d on pyconvext.functional.conv2d."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            # As native: pad with the module's mode, then convolve without padding.
            input = torch.nn.functional.pad(
                input, self._reversed_padding_repeated_twice, mode=self.padding_mode
            )
            return functional.conv2d(input, weight, bias, self.stride, _pair(0), self.dilation, self.groups)
        return functional.conv2d(
            input, weight, bias, self.stride, self.padding, self.dilation, self.groups
        )


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d on pyconvext.functional.max_pool2d."""

    def forward(self, input):
        return functional.max_pool2d(input, self.kernel_size, self.stride, self.padding,
                                     self.dilation, ceil_mode=self.ceil_mode,
                                     return_indices=self.return_indices)


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell on pyconvext.functional.lstm_cell."""

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for i, state in enumerate(hx):
                if state.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{i}] to be 1D or 2D, got {state.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h, c = functional.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM on pyconvext.functional.lstm: every option (num_layers, bias,
    batch_first, dropout, bidirectional, proj_size), optional (h0, c0), batchless 2-D
    input and PackedSequence input, with native's argument checks."""

    def forward(self, input, hx=None):
        self._update_flat_weights()
        directions = 2 if self.bidirectional else 1
        output_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        batch_sizes = sorted_indices = unsorted_indices = None
        packed = isinstance(input, PackedSequence)
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(batch_dim)
        if hx is None:
            zeros = dict(dtype=input.dtype, device=input.device)
            hx = (torch.zeros(self.num_layers * directions, max_batch_size, output_size, **zeros),
                  torch.zeros(self.num_layers * directions, max_batch_size, self.hidden_size, **zeros))
            if not packed:
                self.check_forward_args(input, hx, batch_sizes)
        elif packed:
            hx = self.permute_hidden(hx, sorted_indices)
        else:
            if is_batched and (hx[0].dim() != 3 or hx[1].dim() != 3):
                raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            if not is_batched:
                if hx[0].dim() != 2 or hx[1].dim() != 2:
                    raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but got "
                                       f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(input, hx, batch_sizes)
        output, h_n, c_n = functional.lstm(
            input, hx, self._flat_weights, self.bias, self.num_layers, self.dropout, self.training,
            self.bidirectional, self.batch_first, batch_sizes,
        )
        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden((h_n, c_n), unsorted_indices)
        if not is_batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)
