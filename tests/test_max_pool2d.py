"""pyconvext.max_pool2d against torch.nn.functional.max_pool2d on the CPU:
values and indices exactly equal, gradients equal, errors of the same type."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import pyconvext
from pyconvext import functional as P

OPS = torch.ops.pyconvext


def options(kernel, stride, padding, dilation, ceil_mode):
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                ceil_mode=ceil_mode)


def valid(kwargs):
    """Whether native accepts these options: padding at most half the kernel."""
    pair = torch.nn.modules.utils._pair
    return all(p <= k // 2 for k, p in zip(pair(kwargs["kernel_size"]), pair(kwargs["padding"])))


# Every option of max_pool2d, over input shapes that leave partial windows,
# batched and batchless; the combinations native refuses are left out (they
# are in BAD_INPUTS).
GRID = [
    (shape, kwargs)
    for shape, kwargs in itertools.product(
        [(2, 3, 9, 10), (1, 2, 7, 7), (3, 13, 5), (2, 1, 4, 16)],
        [options(*o) for o in itertools.product(
            [1, 2, 3, (2, 3)], [1, 2, (3, 1)], [0, 1, (1, 0)], [1, 2, (1, 3)], [False, True])],
    )
    if valid(kwargs)
]


def native_accepts(x, kwargs):
    try:
        F.max_pool2d(x, **kwargs)
    except RuntimeError:
        return False
    return True


def grid_id(case):
    shape, kw = case
    return "x".join(map(str, shape)) + "-" + "-".join(f"{k[0]}{v}" for k, v in kw.items())


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def check_against_native(x, kwargs, grad=True):
    """Values, indices and the values-only forward exactly as native (NaNs
    equal), in the same layout; with grad, the input gradient too."""
    want, want_index = F.max_pool2d(x, **kwargs, return_indices=True)
    got, got_index = P.max_pool2d(x, **kwargs, return_indices=True)
    with torch.no_grad():
        values_only = P.max_pool2d(x, **kwargs)
    for out in (got, values_only):
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
        assert out.stride() == want.stride()
    assert torch.equal(got_index, want_index)
    assert got_index.stride() == want_index.stride()
    if grad:
        grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
        grad_out = grad_out.to(x.device, x.dtype)
        # Where windows overlap, native sums float16 and bfloat16 gradients
        # in their own precision, rounding at every step; ours sums in float32
        # and rounds once, as native does in float32.
        wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        x_native = x.detach().to(wide).requires_grad_()
        (want_grad,) = torch.autograd.grad(F.max_pool2d(x_native, **kwargs), x_native, grad_out.to(wide))
        x_ours = x.detach().clone().requires_grad_()
        (got_grad,) = torch.autograd.grad(P.max_pool2d(x_ours, **kwargs), x_ours, grad_out)
        assert got_grad.dtype == x.dtype
        torch.testing.assert_close(got_grad, want_grad.to(x.dtype))
        assert got_grad.stride() == want_grad.stride()


@pytest.mark.parametrize("shape,kwargs", GRID, ids=[grid_id(c) for c in GRID])
def test_grid_matches_native(gen, shape, kwargs):
    x = randn(gen, *shape)
    if not native_accepts(x, kwargs):
        with pytest.raises(RuntimeError, match="^pyconvext.max_pool2d: "):
            P.max_pool2d(x, **kwargs)
        return
    check_against_native(x, kwargs)


CASES = [
    options(2, 2, 0, 1, False),
    options(3, 2, 1, 1, False),
    options(3, 2, 0, 1, True),
    options((3, 2), (2, 1), (1, 1), (2, 1), True),
]


@pytest.mark.parametrize("kwargs", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "batchless_permuted",
                                    "one_channel_channels_last"])
def test_dtypes_and_layouts(gen, kwargs, dtype, layout):
    x = randn(gen, 2, 6, 20, 23, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, ::2, 1:, ::2]
    elif layout == "batchless_permuted":
        x = x[0].permute(1, 2, 0).contiguous().permute(2, 0, 1)
    elif layout == "one_channel_channels_last":
        x = x[:, :1].contiguous(memory_format=torch.channels_last)
    check_against_native(x, kwargs)


@pytest.mark.parametrize("channels", [1, 3, 5, 16, 17, 40, 70])
def test_channels_last_channel_counts(gen, channels):
    """Every vector width of the channels_last kernel, and a last partial vector."""
    for dtype in (torch.float32, torch.float64):
        x = randn(gen, 2, channels, 9, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
        check_against_native(x, options(3, 2, 1, 1, True))


@pytest.mark.parametrize("width", [1, 2, 5, 8, 9, 31, 64, 65, 130, 300])
def test_row_widths(gen, width):
    """Rows of one vector or less, of whole vectors, of vectors plus a tail, and
    long enough for groups of vectors, with edges on both sides."""
    for kwargs in (options(3, 2, 1, 1, False), options(2, 1, 1, 1, True), options(3, 3, 1, 2, True),
                   options((1, 4), (1, 3), (0, 2), 1, False)):
        x = randn(gen, 2, 3, 6, width)
        if native_accepts(x, kwargs):
            check_against_native(x, kwargs)


@pytest.mark.parametrize("kwargs,width", [
    (options(2, 2, 0, 1, False), 8), (options(2, 2, 0, 1, True), 24), (options(3, 3, 0, 1, False), 66),
    (options(2, 3, 0, 1, False), 9), (options(2, 4, 0, 2, False), 8), (options(3, 2, 0, 1, True), 8),
    (options((3, 1), (2, 1), (1, 0), 1, False), 5),
])
def test_rows_tiled_by_windows(gen, kwargs, width):
    """Rows whose windows tile them exactly are pooled as one long row per
    plane; a window that would reach into the next row (k3 s2 ceil) must not."""
    for dtype in (torch.float32, torch.float64):
        check_against_native(randn(gen, 3, 4, 6, width, dtype=dtype), kwargs)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_dtypes(gen, dtype):
    """Native takes integers: the smallest value of the dtype never loses to
    the scan's start."""
    info = torch.iinfo(dtype)
    x = torch.randint(-5, 5, (2, 3, 11, 12), generator=gen).clamp(info.min, info.max).to(dtype)
    x[0, 0] = info.min
    x[1, 1, :3] = info.max
    for kwargs in CASES:
        check_against_native(x, kwargs, grad=False)
        # Native fails on channels_last int8 and uint8 ("Expected input_depth *
        # input_height * input_width <= ..."): compare with its NCHW result.
        want, want_index = F.max_pool2d(x, **kwargs, return_indices=True)
        got, got_index = P.max_pool2d(x.contiguous(memory_format=torch.channels_last), **kwargs,
                                      return_indices=True)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want) and torch.equal(got_index, want_index)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_ties_give_native_indices(gen, layout):
    """The tie rule: taps are scanned in row-major order and a value replaces
    the maximum only if greater, so among equal maxima the first in the window
    wins. Constant planes, planes of few distinct values and overlapping
    windows with padding check it."""
    constant = torch.full((2, 3, 9, 9), 1.5)
    few_values = torch.randint(0, 3, (2, 3, 11, 10), generator=gen).float()
    for x in (constant, few_values, -few_values, torch.zeros(1, 2, 5, 7)):
        for kwargs in CASES + [options(3, 1, 1, 1, False), options(3, 1, 1, 2, True)]:
            check_against_native(x.contiguous(memory_format=layout), kwargs)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_nan_and_infinities_as_native(gen, layout):
    """NaN wins (the last NaN of a window, by native's rule), padding never
    wins, and a window of -inf gives its first position inside the input."""
    x = randn(gen, 2, 4, 12, 13)
    x[x > 1.2] = float("nan")
    x[0, 1] = float("-inf")
    x[1, 2, 3:7] = float("inf")
    x[1, 3, :, :5] = float("-inf")
    for kwargs in CASES + [options(3, 1, 1, 1, False)]:
        check_against_native(x.contiguous(memory_format=layout), kwargs, grad=False)


