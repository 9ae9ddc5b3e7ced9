"""pyconvext.conv2d against native torch.nn.functional.conv2d: values, gradients,
layouts, dtypes, autograd checks, opcheck, torch.compile and every bad input."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import pyconvext
import pyconvext.functional as P
from pyconvext.bench import CONV2D_CATALOG

# (name, input shape, weight shape, conv keyword arguments). Cases with one input
# channel per group take the direct kernels, the others im2col + GEMM. Sums stay
# short enough (<= 72 terms) for float32's default tolerance; the catalog test
# below checks long sums in float64.
CASES = [
    ("basic", (2, 3, 9, 8), (4, 3, 3, 3), {}),
    ("stride2", (2, 3, 9, 8), (4, 3, 3, 3), {"stride": 2}),
    ("stride_pair", (2, 3, 11, 9), (4, 3, 3, 2), {"stride": (2, 3)}),
    ("padding1", (2, 3, 7, 6), (5, 3, 3, 3), {"padding": 1}),
    ("padding_pair", (2, 3, 7, 6), (5, 3, 3, 3), {"padding": (2, 0)}),
    ("padding_wider_than_kernel", (1, 2, 5, 5), (3, 2, 3, 3), {"padding": 3}),
    ("same_odd_kernel", (2, 3, 8, 7), (4, 3, 3, 5), {"padding": "same"}),
    ("same_even_kernel", (2, 3, 8, 7), (4, 3, 4, 2), {"padding": "same"}),
    ("same_dilated", (2, 3, 9, 9), (4, 3, 2, 3), {"padding": "same", "dilation": (3, 2)}),
    ("valid", (2, 3, 8, 7), (4, 3, 3, 3), {"padding": "valid"}),
    ("dilation2", (2, 3, 10, 9), (4, 3, 3, 3), {"dilation": 2}),
    ("dilation_pair", (2, 3, 10, 9), (4, 3, 3, 3), {"dilation": (1, 3), "padding": (0, 2)}),
    ("groups2", (2, 4, 8, 8), (6, 2, 3, 3), {"groups": 2, "padding": 1}),
    ("groups3_strided", (2, 6, 9, 9), (9, 2, 3, 3), {"groups": 3, "stride": 2}),
    ("depthwise", (2, 5, 8, 9), (5, 1, 3, 3), {"groups": 5, "padding": 1}),
    ("depthwise_multiplier", (2, 3, 9, 8), (6, 1, 3, 3), {"groups": 3, "stride": 2, "padding": 1}),
    ("depthwise_dilated", (2, 4, 11, 10), (4, 1, 3, 3), {"groups": 4, "dilation": 2, "padding": 2}),
    ("single_channel", (3, 1, 12, 11), (4, 1, 5, 5), {}),
    ("single_channel_strided", (3, 1, 12, 11), (4, 1, 5, 3), {"stride": (2, 3), "padding": 1}),
    ("pointwise", (2, 8, 6, 5), (4, 8, 1, 1), {}),
    ("pointwise_strided", (2, 8, 7, 5), (4, 8, 1, 1), {"stride": 2}),
    ("pointwise_grouped", (2, 8, 6, 5), (6, 4, 1, 1), {"groups": 2}),
    ("row_kernel", (2, 3, 6, 9), (4, 3, 1, 5), {"padding": (0, 2)}),
    ("kernel_covers_input", (2, 3, 5, 5), (4, 3, 5, 5), {}),
    ("one_pixel_input", (2, 3, 1, 1), (4, 3, 3, 3), {"padding": 1}),
    ("more_channels", (2, 8, 6, 6), (16, 8, 3, 3), {"padding": 1}),
    ("everything", (2, 4, 11, 12), (6, 2, 3, 2), {"stride": (2, 1), "padding": (1, 2), "dilation": (2, 1), "groups": 2}),
]
CASE_IDS = [case[0] for case in CASES]


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def make_inputs(gen, input_shape, weight_shape, dtype, bias=True):
    x = randn(gen, *input_shape, dtype=dtype)
    w = randn(gen, *weight_shape, dtype=dtype)
    b = randn(gen, weight_shape[0], dtype=dtype) if bias else None
    return x, w, b


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run(conv, x, w, b, grad_out, kwargs):
    """Output and (input, weight, bias) gradients of conv on fresh leaves."""
    x, w, b = leaves(x, w, b)
    out = conv(x, w, b, **kwargs)
    out.backward(grad_out)
    return out, x.grad, w.grad, None if b is None else b.grad


def random_grad_out(gen, x, w, b, kwargs, dtype=None):
    """A random gradient of the shape of native's output."""
    shape = F.conv2d(x.float(), w.float(), None if b is None else b.float(), **kwargs).shape
    return randn(gen, *shape, dtype=dtype or x.dtype)


