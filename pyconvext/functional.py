"""Functional interface: the signatures of torch.nn.functional, on pyconvext's kernels."""

import torch
from torch.nn.modules.utils import _pair

__all__ = ["conv2d"]


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d on pyconvext's kernels.

    input (N, C, H, W) or (C, H, W); weight (K, C / groups, kH, kW); bias (K,) or None.
    stride, dilation: int or pair. padding: int, pair, 'valid' or 'same' (unit stride only;
    an odd total padding puts the extra row / column at the bottom / right, as native does).
    """
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise RuntimeError(
                    "pyconvext.conv2d: padding='same' is not supported for strided convolutions"
                )
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[-2:])]
            padding = tuple(t // 2 for t in total)
            extra = [t - 2 * p for t, p in zip(total, padding)]
            if any(extra):
                input = torch.nn.functional.pad(input, (0, extra[1], 0, extra[0]))
        else:
            raise RuntimeError(
                f"pyconvext.conv2d: invalid padding string {padding!r}, expected 'valid' or 'same'"
            )
    else:
        padding = _pair(padding)
    return torch.ops.pyconvext.conv2d(input, weight, bias, stride, padding, dilation, groups)