def test_empty_batch(gen):
    x = randn(gen, 0, 3, 8, 8).requires_grad_()
    out, index = P.max_pool2d(x, 2, return_indices=True)
    assert out.shape == index.shape == (0, 3, 4, 4)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape


def test_window_inside_padding_only():
    """With dilation, a window can miss the input entirely: native gives -inf
    and an index past the plane (its first tap inside the padding rule), and
    so do we. Such an index names no element, so its gradient goes nowhere
    (native's CPU backward writes past the plane here and corrupts the heap)."""
    x = torch.randn(1, 1, 1, 3)
    kwargs = options((2, 1), 1, (1, 0), (2, 1), False)
    check_against_native(x, kwargs, grad=False)
    out, index = P.max_pool2d(x.requires_grad_(), **kwargs, return_indices=True)
    assert (index == 3).any()
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    expected = torch.zeros_like(x).view(-1).index_add_(0, index[index < 3], torch.ones(int((index < 3).sum())))
    assert torch.equal(grad, expected.view_as(x))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_inputs_never_modified(gen, layout):
    x = randn(gen, 2, 3, 10, 10).contiguous(memory_format=layout)
    x_copy = x.clone()
    out, index = OPS.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True)
    grad_out = torch.randn_like(out)
    saved = (grad_out.clone(), index.clone())
    OPS.max_pool2d_values(x, [3, 3], [2, 2], [1, 1], [1, 1], True)
    OPS.max_pool2d_backward(grad_out, x, index, [3, 3], [2, 2], [1, 1], [1, 1], True)
    assert torch.equal(x, x_copy)
    assert torch.equal(grad_out, saved[0]) and torch.equal(index, saved[1])