def layout(t):
    return (t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last))


# --- values and gradients -----------------------------------------------------------

def test_cpu_capability():
    """The kernels run with the widest vectors available, or those requested."""
    requested = os.environ.get("PYCONVEXT_CPU_CAPABILITY")
    capability = pyconvext.build_info()["cpu_capability"]
    assert capability in ("avx512", "avx2", "default")
    if requested:
        assert capability == requested


def reference(x, w, b, grad_out, kwargs):
    """Native conv2d in float64 on the same values, rounded to their dtype: the
    exact answer, which every dtype is held to at its default tolerance (two
    float32 implementations differ by more than that on long sums, as they add
    in different orders)."""
    wide = [None if t is None else t.double() for t in (x, w, b, grad_out)]
    return [None if r is None else r.to(x.dtype) for r in run(F.conv2d, *wide, kwargs)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,input_shape,weight_shape,kwargs", CASES, ids=CASE_IDS)
def test_matches_native(gen, name, input_shape, weight_shape, kwargs, dtype, bias):
    """float16 / bfloat16 accumulate in float32 and are rounded once."""
    x, w, b = make_inputs(gen, input_shape, weight_shape, dtype, bias)
    grad_out = random_grad_out(gen, x, w, b, kwargs)
    ours = run(P.conv2d, x, w, b, grad_out, kwargs)
    for got, want, what in zip(ours, reference(x, w, b, grad_out, kwargs),
                               ["output", "grad_input", "grad_weight", "grad_bias"]):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype
        assert_close(got, want, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name,input_shape,weight_shape,kwargs", CASES[::3], ids=CASE_IDS[::3])
def test_batchless_input(gen, name, input_shape, weight_shape, kwargs):
    x, w, b = make_inputs(gen, input_shape[1:], weight_shape, torch.float64)
    grad_out = random_grad_out(gen, x, w, b, kwargs)
    assert grad_out.dim() == 3
    for got, want in zip(run(P.conv2d, x, w, b, grad_out, kwargs), run(F.conv2d, x, w, b, grad_out, kwargs)):
        assert_close(got, want)


@pytest.mark.parametrize("weight_shape,groups", [((4, 3, 3, 3), 1), ((6, 1, 3, 3), 3)])
def test_empty_batch(gen, weight_shape, groups):
    x, w, b = make_inputs(gen, (0, 3, 7, 7), weight_shape, torch.float32)
    grad_out = torch.empty(0, weight_shape[0], 5, 5)
    ours = run(P.conv2d, x, w, b, grad_out, {"groups": groups})
    native = run(F.conv2d, x, w, b, grad_out, {"groups": groups})
    for got, want in zip(ours, native):
        assert got.shape == want.shape
        assert_close(got, want)


def test_zero_input_channels(gen):
    """With no input channels the output is the bias. (Native returns a tensor
    with 0 output channels here, against its own output-size rule.)"""
    x, w, b = make_inputs(gen, (2, 0, 6, 6), (4, 0, 3, 3), torch.float32)
    grad_out = randn(gen, 2, 4, 4, 4)
    out, grad_input, grad_weight, grad_bias = run(P.conv2d, x, w, b, grad_out, {})
    assert_close(out, b.view(1, 4, 1, 1).expand(2, 4, 4, 4))
    assert grad_input.shape == x.shape and grad_weight.shape == w.shape
    assert_close(grad_bias, grad_out.sum((0, 2, 3)))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("input_layout", ["contiguous", "channels_last", "sliced", "permuted", "batchless_permuted"])
def test_layouts(gen, input_layout, weight_layout, groups):
    """Any input strides give native's values, and the output and gradients come
    back in the memory format native returns."""
    f64 = torch.float64
    base = randn(gen, 3, 4, 10, 18, dtype=f64)
    if input_layout == "contiguous":
        make_x = lambda t: t  # noqa: E731
    elif input_layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
        make_x = lambda t: t  # noqa: E731
    elif input_layout == "sliced":
        make_x = lambda t: t[:, :, 1:, ::2]  # noqa: E731
    elif input_layout == "permuted":
        base = randn(gen, 3, 10, 9, 4, dtype=f64)
        make_x = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731
    else:
        base = randn(gen, 9, 10, 4, dtype=f64)
        make_x = lambda t: t.permute(2, 0, 1)  # noqa: E731
    w = randn(gen, 8, 4 // groups, 3, 3, dtype=f64)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    b = randn(gen, 8, dtype=f64)
    kwargs = {"groups": groups, "padding": 1}

    def conv_and_grads(conv, contiguous=False):
        x_leaf, w_leaf, b_leaf = leaves(base, w, b)
        x = make_x(x_leaf)
        if contiguous:
            x, w_leaf = x.contiguous(), w_leaf.contiguous()
        out = conv(x, w_leaf, b_leaf, **kwargs)
        grad_out = randn(torch.Generator().manual_seed(1), *out.shape, dtype=f64)
        grad_input, grad_weight, _ = torch.autograd.grad(out, (x, w_leaf, b_leaf), grad_out)
        return out, grad_input, grad_weight

    ours = conv_and_grads(P.conv2d)
    native = conv_and_grads(F.conv2d)
    # Values against native on contiguous copies: native itself gets grad_weight
    # wrong for a permuted batchless input with a channels_last weight and groups.
    values = conv_and_grads(F.conv2d, contiguous=True)
    for got, layout_of, value, what in zip(ours, native, values, ["output", "grad_input", "grad_weight"]):
        assert_close(got, value, msg=lambda m: f"{what}: {m}")
        assert layout(got) == layout(layout_of), f"{what}: strides {got.stride()} vs native {layout_of.stride()}"


@pytest.mark.parametrize("name,input_shape,weight_shape,kwargs", CASES[::2], ids=CASE_IDS[::2])
def test_non_finite_values_propagate_as_native(gen, name, input_shape, weight_shape, kwargs):
    """inf and NaN reach exactly the outputs and gradients they reach natively:
    in particular values next to the padding, which the kernels read while
    computing the columns they drop, must not leak into grad_weight."""
    x, w, b = make_inputs(gen, input_shape, weight_shape, torch.float64)
    x[..., -1] = float("inf")
    x.view(-1)[len(x.view(-1)) // 3] = float("nan")
    x[..., 0, 0] = -float("inf")
    grad_out = random_grad_out(gen, x.nan_to_num(), w, b, kwargs)
    ours = run(P.conv2d, x, w, b, grad_out, kwargs)
    native = run(F.conv2d, x, w, b, grad_out, kwargs)
    for got, want, what in zip(ours, native, ["output", "grad_input", "grad_weight", "grad_bias"]):
        assert_close(got, want, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layout_", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_never_modified(gen, dtype, layout_):
    fmt = torch.channels_last if layout_ == "channels_last" else torch.contiguous_format
    x, w, b = make_inputs(gen, (2, 4, 9, 9), (6, 2, 3, 3), dtype)
    x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    grad_out = randn(gen, 2, 6, 9, 9, dtype=dtype)
    assert_inputs_never_modified(x, w, b, grad_out, groups=2)


def assert_inputs_never_modified(x, w, b, grad_out, groups):
    """Both operators (padding 1) leave their inputs' values and strides alone,
    and return fresh tensors."""
    saved = [(t.clone(), t.stride()) for t in (x, w, b, grad_out)]
    out = torch.ops.pyconvext.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], groups)
    grads = torch.ops.pyconvext.conv2d_backward(grad_out, x, w, [1, 1], [1, 1], [1, 1], groups, [True, True, True])
    for t, (copy, stride) in zip((x, w, b, grad_out), saved):
        assert torch.equal(t, copy) and t.stride() == stride
    for result in (out, *grads):
        for t in (x, w, b, grad_out):
            assert result.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_backward_output_mask(gen):
    """Only the requested gradients are computed; the others are None."""
    x, w, _ = make_inputs(gen, (2, 3, 8, 8), (4, 3, 3, 3), torch.float64)
    grad_out = randn(gen, 2, 4, 6, 6, dtype=torch.float64)
    full = torch.ops.pyconvext.conv2d_backward(grad_out, x, w, [1, 1], [0, 0], [1, 1], 1, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        got = torch.ops.pyconvext.conv2d_backward(grad_out, x, w, [1, 1], [0, 0], [1, 1], 1, mask)
        for wanted, g, f in zip(mask, got, full):
            if wanted:
                assert_close(g, f)
            else:
                assert g is None


def test_only_weight_needs_grad(gen):
    """A first layer: the image needs no gradient, and none is computed."""
    x, w, b = make_inputs(gen, (2, 1, 12, 12), (4, 1, 5, 5), torch.float64)
    w_ours, w_native = leaves(w, w)
    P.conv2d(x, w_ours, b).sum().backward()
    F.conv2d(x, w_native, b).sum().backward()
    assert x.grad is None
    assert_close(w_ours.grad, w_native.grad)


# --- autograd checks, opcheck, torch.compile -------------------------------------------

GRADCHECK_CASES = [
    ((2, 4, 6, 5), (6, 2, 3, 2), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2), "groups": 2}),
    ((2, 3, 6, 6), (3, 1, 3, 3), {"groups": 3, "padding": 1}),
    ((3, 5, 5), (2, 3, 3, 3), {"padding": "same"}),
    ((2, 3, 4, 4), (2, 3, 1, 1), {}),
]


@pytest.mark.parametrize("input_shape,weight_shape,kwargs", GRADCHECK_CASES)
def test_gradcheck(gen, input_shape, weight_shape, kwargs):
    inputs = leaves(*make_inputs(gen, input_shape, weight_shape, torch.float64))
    assert torch.autograd.gradcheck(lambda x, w, b: P.conv2d(x, w, b, **kwargs), inputs)


@pytest.mark.parametrize("input_shape,weight_shape,kwargs", GRADCHECK_CASES)
def test_gradgradcheck(gen, input_shape, weight_shape, kwargs):
    inputs = leaves(*make_inputs(gen, input_shape, weight_shape, torch.float64))
    assert torch.autograd.gradgradcheck(lambda x, w, b: P.conv2d(x, w, b, **kwargs), inputs)


def test_double_backward_matches_native(gen):
    """Gradient penalties need the gradient of a gradient: compare it with native."""
    x, w, b = make_inputs(gen, (2, 4, 7, 7), (6, 2, 3, 3), torch.float64)
    results = []
    for conv in (P.conv2d, F.conv2d):
        xl, wl, bl = leaves(x, w, b)
        out = conv(xl, wl, bl, stride=2, padding=1, groups=2)
        gx, gw = torch.autograd.grad(out.square().sum(), (xl, wl), create_graph=True)
        penalty = gx.square().sum() + gw.pow(3).sum()
        results.append(torch.autograd.grad(penalty, (xl, wl, bl)))
    for got, want in zip(*results):
        assert_close(got, want)


def conv2d_samples(gen):
    x, w, b = make_inputs(gen, (2, 4, 7, 6), (6, 2, 3, 3), torch.float32)
    w1 = randn(gen, 5, 4, 3, 2)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    dw = randn(gen, 8, 1, 3, 3)
    return [
        (x, w, b, [1, 1], [1, 1], [1, 1], 2),
        (x_cl, w1, None, [2, 1], [0, 1], [1, 2], 1),
        (x[0], w1, b[:5], [1, 1], [1, 1], [1, 1], 1),
        (x, dw, None, [1, 2], [1, 1], [1, 1], 4),
    ]


@pytest.mark.parametrize("index", range(4))
def test_opcheck_conv2d(gen, index):
    x, w, b, *params = conv2d_samples(gen)[index]
    args = [x.requires_grad_(), w.requires_grad_(), None if b is None else b.requires_grad_(), *params]
    torch.library.opcheck(torch.ops.pyconvext.conv2d.default, args)


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]])
@pytest.mark.parametrize("index", range(4))
def test_opcheck_conv2d_backward(gen, index, mask):
    x, w, b, *params = conv2d_samples(gen)[index]
    out = torch.ops.pyconvext.conv2d(x, w, b, *params)
    grad_out = randn(gen, *out.shape)
    args = [grad_out.requires_grad_(), x.requires_grad_(), w.requires_grad_(), *params, mask]
    torch.library.opcheck(torch.ops.pyconvext.conv2d_backward.default, args)


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        pyconvext.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        pyconvext.nn.Conv2d(8, 8, 3, stride=2, groups=8),
        pyconvext.nn.Conv2d(8, 4, 1, padding="same", bias=False),
    )
    x = randn(gen, 2, 3, 12, 12).requires_grad_()
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.sum(), [x, *model.parameters()])
    compiled_out = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_out.sum(), [x, *model.parameters()])
    assert_close(compiled_out, eager_out)
    for got, want in zip(compiled_grads, eager_grads):
        assert_close(got, want)


