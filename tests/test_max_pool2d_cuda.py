"""pyconvext.max_pool2d on CUDA against native torch.nn.functional.max_pool2d on
CUDA and against our CPU kernels: values, indices and strides exactly equal,
gradients equal (float16 and bfloat16 summed in float32 and rounded once),
every dtype and layout, the vector and scalar channels_last paths, 64-bit
indexing, autograd checks, opcheck, torch.compile and streams."""

import pytest
import torch
import torch.nn.functional as F

import pyconvext
import pyconvext.functional as P
from test_max_pool2d import CASES, GRADCHECK_CASES, GRID, check_against_native, grid_id, options, randn

pytestmark = pytest.mark.cuda

OPS = torch.ops.pyconvext


@pytest.mark.parametrize("shape,kwargs", GRID[::3], ids=[grid_id(c) for c in GRID[::3]])
def test_grid_matches_native(gen, shape, kwargs):
    x = randn(gen, *shape).cuda()
    try:
        F.max_pool2d(x, **kwargs)
    except RuntimeError:
        with pytest.raises(RuntimeError, match="^pyconvext.max_pool2d: "):
            P.max_pool2d(x, **kwargs)
        return
    check_against_native(x, kwargs)


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_odd_channels",
                                    "channels_last_misaligned", "sliced", "batchless"])
def test_dtypes_and_layouts(gen, kwargs, dtype, layout):
    """channels_last with a channel count of whole 16-byte vectors takes the
    vector path; odd channel counts and misaligned data the scalar one."""
    x = randn(gen, 2, 16, 20, 23, dtype=dtype).cuda()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_odd_channels":
        x = x[:, :5].contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_misaligned":
        x = randn(gen, 2 * 16 * 20 * 23 + 1, dtype=dtype).cuda()[1:].view(2, 20, 23, 16).permute(0, 3, 1, 2)
    elif layout == "sliced":
        x = x[:, ::2, 1:, ::2]
    elif layout == "batchless":
        x = x[0]
    check_against_native(x, kwargs)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_dtypes_match_the_cpu(gen, dtype):
    info = torch.iinfo(dtype)
    # 16 channels: whole vectors of 16 one-byte lanes in channels_last.
    x = torch.randint(-5, 5, (2, 16, 11, 12), generator=gen).clamp(info.min, info.max).to(dtype)
    x[0, 0] = info.min
    for layout in (torch.contiguous_format, torch.channels_last):
        for kwargs in CASES:
            want = P.max_pool2d(x.contiguous(memory_format=layout), **kwargs, return_indices=True)
            got = P.max_pool2d(x.cuda().contiguous(memory_format=layout), **kwargs, return_indices=True)
            for g, w in zip(got, want):
                assert torch.equal(g.cpu(), w) and g.stride() == w.stride()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_ties_nan_and_infinities_match_the_cpu(gen, layout):
    """The same rule on both devices: ties to the first in row-major order,
    the last NaN wins, padding never wins, -inf windows give their first
    position inside the input."""
    few = torch.randint(0, 3, (2, 8, 11, 10), generator=gen).float()
    nan = randn(gen, 2, 8, 12, 13)
    nan[nan > 1.2] = float("nan")
    nan[0, 1] = float("-inf")
    for x in (few, nan, torch.full((1, 8, 5, 7), 2.0)):
        x = x.contiguous(memory_format=layout)
        for kwargs in CASES + [options(3, 1, 1, 1, False)]:
            want, want_index = P.max_pool2d(x, **kwargs, return_indices=True)
            got, got_index = P.max_pool2d(x.cuda(), **kwargs, return_indices=True)
            torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(got_index.cpu(), want_index)


@pytest.mark.parametrize("kwargs", [options(2, 2, 0, 1, False), options(3, 2, 1, 1, True)])
def test_gradients_match_the_cpu(gen, kwargs):
    """The backward without and with overlapping windows, against ours on the CPU."""
    for layout in (torch.contiguous_format, torch.channels_last):
        x = randn(gen, 3, 8, 17, 16).contiguous(memory_format=layout)
        grads = []
        for device in ("cpu", "cuda"):
            leaf = x.to(device).requires_grad_()
            out = P.max_pool2d(leaf, **kwargs)
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
            grads.append(torch.autograd.grad(out, leaf, grad_out)[0].cpu())
        torch.testing.assert_close(grads[1], grads[0])