def test_values_only_forward_writes_no_indices(gen):
    """Without indices or gradients, functional.max_pool2d runs the values-only
    operator; with either, the operator that returns indices."""
    x = randn(gen, 2, 3, 8, 8).requires_grad_()
    with torch.profiler.profile() as prof:
        with torch.no_grad():
            P.max_pool2d(x, 2)
        P.max_pool2d(x, 2)
        P.max_pool2d(x.detach(), 2, return_indices=True)
    names = [e.name for e in prof.events() if e.name.startswith("pyconvext::")]
    assert names == ["pyconvext::max_pool2d_values", "pyconvext::max_pool2d", "pyconvext::max_pool2d"]


def test_values_only_operator_has_no_gradient(gen):
    x = randn(gen, 1, 2, 6, 6).requires_grad_()
    params = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match=r"^pyconvext.max_pool2d_values: the input requires grad, but "
                                           r"this operator has no gradient; use pyconvext::max_pool2d"):
        OPS.max_pool2d_values(x, *params)
    with torch.no_grad():
        out = OPS.max_pool2d_values(x, *params)
    assert not out.requires_grad
    assert torch.equal(out, F.max_pool2d(x.detach(), 2))


# --- gradients, operator checks, compile ---------------------------------------------------

GRADCHECK_CASES = [
    ((2, 3, 7, 8), options(3, 2, 1, 1, True)),
    ((3, 6, 6), options((2, 3), (1, 2), (1, 0), (2, 1), False)),
    ((1, 2, 5, 5), options(2, 1, 0, 1, False)),
]


@pytest.mark.parametrize("shape,kwargs", GRADCHECK_CASES)
def test_gradcheck(gen, shape, kwargs):
    x = randn(gen, *shape, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: P.max_pool2d(t, **kwargs), (x,))


@pytest.mark.parametrize("shape,kwargs", GRADCHECK_CASES)
def test_gradgradcheck(gen, shape, kwargs):
    x = randn(gen, *shape, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: P.max_pool2d(t, **kwargs), (x,))


def pool_samples(gen):
    x = randn(gen, 2, 4, 9, 8)
    return [
        (x, [2, 2], [2, 2], [0, 0], [1, 1], False),
        (x.contiguous(memory_format=torch.channels_last), [3, 3], [2, 2], [1, 1], [1, 1], True),
        (x[0], [3, 2], [1, 2], [1, 1], [2, 1], True),
    ]