def test_torch_export_keeps_our_operator(gen):
    model = torch.nn.Sequential(
        pyconvext.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), pyconvext.nn.Conv2d(8, 4, 3, stride=2, groups=4)
    ).eval()
    x = randn(gen, 2, 3, 12, 12)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.pyconvext.conv2d.default) == 2
    x5 = randn(gen, 5, 3, 12, 12)
    assert_close(exported.module()(x5), model(x5))


# --- bad input -------------------------------------------------------------------------

def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (name, args of conv2d as (input, weight, bias, stride, padding, dilation, groups), error, message)
BAD_INPUTS = [
    ("2-D input", (t(8, 8), t(4, 1, 3, 3), None, 1, 0, 1, 1), RuntimeError,
     r"expected 3-D \(unbatched\) or 4-D \(batched\) input, but got input of size \[8, 8\]"),
    ("5-D input", (t(1, 2, 3, 8, 8), t(4, 3, 3, 3), None, 1, 0, 1, 1), RuntimeError,
     r"expected 3-D \(unbatched\) or 4-D \(batched\) input"),
    ("3-D weight", (t(2, 3, 8, 8), t(4, 3, 3), None, 1, 0, 1, 1), RuntimeError,
     r"expected 4-D weight .* but got weight of size \[4, 3, 3\]"),
    ("channel mismatch", (t(2, 4, 8, 8), t(6, 3, 3, 3), None, 1, 0, 1, 1), RuntimeError,
     r"given groups=1 and weight of size \[6, 3, 3, 3\], expected input of size \[2, 4, 8, 8\] "
     r"to have 3 channels, but got 4 channels instead"),
    ("channels not divisible by groups", (t(2, 4, 8, 8), t(6, 1, 3, 3), None, 1, 0, 1, 3), RuntimeError,
     r"given groups=3 .* to have 3 channels, but got 4 channels"),
    ("out_channels not divisible by groups", (t(2, 6, 8, 8), t(5, 2, 3, 3), None, 1, 0, 1, 3), RuntimeError,
     r"out_channels \(5\) must be divisible by groups \(3\)"),
    ("no output channels", (t(2, 3, 8, 8), t(0, 3, 3, 3), None, 1, 0, 1, 1), RuntimeError,
     r"weight must have at least one output channel"),
    ("empty kernel", (t(2, 3, 8, 8), t(4, 3, 0, 3), None, 1, 0, 1, 1), RuntimeError,
     r"kernel size must be positive"),
    ("empty plane", (t(2, 3, 0, 5), t(4, 3, 1, 1), None, 1, 1, 1, 1), RuntimeError,
     r"only zero batch or zero channel inputs may be empty, but got input of size \[2, 3, 0, 5\]"),
    ("kernel larger than input", (t(2, 3, 8, 8), t(4, 3, 9, 9), None, 1, 0, 1, 1), RuntimeError,
     r"the \(dilated\) kernel 9x9 is larger than the padded input 8x8"),
    ("dilated kernel larger than padded input", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, 1, 1, 5, 1), RuntimeError,
     r"the \(dilated\) kernel 11x11 is larger than the padded input 10x10"),
    ("zero stride", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, 0, 0, 1, 1), RuntimeError,
     r"stride must be positive, but got stride=\[0, 0\]"),
    ("negative stride", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, (1, -1), 0, 1, 1), RuntimeError,
     r"stride must be positive, but got stride=\[1, -1\]"),
    ("zero dilation", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, 1, 0, 0, 1), RuntimeError,
     r"dilation must be positive"),
    ("negative padding", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, 1, -1, 1, 1), RuntimeError,
     r"padding must be non-negative, but got padding=\[-1, -1\]"),
    ("zero groups", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, 1, 0, 1, 0), RuntimeError,
     r"groups must be positive"),
    ("three strides", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, (1, 1, 1), 0, 1, 1), RuntimeError,
     r"expected stride to be a single integer or a list of 2 integers, but got stride=\[1, 1, 1\]"),
    ("bias of wrong size", (t(2, 3, 8, 8), t(4, 3, 3, 3), t(5), 1, 0, 1, 1), RuntimeError,
     r"expected bias to be 1-D with 4 elements .* but got bias of size \[5\]"),
    ("2-D bias", (t(2, 3, 8, 8), t(4, 3, 3, 3), t(4, 1), 1, 0, 1, 1), RuntimeError,
     r"expected bias to be 1-D with 4 elements .* but got bias of size \[4, 1\]"),
    ("input and weight dtypes differ", (t(2, 3, 8, 8, dtype=torch.float64), t(4, 3, 3, 3), None, 1, 0, 1, 1),
     RuntimeError, r"input \(Double\) and weight \(Float\) must have the same dtype"),
    ("bias dtype differs", (t(2, 3, 8, 8), t(4, 3, 3, 3), t(4, dtype=torch.float64), 1, 0, 1, 1),
     RuntimeError, r"input \(Float\) and bias \(Double\) must have the same dtype"),
    ("integer tensors", (t(2, 3, 8, 8, dtype=torch.int32), t(4, 3, 3, 3, dtype=torch.int32), None, 1, 0, 1, 1),
     NotImplementedError, r"input has dtype Int, but only float32, float64, float16 and bfloat16 are supported"),
    ("bool tensors", (t(2, 3, 8, 8, dtype=torch.bool), t(4, 3, 3, 3, dtype=torch.bool), None, 1, 0, 1, 1),
     NotImplementedError, r"input has dtype Bool"),
    ("complex tensors", (t(2, 3, 8, 8, dtype=torch.complex64), t(4, 3, 3, 3, dtype=torch.complex64), None, 1, 0, 1, 1),
     NotImplementedError, r"input has dtype ComplexFloat"),
    ("unknown padding string", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, 1, "full", 1, 1), RuntimeError,
     r"invalid padding string 'full', expected 'valid' or 'same'"),
    ("same padding with stride", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, 2, "same", 1, 1), RuntimeError,
     r"padding='same' is not supported for strided convolutions"),
    ("padding overflows", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, 1, (2**62, 0), 1, 1), RuntimeError,
     r"padding \(the padded input height\) overflows 64-bit integers \(2 \* 4611686018427387904\)"),
    ("dilated kernel overflows", (t(2, 3, 8, 8), t(4, 3, 3, 3), None, 1, 0, (1, 2**62), 1), RuntimeError,
     r"dilation \(the dilated kernel width\) overflows 64-bit integers"),
    ("output strides overflow", (t(0, 3, 8, 8), t(4, 3, 1, 1), None, 1, 2**31, 1, 1), RuntimeError,
     r"the output of size \[0, 4, 4294967304, 4294967304\] would have more elements than 64-bit integers count"),
]