def test_out_of_range_indices_are_ignored(gen):
    """As native's CUDA kernel, and as our CPU kernel."""
    x = randn(gen, 1, 2, 6, 6).cuda()
    out, index = OPS.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    wrong = index.clone()
    wrong[0, 1, 2, 0] = 36
    grad = OPS.max_pool2d_backward(torch.ones_like(out), x, wrong, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert grad.sum().item() == out.numel() - 1


def test_64_bit_indexing():
    """A tensor of more than 2^31 elements takes the 64-bit kernels: the last
    plane starts past 2^31, forward and backward."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB")
    x = torch.randn(34, 1, 8192, 8000, device="cuda", dtype=torch.float16)
    assert 33 * 8192 * 8000 > 2**31
    with torch.no_grad():
        values = P.max_pool2d(x, 2)
        out, index = P.max_pool2d(x, 2, return_indices=True)
    for n in (0, 33):
        want, want_index = F.max_pool2d(x[n], 2, return_indices=True)
        assert torch.equal(values[n], want) and torch.equal(out[n], want)
        assert torch.equal(index[n], want_index)
    grad = OPS.max_pool2d_backward(torch.ones_like(out), x, index, [2, 2], [2, 2], [0, 0], [1, 1], False)
    del values, out, x
    assert grad[33].float().sum().item() == 4096 * 4000
    assert torch.equal(grad[33].flatten().nonzero().squeeze(1), index[33].flatten().sort().values)
    del grad, index
    torch.cuda.empty_cache()


@pytest.mark.parametrize("shape,kwargs", GRADCHECK_CASES)
def test_gradcheck(gen, shape, kwargs):
    x = randn(gen, *shape, dtype=torch.float64).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: P.max_pool2d(t, **kwargs), (x,))
    assert torch.autograd.gradgradcheck(lambda t: P.max_pool2d(t, **kwargs), (x,))


def test_opcheck(gen):
    x = randn(gen, 2, 8, 9, 8).cuda()
    for sample in (x, x.contiguous(memory_format=torch.channels_last), x[0]):
        params = ([3, 3], [2, 2], [1, 1], [1, 1], True)
        torch.library.opcheck(OPS.max_pool2d.default, [sample.clone().requires_grad_(), *params])
        torch.library.opcheck(OPS.max_pool2d_values.default, [sample, *params])
        out, indices = OPS.max_pool2d(sample, *params)
        grad_out = torch.randn_like(out).requires_grad_()
        torch.library.opcheck(OPS.max_pool2d_backward.default, [grad_out, sample, indices, *params])


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    model = torch.nn.Sequential(pyconvext.nn.MaxPool2d(3, 2, 1), torch.nn.ReLU(), pyconvext.nn.MaxPool2d(2))
    x = randn(gen, 2, 8, 17, 15).cuda().requires_grad_()
    want = model(x)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad)


def test_runs_on_the_current_stream(gen):
    """Graph capture fails if a kernel goes to another stream than the current one."""
    x = randn(gen, 4, 16, 64, 64).cuda()
    want = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    grad_out = torch.randn_like(want[0])
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        got = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
        values = OPS.max_pool2d_values(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
        grad = OPS.max_pool2d_backward(grad_out, x, got[1], [3, 3], [2, 2], [1, 1], [1, 1], False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(values, want[0])
    torch.testing.assert_close(grad, torch.ops.aten.max_pool2d_with_indices_backward(
        grad_out, x, [3, 3], [2, 2], [1, 1], [1, 1], False, want[1]))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_inputs_never_modified(gen, layout):
    x = randn(gen, 2, 8, 10, 10).cuda().contiguous(memory_format=layout)
    saved = x.clone()
    out, index = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True)
    grad_out = torch.randn_like(out)
    kept = (grad_out.clone(), index.clone())
    OPS.max_pool2d_values(x, [3, 3], [2, 2], [1, 1], [1, 1], True)
    OPS.max_pool2d_backward(grad_out, x, index, [3, 3], [2, 2], [1, 1], [1, 1], True)
    assert torch.equal(x, saved) and torch.equal(grad_out, kept[0]) and torch.equal(index, kept[1])


def test_bad_input_same_message_as_cpu():
    for device in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match=r"^pyconvext.max_pool2d: padding must be at most half of kernel_size"):
            P.max_pool2d(torch.randn(1, 2, 8, 8, device=device), 3, padding=2)
