"""Autograd is the library's own, in C++ (csrc/autograd/): each operator's
kernel for the Autograd dispatch key is registered there, none from Python,
and gradients flow through the operators called directly, without the
Python wrappers."""

import re

import pytest
import torch

import pyconvext  # noqa: F401  (registers the operators)
from pyconvext._registrations import OPS

OPS_DIRECT = torch.ops.pyconvext


@pytest.mark.parametrize("op", OPS)
def test_autograd_kernel_is_cpp(op):
    dump = torch._C._dispatch_dump(f"pyconvext::{op}")
    autograd = [line for line in dump.splitlines() if line.startswith("Autograd")]
    assert len(autograd) == 1, dump
    assert re.search(r"registered at \S*csrc/autograd/(conv2d|max_pool2d|lstm)\.cpp:\d+ ", autograd[0]), dump
    assert "torch/library.py" not in autograd[0]


def test_operators_called_directly_have_gradients(gen):
    x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    out = OPS_DIRECT.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1)
    pooled, indices = OPS_DIRECT.max_pool2d(out, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert not indices.requires_grad
    grads = torch.autograd.grad(pooled.square().sum(), (x, w, b))
    want = torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(x, w, b, padding=1), 2)
    expected = torch.autograd.grad(want.square().sum(), (x, w, b))
    for got, ref in zip(grads, expected):
        torch.testing.assert_close(got, ref)


def test_bias_gradient_only_where_given(gen):
    """The bias is an optional tensor argument: without one, the gradient
    mask asks for no bias gradient (autograd numbers only the tensors given)."""
    x = torch.randn(1, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(OPS_DIRECT.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1).sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(torch.nn.functional.conv2d(x, w).sum(), x)[0])
    w.requires_grad_()
    grads = torch.autograd.grad(OPS_DIRECT.conv2d(x, w, None, [1, 1], [0, 0], [1, 1], 1).sum(), (x, w))
    assert all(g is not None for g in grads)