@pytest.mark.parametrize("name,args,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, args, error, message):
    with pytest.raises(error, match="^pyconvext.conv2d: " + message):
        P.conv2d(*args)
    # Where native refuses the input too, it raises the same exception type.
    try:
        F.conv2d(*args)
    except Exception as native_error:  # noqa: BLE001
        assert isinstance(native_error, error), f"native raised {type(native_error).__name__}"


def test_bad_input_through_the_operator():
    """torch.ops callers get the same checks as the Python API."""
    with pytest.raises(RuntimeError, match=r"^pyconvext.conv2d: stride must be positive"):
        torch.ops.pyconvext.conv2d(t(1, 3, 8, 8), t(4, 3, 3, 3), None, [0, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=r"^pyconvext.conv2d_backward: expected grad_output of size \[1, 4, 6, 6\]"):
        torch.ops.pyconvext.conv2d_backward(
            t(1, 4, 5, 6), t(1, 3, 8, 8), t(4, 3, 3, 3), [1, 1], [0, 0], [1, 1], 1, [True, True, True]
        )
    with pytest.raises(RuntimeError, match=r"^pyconvext.conv2d_backward: input \(Float\) and grad_output \(Double\)"):
        torch.ops.pyconvext.conv2d_backward(
            t(1, 4, 6, 6, dtype=torch.float64), t(1, 3, 8, 8), t(4, 3, 3, 3), [1, 1], [0, 0], [1, 1], 1,
            [True, True, True],
        )


def test_tensors_on_different_devices():
    """The shared check refuses mixed devices. Without a GPU, run the CPU kernel
    itself on a CPU input and a weight on the meta device."""
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"^pyconvext.conv2d: input \(on cpu\) and weight \(on meta\) must be on the same device"):
        torch.ops.pyconvext.conv2d.default.redispatch(
            cpu_only, t(1, 3, 8, 8), t(4, 3, 3, 3).to("meta"), None, [1, 1], [0, 0], [1, 1], 1
        )
    with pytest.raises(RuntimeError, match=r"^pyconvext.conv2d: input \(on cpu\) and bias \(on meta\)"):
        torch.ops.pyconvext.conv2d.default.redispatch(
            cpu_only, t(1, 3, 8, 8), t(4, 3, 3, 3), t(4).to("meta"), [1, 1], [0, 0], [1, 1], 1
        )


@pytest.mark.cuda
def test_tensors_on_cpu_and_cuda():
    with pytest.raises((RuntimeError, NotImplementedError), match=r"^pyconvext.conv2d: "):
        P.conv2d(t(1, 3, 8, 8), t(4, 3, 3, 3).cuda())


def test_error_leaves_no_partial_state(gen):
    """After a refused call the operator still works (no corrupted global state)."""
    with pytest.raises(RuntimeError):
        P.conv2d(t(2, 4, 8, 8), t(6, 3, 3, 3))
    x, w, b = make_inputs(gen, (2, 3, 8, 8), (4, 3, 3, 3), torch.float32)
    assert_close(P.conv2d(x, w, b), F.conv2d(x, w, b))


# --- nn.Conv2d ---------------------------------------------------------------------------

MODULE_CONFIGS = [
    dict(in_channels=3, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=8, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding="same"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=(1, 2), padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, padding_mode="replicate"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=(2, 1), padding_mode="circular", stride=2),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding="same", padding_mode="reflect"),
]


