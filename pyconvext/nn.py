"""Drop-in modules: subclasses of the torch.nn modules that run pyconvext's kernels.

They keep the native constructor, parameters, buffers, state_dict keys and repr,
so a native checkpoint loads into them with strict=True and back.
"""

import torch
from torch.nn.modules.utils import _pair

from . import functional

__all__ = ["Conv2d", "LSTMCell", "MaxPool2d"]


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
