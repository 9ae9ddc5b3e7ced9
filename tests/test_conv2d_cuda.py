"""pyconvext.conv2d on CUDA against native torch.nn.functional.conv2d (cuDNN,
TF32 off) and against our CPU kernels: values, every gradient, layouts, dtypes,
autograd checks, opcheck, torch.compile, streams and the catalog layers.

Tolerances: float64, and float32 on short sums, at assert_close's defaults
against native float64 rounded to the dtype (the exact answer). float32 on
long sums: a relative error norm ||ours - ref|| / ||ref|| <= 1e-5 against native
float64. float16 and bfloat16 (tensor cores, float32 accumulation, one rounding
at the end): relative error norm <= 2e-3 and <= 1e-2 against native float32 on
the same (rounded) values; their unit roundoff is 4.9e-4 and 3.9e-3.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import pyconvext
import pyconvext.functional as P
from pyconvext.bench import CONV2D_CATALOG
from test_conv2d import (
    CASE_IDS, CASES, GRADCHECK_CASES, assert_inputs_never_modified, leaves, make_inputs, randn,
    random_grad_out, run,
)

pytestmark = pytest.mark.cuda

# Shapes that fill GEMM tiles: several tiles along every GEMM dimension, partial
# last tiles, stride phases without taps, split reductions, every tile width;
# and the input gradient of few input channels (direct, or columns and col2im,
# in chunks of images when the columns would be large).
GEMM_CASES = [
    ("tiles_and_tails", (3, 40, 17, 19), (70, 40, 3, 3), {"padding": 1}),
    ("narrow_rows", (2, 20, 21, 18), (24, 20, 3, 3), {"padding": 1}),
    ("stride2_5x5", (2, 24, 23, 21), (48, 24, 5, 5), {"stride": 2, "padding": 2}),
    ("stride3_dilated", (2, 20, 25, 22), (36, 20, 3, 3), {"stride": 3, "dilation": 2, "padding": 3}),
    ("stride_and_dilation_share_a_factor", (2, 18, 24, 23), (20, 18, 4, 4), {"stride": 2, "dilation": 2, "padding": 1}),
    ("stride4_11x11", (2, 3, 63, 59), (40, 3, 11, 11), {"stride": 4, "padding": 2}),
    ("kernel_larger_than_stride_rows", (2, 8, 20, 20), (24, 8, 1, 7), {"stride": (3, 2), "padding": (0, 3)}),
    ("groups4", (2, 64, 15, 15), (96, 16, 3, 3), {"groups": 4, "padding": 1}),
    ("pointwise_wide", (4, 130, 9, 9), (66, 130, 1, 1), {}),
    ("pointwise_strided", (3, 48, 13, 11), (40, 48, 1, 1), {"stride": 2}),
    ("long_reduction_split", (16, 33, 30, 30), (40, 33, 3, 3), {"padding": 1}),
    ("depthwise_large", (4, 32, 40, 40), (32, 1, 3, 3), {"groups": 32, "padding": 1}),
    ("one_input_channel", (8, 1, 28, 28), (10, 1, 5, 5), {}),
    ("few_input_channels_grouped", (2, 6, 15, 14), (32, 3, 3, 3), {"groups": 2, "stride": 2, "padding": 1}),
    ("few_input_channels_dilated", (2, 2, 17, 16), (12, 2, 3, 3), {"dilation": 2, "padding": 2, "stride": (1, 2)}),
    ("columns_in_chunks", (3, 3, 300, 300), (16, 3, 7, 7), {"padding": 3}),
]
GEMM_IDS = [case[0] for case in GEMM_CASES]


def cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


def make(gen, input_shape, weight_shape, dtype, bias=True):
    return cuda(*make_inputs(gen, input_shape, weight_shape, dtype, bias))


def grad_out_for(gen, x, w, b, kwargs, dtype):
    return random_grad_out(gen, x, w, b, kwargs, dtype).cuda()


def reference(x, w, b, grad_out, kwargs, dtype):
    """Native conv2d and its gradients on the same values in `dtype`."""
    wide = [None if t is None else t.to(dtype) for t in (x, w, b, grad_out)]
    return run(F.conv2d, *wide, kwargs)


def assert_relative_error(got, want, tol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    got, want = got.double(), want.double()
    error = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


NAMES = ["output", "grad_input", "grad_weight", "grad_bias"]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,input_shape,weight_shape,kwargs", CASES, ids=CASE_IDS)
def test_matches_native(gen, name, input_shape, weight_shape, kwargs, dtype, bias):
    x, w, b = make(gen, input_shape, weight_shape, dtype, bias)
    grad_out = grad_out_for(gen, x, w, b, kwargs, dtype)
    ours = run(P.conv2d, x, w, b, grad_out, kwargs)
    exact = reference(x, w, b, grad_out, kwargs, torch.float64)
    for got, want, what in zip(ours, exact, NAMES):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype and got.is_cuda
        assert_close(got, want.to(dtype), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name,input_shape,weight_shape,kwargs", GEMM_CASES, ids=GEMM_IDS)
def test_gemm_shapes_float64(gen, name, input_shape, weight_shape, kwargs):
    x, w, b = make(gen, input_shape, weight_shape, torch.float64)
    grad_out = grad_out_for(gen, x, w, b, kwargs, torch.float64)
    ours = run(P.conv2d, x, w, b, grad_out, kwargs)
    for got, want, what in zip(ours, run(F.conv2d, x, w, b, grad_out, kwargs), NAMES):
        assert_close(got, want, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name,input_shape,weight_shape,kwargs", GEMM_CASES, ids=GEMM_IDS)
def test_gemm_shapes_float32(gen, name, input_shape, weight_shape, kwargs):
    x, w, b = make(gen, input_shape, weight_shape, torch.float32)
    grad_out = grad_out_for(gen, x, w, b, kwargs, torch.float32)
    ours = run(P.conv2d, x, w, b, grad_out, kwargs)
    for got, want, what in zip(ours, reference(x, w, b, grad_out, kwargs, torch.float64), NAMES):
        assert got.dtype == torch.float32
        assert_relative_error(got, want, 1e-5, what)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name,input_shape,weight_shape,kwargs", CASES + GEMM_CASES, ids=CASE_IDS + GEMM_IDS)
def test_reduced_precision(gen, name, input_shape, weight_shape, kwargs, dtype, tol):
    x, w, b = make(gen, input_shape, weight_shape, dtype)
    grad_out = grad_out_for(gen, x, w, b, kwargs, dtype)
    ours = run(P.conv2d, x, w, b, grad_out, kwargs)
    for got, want, what in zip(ours, reference(x, w, b, grad_out, kwargs, torch.float32), NAMES):
        assert got.dtype == dtype
        assert_relative_error(got, want, tol, what)


@pytest.mark.parametrize("name,input_shape,weight_shape,kwargs", CASES[::2] + GEMM_CASES[::2],
                         ids=CASE_IDS[::2] + GEMM_IDS[::2])
def test_cuda_matches_our_cpu_kernels(gen, name, input_shape, weight_shape, kwargs):
    x, w, b = make(gen, input_shape, weight_shape, torch.float64)
    grad_out = grad_out_for(gen, x, w, b, kwargs, torch.float64)
    on_gpu = run(P.conv2d, x, w, b, grad_out, kwargs)
    on_cpu = run(P.conv2d, *[t.cpu() for t in (x, w, b, grad_out)], kwargs)
    for got, want, what in zip(on_gpu, on_cpu, NAMES):
        assert_close(got.cpu(), want, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("layer", CONV2D_CATALOG, ids=lambda layer: layer.name)
def test_catalog_layer(gen, layer):
    """Every benchmarked layer: at batch 2 in float64 (tight), and at its
    benchmark batch in bfloat16 (the tensor-core path on real shapes)."""
    kwargs = {"stride": layer.stride, "padding": layer.padding, "groups": layer.groups}
    weight_shape = (layer.out_channels, layer.in_channels // layer.groups, layer.kernel, layer.kernel)
    x, w, b = make(gen, (2, layer.in_channels, layer.height, layer.width), weight_shape, torch.float64)
    grad_out = grad_out_for(gen, x, w, b, kwargs, torch.float64)
    for got, want, what in zip(run(P.conv2d, x, w, b, grad_out, kwargs), run(F.conv2d, x, w, b, grad_out, kwargs), NAMES):
        assert_close(got, want, msg=lambda m: f"{what}: {m}")

    x, w, b = make(gen, (layer.batch, layer.in_channels, layer.height, layer.width), weight_shape, torch.bfloat16)
    grad_out = grad_out_for(gen, x, w, b, kwargs, torch.bfloat16)
    ours = run(P.conv2d, x, w, b, grad_out, kwargs)
    for got, want, what in zip(ours, reference(x, w, b, grad_out, kwargs, torch.float32), NAMES):
        assert_relative_error(got, want, 1e-2, what)


def test_batchless_and_empty_batch(gen):
    x, w, b = make(gen, (3, 9, 8), (5, 3, 3, 3), torch.float64)
    grad_out = grad_out_for(gen, x, w, b, {"padding": 1}, torch.float64)
    for got, want in zip(run(P.conv2d, x, w, b, grad_out, {"padding": 1}), run(F.conv2d, x, w, b, grad_out, {"padding": 1})):
        assert_close(got, want)
    for weight_shape, groups in [((40, 36, 3, 3), 1), ((6, 1, 3, 3), 3)]:
        x, w, b = make(gen, (0, 36 if groups == 1 else 3, 7, 7), weight_shape, torch.float32)
        grad_out = torch.empty(0, weight_shape[0], 5, 5, device="cuda")
        for got, want in zip(run(P.conv2d, x, w, b, grad_out, {"groups": groups}),
                             run(F.conv2d, x, w, b, grad_out, {"groups": groups})):
            assert got.shape == want.shape
            assert_close(got, want)


def test_zero_input_channels(gen):
    """As on the CPU: the output is the bias (native returns 0 channels here)."""
    x, w, b = make(gen, (2, 0, 6, 6), (4, 0, 3, 3), torch.float32)
    grad_out = randn(gen, 2, 4, 4, 4).cuda()
    out, grad_input, grad_weight, grad_bias = run(P.conv2d, x, w, b, grad_out, {})
    assert_close(out, b.view(1, 4, 1, 1).expand(2, 4, 4, 4))
    assert grad_input.shape == x.shape and grad_weight.shape == w.shape
    assert_close(grad_bias, grad_out.sum((0, 2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("input_layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("channels", [4, 48], ids=["direct", "gemm"])
def test_layouts(gen, input_layout, weight_layout, channels, dtype):
    """Any strides give native's values; results come back in the memory format
    native returns for the dtype (NCHW for float64 on CUDA)."""
    base = randn(gen, 3, channels, 10, 18, dtype=dtype).cuda()
    if input_layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    w = randn(gen, 40, channels // 4, 3, 3, dtype=dtype).cuda()
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    b = randn(gen, 40, dtype=dtype).cuda()

    def conv_and_grads(conv, dtype):
        x_leaf, w_leaf, b_leaf = leaves(*[t.to(dtype) for t in (base, w, b)])
        x = x_leaf[:, :, 1:, ::2] if input_layout == "sliced" else x_leaf
        out = conv(x, w_leaf, b_leaf, padding=1, groups=4)
        grad_out = randn(torch.Generator().manual_seed(1), *out.shape, dtype=torch.float64).to("cuda", dtype)
        return (out, *torch.autograd.grad(out, (x, w_leaf, b_leaf), grad_out))

    ours = conv_and_grads(P.conv2d, dtype)
    exact = conv_and_grads(F.conv2d, torch.float64)
    for got, layout_of, want, what in zip(ours, conv_and_grads(F.conv2d, dtype), exact, NAMES):
        if dtype == torch.float64:
            assert_close(got, want, msg=lambda m: f"{what}: {m}")
        else:
            assert_relative_error(got, want, 1e-5, what)
        assert got.is_contiguous(memory_format=torch.channels_last) == layout_of.is_contiguous(
            memory_format=torch.channels_last
        ) and got.is_contiguous() == layout_of.is_contiguous(), (
            f"{what}: strides {got.stride()} vs native {layout_of.stride()}"
        )


@pytest.mark.parametrize("shapes", [((2, 3, 9, 8), (4, 3, 3, 3)), ((2, 24, 13, 12), (40, 24, 3, 3))], ids=["direct", "gemm"])
def test_non_finite_values_propagate_as_native(gen, shapes):
    x, w, b = make(gen, *shapes, torch.float64)
    x[..., -1] = float("inf")
    x.view(-1)[x.numel() // 3] = float("nan")
    x[..., 0, 0] = -float("inf")
    kwargs = {"padding": 1, "stride": 2}
    grad_out = grad_out_for(gen, x, w, b, kwargs, torch.float64)
    for got, want, what in zip(run(P.conv2d, x, w, b, grad_out, kwargs), run(F.conv2d, x, w, b, grad_out, kwargs), NAMES):
        assert_close(got, want, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_never_modified(gen, dtype):
    x, w, b = make(gen, (2, 40, 9, 9), (48, 20, 3, 3), dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_out = randn(gen, 2, 48, 9, 9, dtype=dtype).cuda()
    assert_inputs_never_modified(x, w, b, grad_out, groups=2)


def test_backward_output_mask(gen):
    x, w, _ = make(gen, (2, 24, 8, 8), (40, 24, 3, 3), torch.float64)
    grad_out = randn(gen, 2, 40, 6, 6, dtype=torch.float64).cuda()
    full = torch.ops.pyconvext.conv2d_backward(grad_out, x, w, [1, 1], [0, 0], [1, 1], 1, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True]):
        got = torch.ops.pyconvext.conv2d_backward(grad_out, x, w, [1, 1], [0, 0], [1, 1], 1, mask)
        for wanted, g, f in zip(mask, got, full):
            assert (g is not None) == wanted
            if wanted:
                assert_close(g, f)


# --- autograd checks, opcheck, torch.compile, streams, devices ----------------------------

@pytest.mark.parametrize("input_shape,weight_shape,kwargs", GRADCHECK_CASES + [((2, 12, 6, 5), (20, 12, 3, 3), {"stride": 2, "padding": 1})])
def test_gradcheck(gen, input_shape, weight_shape, kwargs):
    inputs = [t.requires_grad_() for t in make(gen, input_shape, weight_shape, torch.float64)]
    assert torch.autograd.gradcheck(lambda x, w, b: P.conv2d(x, w, b, **kwargs), inputs)
    assert torch.autograd.gradgradcheck(lambda x, w, b: P.conv2d(x, w, b, **kwargs), inputs)


def cuda_samples(gen):
    x, w, b = make(gen, (2, 4, 7, 6), (6, 2, 3, 3), torch.float32)
    x_big, w_big, b_big = make(gen, (2, 24, 9, 8), (40, 24, 3, 3), torch.float32)
    w1 = randn(gen, 5, 4, 3, 2).cuda()
    return [
        (x, w, b, [1, 1], [1, 1], [1, 1], 2),
        (x.contiguous(memory_format=torch.channels_last), w1, None, [2, 1], [0, 1], [1, 2], 1),
        (x[0], w1, b[:5], [1, 1], [1, 1], [1, 1], 1),
        (x_big, w_big, b_big, [2, 2], [1, 1], [1, 1], 1),
        (x_big.bfloat16(), w_big.bfloat16(), b_big.bfloat16(), [1, 1], [1, 1], [1, 1], 1),
    ]


@pytest.mark.parametrize("index", range(5))
def test_opcheck(gen, index):
    x, w, b, *params = cuda_samples(gen)[index]
    args = [x.requires_grad_(), w.requires_grad_(), None if b is None else b.requires_grad_(), *params]
    torch.library.opcheck(torch.ops.pyconvext.conv2d.default, args)
    out = torch.ops.pyconvext.conv2d(*args)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.pyconvext.conv2d_backward.default,
        [grad_out.requires_grad_(), x, w, *params, [True, True, True]],
    )


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        pyconvext.nn.Conv2d(3, 40, 3, padding=1),
        torch.nn.ReLU(),
        pyconvext.nn.Conv2d(40, 40, 3, stride=2, groups=40),
        pyconvext.nn.Conv2d(40, 8, 1, padding="same", bias=False),
    ).cuda()
    x = randn(gen, 2, 3, 12, 12).cuda().requires_grad_()
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.sum(), [x, *model.parameters()])
    compiled_out = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_out.sum(), [x, *model.parameters()])
    assert_close(compiled_out, eager_out)
    for got, want in zip(compiled_grads, eager_grads):
        assert_close(got, want)


@pytest.mark.parametrize("channels", [3, 48], ids=["direct", "gemm"])
def test_runs_on_the_current_stream(gen, channels):
    """On a side stream, the input is written only after a long sleep there:
    kernels launched on any other stream would read it before it is ready."""
    source, w, b = make(gen, (4, channels, 32, 32), (40, channels, 3, 3), torch.float64)
    grad_out = randn(gen, 4, 40, 32, 32, dtype=torch.float64).cuda()
    want = run(F.conv2d, source, w, b, grad_out, {"padding": 1})
    x = torch.full_like(source, float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        x.copy_(source)
        got = run(P.conv2d, x, w, b, grad_out, {"padding": 1})
    side.synchronize()
    for g, w_ in zip(got, want):
        assert_close(g, w_)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_non_default_gpu(gen):
    x, w, b = [t.to("cuda:1") for t in make(gen, (2, 24, 9, 9), (40, 24, 3, 3), torch.float32)]
    grad_out = randn(gen, 2, 40, 9, 9).to("cuda:1")
    with torch.cuda.device(0):
        for got, want in zip(run(P.conv2d, x, w, b, grad_out, {"padding": 1}), run(F.conv2d, x, w, b, grad_out, {"padding": 1})):
            assert got.device == want.device
            assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_same_errors_as_on_the_cpu(gen):
    """The argument checks are shared: CUDA raises the CPU's messages."""
    x, w, _ = make(gen, (2, 4, 8, 8), (6, 3, 3, 3), torch.float32)
    with pytest.raises(RuntimeError, match=r"^pyconvext.conv2d: given groups=1 and weight of size \[6, 3, 3, 3\]"):
        P.conv2d(x, w)
    with pytest.raises(RuntimeError, match=r"^pyconvext.conv2d: stride must be positive"):
        torch.ops.pyconvext.conv2d(x, w[:, :1].repeat(1, 4, 1, 1), None, [0, 1], [0, 0], [1, 1], 1)
    with pytest.raises(NotImplementedError, match=r"^pyconvext.conv2d: input has dtype Int"):
        P.conv2d(x.int(), w.int())
    with pytest.raises(RuntimeError, match=r"^pyconvext.conv2d: input \(on cuda:0\) and weight \(on cpu\)"):
        P.conv2d(x, w.cpu())