@pytest.mark.parametrize("index", range(3))
def test_opcheck(gen, index):
    x, *params = pool_samples(gen)[index]
    torch.library.opcheck(OPS.max_pool2d.default, [x.requires_grad_(), *params])
    torch.library.opcheck(OPS.max_pool2d_values.default, [x.detach(), *params])
    out, indices = OPS.max_pool2d(x.detach(), *params)
    grad_out = randn(gen, *out.shape).requires_grad_()
    torch.library.opcheck(OPS.max_pool2d_backward.default, [grad_out, x.detach(), indices, *params])


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        pyconvext.nn.MaxPool2d(3, stride=2, padding=1), torch.nn.ReLU(),
        pyconvext.nn.MaxPool2d(2, ceil_mode=True),
    )
    x = randn(gen, 2, 3, 17, 15).requires_grad_()
    compiled = torch.compile(model, fullgraph=True)
    want = model(x)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    got = compiled(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
    indices = torch.compile(lambda t: P.max_pool2d(t, 3, 2, return_indices=True), fullgraph=True)
    assert torch.equal(indices(x.detach())[1], F.max_pool2d(x.detach(), 3, 2, return_indices=True)[1])


# --- bad input -------------------------------------------------------------------------------

def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (name, input, keyword arguments, error, message)
BAD_INPUTS = [
    ("stride over 32 bits", t(1, 1, 5, 5), dict(kernel_size=2, stride=2**62), RuntimeError,
     r"stride must fit in a 32-bit integer \(at most 2147483647\), but got stride=\[4611686018427387904, "),
    ("kernel over 32 bits", t(1, 1, 5, 5), dict(kernel_size=(1, 2**31)), RuntimeError,
     r"kernel_size must fit in a 32-bit integer"),
    ("2-D input", t(8, 8), dict(kernel_size=2), RuntimeError,
     r"expected 3-D \(C, H, W\) or 4-D \(N, C, H, W\) input with non-zero C, H and W \(N may be 0\), "
     r"but got input of size \[8, 8\]"),
    ("5-D input", t(1, 2, 3, 8, 8), dict(kernel_size=2), RuntimeError,
     r"expected 3-D .* but got input of size \[1, 2, 3, 8, 8\]"),
    ("no channels", t(2, 0, 8, 8), dict(kernel_size=2), RuntimeError,
     r"expected 3-D .* with non-zero C, H and W .* but got input of size \[2, 0, 8, 8\]"),
    ("empty plane", t(3, 0, 8), dict(kernel_size=2), RuntimeError, r"expected 3-D .* but got input of size \[3, 0, 8\]"),
    ("zero kernel", t(1, 2, 8, 8), dict(kernel_size=0), RuntimeError,
     r"kernel_size must be positive, but got kernel_size=\[0, 0\]"),
    ("negative kernel", t(1, 2, 8, 8), dict(kernel_size=(2, -1)), RuntimeError,
     r"kernel_size must be positive, but got kernel_size=\[2, -1\]"),
    ("zero stride", t(1, 2, 8, 8), dict(kernel_size=2, stride=0), RuntimeError,
     r"stride must be positive, but got stride=\[0, 0\]"),
    ("negative stride", t(1, 2, 8, 8), dict(kernel_size=2, stride=(1, -1)), RuntimeError,
     r"stride must be positive, but got stride=\[1, -1\]"),
    ("negative padding", t(1, 2, 8, 8), dict(kernel_size=2, padding=-1), RuntimeError,
     r"padding must be non-negative, but got padding=\[-1, -1\]"),
    ("padding over half the kernel", t(1, 2, 8, 8), dict(kernel_size=3, padding=2), RuntimeError,
     r"padding must be at most half of kernel_size, but got padding=\[2, 2\] and kernel_size=\[3, 3\]"),
    ("zero dilation", t(1, 2, 8, 8), dict(kernel_size=2, dilation=0), RuntimeError,
     r"dilation must be positive, but got dilation=\[0, 0\]"),
    ("output too small", t(3, 2, 2), dict(kernel_size=3, stride=1), RuntimeError,
     r"input of size \[3, 2, 2\] is too small for kernel_size=\[3, 3\], padding=\[0, 0\] and "
     r"dilation=\[1, 1\]: the output would be 0x0"),
    ("dilated kernel too large", t(1, 2, 8, 8), dict(kernel_size=3, dilation=4), RuntimeError,
     r"input of size \[1, 2, 8, 8\] is too small for kernel_size=\[3, 3\], padding=\[0, 0\] and "
     r"dilation=\[4, 4\]: the output would be 0x0"),
    ("three kernel sizes", t(1, 2, 8, 8), dict(kernel_size=(2, 2, 2)), RuntimeError,
     r"expected kernel_size to be a single integer or a list of 2 integers, but got kernel_size=\[2, 2, 2\]"),
    ("three paddings", t(1, 2, 8, 8), dict(kernel_size=2, padding=(1, 1, 1)), RuntimeError,
     r"expected padding to be a single integer or a list of 2 integers"),
    ("three dilations", t(1, 2, 8, 8), dict(kernel_size=2, dilation=(1, 1, 1)), RuntimeError,
     r"expected dilation to be a single integer or a list of 2 integers"),
    ("bool input", t(1, 2, 8, 8, dtype=torch.bool), dict(kernel_size=2), NotImplementedError,
     r"input has dtype Bool, but only float32, float64, float16, bfloat16, uint8, int8, int16, int32 "
     r"and int64 are supported"),
    ("complex input", t(1, 2, 8, 8, dtype=torch.complex64), dict(kernel_size=2), NotImplementedError,
     r"input has dtype ComplexFloat"),
    ("uint16 input", t(1, 2, 8, 8).abs().to(torch.uint16), dict(kernel_size=2), NotImplementedError,
     r"input has dtype UInt16"),
]


@pytest.mark.parametrize("name,x,kwargs,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, x, kwargs, error, message):
    for return_indices in (False, True):
        with pytest.raises(error, match="^pyconvext.max_pool2d: " + message):
            P.max_pool2d(x, **kwargs, return_indices=return_indices)
    # Native refuses the input too, with the same exception type.
    with pytest.raises(error):
        F.max_pool2d(x, **kwargs)


def test_bad_backward_arguments(gen):
    x = randn(gen, 1, 2, 6, 6)
    out, index = OPS.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    params = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    backward = OPS.max_pool2d_backward
    with pytest.raises(RuntimeError, match=r"^pyconvext.max_pool2d_backward: expected grad_output of "
                                           r"size \[1, 2, 3, 3\] .* but got \[1, 2, 3, 2\]"):
        backward(out[..., :2], x, index, *params)
    with pytest.raises(RuntimeError, match=r"expected indices of size \[1, 2, 3, 3\] .* but got \[2, 3, 3\]"):
        backward(out, x, index[0], *params)
    with pytest.raises(RuntimeError, match=r"indices must have dtype int64, but got Int"):
        backward(out, x, index.int(), *params)
    with pytest.raises(RuntimeError, match=r"input \(Float\) and grad_output \(Double\) must have the same dtype"):
        backward(out.double(), x, index, *params)
    with pytest.raises(RuntimeError, match=r"gradients need a floating point input, but got input of dtype Long"):
        backward(out.long(), x.long(), index, *params)
    # An index outside the plane names no element: its gradient goes nowhere,
    # as on CUDA (and in native's CUDA kernel).
    for bad in (-1, 36, 2**62):
        wrong = index.clone()
        wrong[0, 1, 2, 0] = bad
        for layout in (torch.contiguous_format, torch.channels_last):
            grad = backward(*(t.contiguous(memory_format=layout) for t in (torch.ones_like(out), x, wrong)), *params)
            expected = backward(torch.ones_like(out), x, index, *params)
            expected.view(1, 2, 36)[0, 1, index[0, 1, 2, 0]] -= 1
            assert torch.equal(grad, expected)
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"input \(on cpu\), grad_output \(on meta\) and indices \(on cpu\) "
                                           r"must be on the same device"):
        backward.default.redispatch(cpu_only, out.to("meta"), x, index, *params)


# --- nn.MaxPool2d ----------------------------------------------------------------------------

MODULE_CONFIGS = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), ceil_mode=True),
    dict(kernel_size=3, return_indices=True),
]


@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_module_matches_native(gen, config):
    native, ours = torch.nn.MaxPool2d(**config), pyconvext.nn.MaxPool2d(**config)
    assert isinstance(ours, torch.nn.MaxPool2d)
    assert repr(ours) == repr(native)
    assert ours.state_dict().keys() == native.state_dict().keys()
    for x in (randn(gen, 2, 3, 11, 12), randn(gen, 3, 11, 12)):
        want, got = native(x), ours(x)
        if not config.get("return_indices"):
            want, got = (want,), (got,)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_pair_arguments_as_native(gen):
    """kernel_size, stride, padding and dilation as ints, 1- and 2-element
    sequences; stride None or empty means kernel_size."""
    x = randn(gen, 2, 3, 11, 12)
    for kwargs in (dict(kernel_size=(3,), stride=(2,)), dict(kernel_size=[3, 2], stride=None),
                   dict(kernel_size=3, stride=[]), dict(kernel_size=3, stride=(), padding=(1,)),
                   dict(kernel_size=(2, 3), dilation=(2,))):
        check_against_native(x, kwargs)