@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_module_matches_native(gen, config):
    torch.manual_seed(0)
    native = torch.nn.Conv2d(**config).double()
    ours = pyconvext.nn.Conv2d(**config).double()
    assert isinstance(ours, torch.nn.Conv2d)
    assert repr(ours) == repr(native)
    assert list(ours.state_dict()) == list(native.state_dict())
    ours.load_state_dict(native.state_dict(), strict=True)

    x = randn(gen, 2, config["in_channels"], 9, 10, dtype=torch.float64)
    outs = []
    for module in (ours, native):
        xl = x.clone().requires_grad_()
        out = module(xl)
        grads = torch.autograd.grad(out, [xl, *module.parameters()], torch.ones_like(out))
        outs.append((out, *grads))
    for got, want in zip(*outs):
        assert_close(got, want)

    # ... and back: our state_dict loads into a native module strictly.
    round_trip = torch.nn.Conv2d(**config).double()
    round_trip.load_state_dict(ours.state_dict(), strict=True)
    assert_close(round_trip(x), ours(x))


def test_module_batchless_input(gen):
    ours, native = pyconvext.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 3, padding=1)
    ours.load_state_dict(native.state_dict())
    x = randn(gen, 3, 7, 7)
    assert_close(ours(x), native(x))


# --- catalog shapes ------------------------------------------------------------------------

@pytest.mark.parametrize("layer", CONV2D_CATALOG, ids=lambda layer: layer.name)
def test_catalog_layer(gen, layer):
    """Every benchmarked layer, at batch 2 in float64 (a tight check)."""
    x, w, b = make_inputs(
        gen, (2, layer.in_channels, layer.height, layer.width),
        (layer.out_channels, layer.in_channels // layer.groups, layer.kernel, layer.kernel), torch.float64,
    )
    kwargs = {"stride": layer.stride, "padding": layer.padding, "groups": layer.groups}
    grad_out = random_grad_out(gen, x, w, b, kwargs)
    for got, want in zip(run(P.conv2d, x, w, b, grad_out, kwargs), run(F.conv2d, x, w, b, grad_out, kwargs)):
        assert_close(got, want)


# Small output planes with many channels run as GEMMs over im2col columns
# (forward up to 4x4 outputs, backward up to 7x7), in chunks of images.
COLUMNS_CASES = [
    # (N, C, H, W), (K, C/groups, kh, kw), options
    ((3, 64, 4, 4), (16, 64, 3, 3), dict(padding=1)),
    ((2, 32, 7, 7), (24, 32, 3, 3), dict(stride=2, padding=1)),
    ((2, 16, 9, 8), (8, 16, 3, 2), dict(padding=(2, 0), dilation=(2, 3), stride=(1, 2))),
    ((2, 64, 6, 6), (32, 16, 3, 3), dict(padding=1, groups=4)),
    ((20, 2048, 4, 4), (8, 2048, 3, 3), dict(padding=1)),  # columns in chunks of 14 and 6 images
    ((1, 128, 7, 7), (4, 128, 1, 1), dict(stride=2)),  # strided 1x1: not pointwise
]


@pytest.mark.parametrize("x_shape, w_shape, kwargs", COLUMNS_CASES)
def test_columns_path(gen, x_shape, w_shape, kwargs):
    x, w, b = make_inputs(gen, x_shape, w_shape, torch.float64)
    grad_out = random_grad_out(gen, x, w, b, kwargs)
    for got, want in zip(run(P.conv2d, x, w, b, grad_out, kwargs), run(F.conv2d, x, w, b, grad_out, kwargs)):
        assert_close(got, want)


def test_columns_path_float32(gen):
    """72-term sums (8 channels x 3x3), short enough for float32's tolerance."""
    x, w, b = make_inputs(gen, (3, 8, 4, 4), (16, 8, 3, 3), torch.float32)
    kwargs = dict(padding=1)
    grad_out = random_grad_out(gen, x, w, b, kwargs)
    for got, want in zip(run(P.conv2d, x, w, b, grad_out, kwargs), reference(x, w, b, grad_out, kwargs)):
        assert_close(got, want)


# Pointwise convolutions of one image are plain GEMMs (ours, cpu/gemm.h):
# out (M x N) = W (M x K) x (K x N); grad_input = W^T grad_out, grad_weight =
# grad_out x^T. These shapes reach every edge of the GEMM: rows beyond whole
# register tiles (8 with AVX-512, 6 otherwise), columns beyond whole panels,
# depths over its blocks of 256, more panels than a thread keeps in L2 at
# once, threads splitting rows or columns, and one-element sides.
GEMM_SHAPES = [(1, 1, 1), (7, 300, 70), (9, 513, 600), (300, 20, 5), (17, 257, 1100), (64, 8, 3000)]


@pytest.mark.parametrize("m, k, n", GEMM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pointwise_gemm_shapes(gen, m, k, n, dtype):
    """Small integers: every product and sum is exact in either dtype, so each
    element must equal native's exactly, whatever order the sums take."""
    def ints(*shape):
        return torch.randint(-4, 5, shape, generator=gen).to(dtype)

    x, w, b, grad_out = ints(1, k, 1, n), ints(m, k, 1, 1), ints(m), ints(1, m, 1, n)
    for got, want in zip(run(P.conv2d, x, w, b, grad_out, {}), run(F.conv2d, x, w, b, grad_out, {})):
        assert_close(got, want, rtol=0, atol=0)


# The batch tiles (batches of 8 and more, 16 and more input channels and a
# panel of output channels, 32 with AVX-512, per group):
# images as the rows of an implicit GEMM, one output pixel per tile, taps in
# the padding skipped; the input gradient of unit-stride convolutions runs on
# them too, with the kernel flipped in the packing, and the weight gradient
# on planes of 5x5 to 16x16, with input channels as rows. Batches beyond one
# tile of rows (12 with AVX-512, 6 otherwise), channel counts beyond whole
# panels of 2 vectors or blocks of rows, groups, strides, dilations, padding
# wider than the kernel (whose input gradient is not a convolution), and
# planes small enough for the columns path's weight gradient.
BATCH_TILE_CASES = [
    ((8, 32, 9, 8), (40, 32, 3, 3), {"padding": 1}),
    ((13, 33, 7, 7), (33, 33, 3, 3), {"padding": 1}),
    ((25, 16, 6, 5), (32, 16, 3, 3), {"stride": 2, "padding": 1}),
    ((9, 24, 8, 9), (40, 24, 2, 3), {"stride": (1, 2), "padding": (0, 2), "dilation": (2, 1)}),
    ((8, 32, 9, 8), (36, 32, 3, 2), {"padding": (2, 1), "dilation": (2, 3)}),
    ((8, 16, 5, 5), (48, 16, 3, 3), {"padding": 3}),
    ((10, 64, 6, 6), (80, 32, 3, 3), {"groups": 2, "padding": 1}),
    ((8, 64, 4, 4), (70, 64, 3, 3), {"padding": 1}),
    ((8, 16, 1, 1), (32, 16, 3, 3), {"padding": 1}),
    ((8, 41, 7, 6), (36, 41, 3, 3), {"padding": 1}),
]


@pytest.mark.parametrize("input_shape,weight_shape,kwargs", BATCH_TILE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_tiles(gen, input_shape, weight_shape, kwargs, dtype):
    """Small integers: every sum is exact, so each element must equal native's."""
    def ints(*shape):
        return torch.randint(-4, 5, shape, generator=gen).to(dtype)

    x, w, b = ints(*input_shape), ints(*weight_shape), ints(weight_shape[0])
    grad_out = ints(*F.conv2d(x, w, b, **kwargs).shape)
    for got, want in zip(run(P.conv2d, x, w, b, grad_out, kwargs), run(F.conv2d, x, w, b, grad_out, kwargs)):
        assert_close(got, want, rtol=0, atol=0)
