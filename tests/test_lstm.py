"""pyconvext.lstm_cell and nn.LSTMCell against torch.nn.LSTMCell on the CPU:
states and every gradient, batchless input, a missing state, bad input."""

import re

import pytest
import torch
from torch.testing import assert_close

import pyconvext
from pyconvext import functional as P

OPS = torch.ops.pyconvext


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def cells(gen, input_size, hidden_size, bias, dtype):
    """A native LSTMCell and ours with the same random parameters."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    native = torch.nn.LSTMCell(input_size, hidden_size, bias=bias, dtype=dtype)
    ours = pyconvext.nn.LSTMCell(input_size, hidden_size, bias=bias, dtype=dtype)
    ours.load_state_dict(native.state_dict(), strict=True)
    return native, ours


def run(cell, x, state, grads):
    """Outputs and the gradients of every input and parameter."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *state)] if state else [
        x.detach().clone().requires_grad_()]
    h, c = cell(leaves[0], tuple(leaves[1:]) if state else None)
    params = list(cell.parameters())
    got = torch.autograd.grad((h, c), leaves + params, grads)
    return (h, c), got


SIZES = [(64, 3, 5), (7, 16, 33), (1, 20, 64), (5, 9, 100)]  # (batch, input, hidden): tails, B = 1


@pytest.mark.parametrize("batch,input_size,hidden_size", SIZES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("state", ["given", "missing"])
def test_cell_matches_native(gen, batch, input_size, hidden_size, bias, dtype, state):
    native, ours = cells(gen, input_size, hidden_size, bias, dtype)
    x = randn(gen, batch, input_size, dtype=dtype)
    hx = (randn(gen, batch, hidden_size, dtype=dtype), randn(gen, batch, hidden_size, dtype=dtype))
    hx = hx if state == "given" else None
    grads = (randn(gen, batch, hidden_size, dtype=dtype), randn(gen, batch, hidden_size, dtype=dtype))
    want, want_grads = run(native, x, hx, grads)
    got, got_grads = run(ours, x, hx, grads)
    assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w)


def test_batchless_input(gen):
    native, ours = cells(gen, 6, 10, True, torch.float32)
    x, h, c = randn(gen, 6), randn(gen, 10), randn(gen, 10)
    for hx in ((h, c), None):
        want, got = native(x, hx), ours(x, hx)
        assert got[0].shape == (10,)
        assert_close(got, want)


def test_large_gate_values(gen):
    """Saturated gates (|x| up to 100) and values near 0: the vector exp and
    tanh against native's."""
    native, ours = cells(gen, 4, 40, True, torch.float32)
    x = torch.cat([randn(gen, 8, 4) * 30, randn(gen, 8, 4) * 1e-4])
    hx = (randn(gen, 16, 40) * 3, randn(gen, 16, 40) * 40)
    assert_close(ours(x, hx), native(x, hx))


def test_nan_and_inf_as_native(gen):
    """NaN and +-inf in the input and the state: NaN reaches the same outputs
    as in native's, and inf saturates the gates exactly (0 and 1, not a
    denormal)."""
    native, ours = cells(gen, 4, 40, True, torch.float32)
    x, h, c = randn(gen, 6, 4) * 30, randn(gen, 6, 40), randn(gen, 6, 40)
    x[0, 1], x[1, 2], x[2, 3] = float("nan"), float("inf"), -float("inf")
    h[3, 5], c[4, 6], c[5, 7] = float("nan"), float("inf"), -float("inf")
    want, got = native(x, (h, c)), ours(x, (h, c))
    assert got[0].isnan().any() and not got[0].isnan().all()
    assert_close(got, want, equal_nan=True)
    lstm = torch.nn.LSTM(4, 40, num_layers=2)
    ours_lstm = pyconvext.nn.LSTM(4, 40, num_layers=2)
    ours_lstm.load_state_dict(lstm.state_dict())
    seq = randn(gen, 5, 6, 4) * 30
    seq[1, 0, 1], seq[2, 1, 2], seq[3, 2, 3] = float("nan"), float("inf"), -float("inf")
    for grad_enabled in (False, True):  # lstm_layer_values, then lstm_layer
        with torch.set_grad_enabled(grad_enabled):
            want, got = lstm(seq), ours_lstm(seq)
        assert got[0].isnan().any() and not got[0].isnan().all()
        assert_close(got, want, equal_nan=True)


def test_functional_and_operator(gen):
    x, h, c = randn(gen, 3, 5), randn(gen, 3, 7), randn(gen, 3, 7)
    w_ih, w_hh, b_ih, b_hh = randn(gen, 28, 5), randn(gen, 28, 7), randn(gen, 28), randn(gen, 28)
    want = torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    assert_close(P.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh), want)
    hy, cy, workspace = OPS.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
    assert workspace.shape == (3, 5 * 7)
    i, f, g, o, tanh_c = workspace.split(7, dim=1)
    assert_close(tanh_c, torch.tanh(cy))
    assert_close(hy, o * tanh_c)


def test_gradcheck(gen):
    x = randn(gen, 3, 4, dtype=torch.float64).requires_grad_()
    h, c = (randn(gen, 3, 5, dtype=torch.float64).requires_grad_() for _ in range(2))
    weights = [randn(gen, *shape, dtype=torch.float64).requires_grad_()
               for shape in ((20, 4), (20, 5), (20,), (20,))]
    assert torch.autograd.gradcheck(lambda *args: P.lstm_cell(args[0], args[1:3], *args[3:]),
                                    (x, h, c, *weights))
    assert torch.autograd.gradcheck(lambda *args: P.lstm_cell(args[0], args[1:3], *args[3:]),
                                    (x, h, c, *weights[:2]))
    # Either bias alone, as native allows.
    assert torch.autograd.gradcheck(lambda *args: P.lstm_cell(args[0], args[1:3], *args[3:], None),
                                    (x, h, c, *weights[:3]))
    assert torch.autograd.gradcheck(lambda *args: P.lstm_cell(args[0], args[1:3], *args[3:5], None, args[5]),
                                    (x, h, c, *weights[:2], weights[3]))


def test_one_bias_as_native(gen):
    x, h, c = randn(gen, 3, 5), randn(gen, 3, 7), randn(gen, 3, 7)
    w_ih, w_hh, b = randn(gen, 28, 5), randn(gen, 28, 7), randn(gen, 28)
    for biases in ((b, None), (None, b)):
        assert_close(P.lstm_cell(x, (h, c), w_ih, w_hh, *biases), torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, *biases))


def test_opcheck(gen):
    x, h, c = randn(gen, 3, 5), randn(gen, 3, 7), randn(gen, 3, 7)
    weights = [randn(gen, 28, 5), randn(gen, 28, 7), randn(gen, 28), randn(gen, 28)]
    args = [t.requires_grad_() for t in (x, h, c, *weights)]
    torch.library.opcheck(OPS.lstm_cell.default, args)
    torch.library.opcheck(OPS.lstm_cell.default, [*args[:5], None, None])
    hy, cy, workspace = OPS.lstm_cell(*[t.detach() for t in args])
    torch.library.opcheck(OPS.lstm_cell_backward.default,
                          [torch.randn_like(hy), torch.randn_like(cy), x.detach(), h.detach(), c.detach(),
                           weights[0].detach(), weights[1].detach(), workspace, True])


def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    _, cell = cells(gen, 6, 12, True, torch.float32)
    x, hx = randn(gen, 4, 6).requires_grad_(), (randn(gen, 4, 12), randn(gen, 4, 12))
    want = cell(x, hx)
    want_grads = torch.autograd.grad(sum(t.sum() for t in want), [x, *cell.parameters()])
    compiled = torch.compile(cell, fullgraph=True)
    got = compiled(x, hx)
    got_grads = torch.autograd.grad(sum(t.sum() for t in got), [x, *cell.parameters()])
    assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w)


def test_inputs_never_modified(gen):
    args = [randn(gen, 3, 5), randn(gen, 3, 7), randn(gen, 3, 7), randn(gen, 28, 5), randn(gen, 28, 7),
            randn(gen, 28), randn(gen, 28)]
    saved = [t.clone() for t in args]
    hy, cy, workspace = OPS.lstm_cell(*args)
    grads = [torch.randn_like(hy), torch.randn_like(cy)]
    kept = [g.clone() for g in grads] + [workspace.clone()]
    OPS.lstm_cell_backward(*grads, *args[:5], workspace, True)
    for t, s in zip(args + grads + [workspace], saved + kept):
        assert torch.equal(t, s)


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# (name, arguments of functional.lstm_cell as (input, (h, c), w_ih, w_hh, b_ih, b_hh), error, message)
BAD_INPUTS = [
    ("wrong input size", (t(2, 6), (t(2, 4), t(2, 4)), t(16, 5), t(16, 4), None, None), RuntimeError,
     r"expected w_ih of size \(4 \* hidden_size, input_size\) = \[16, 6\], but got w_ih of size \[16, 5\]"),
    ("wrong h size", (t(2, 5), (t(2, 3), t(2, 4)), t(16, 5), t(16, 4), None, None), RuntimeError,
     r"expected hx of size \(batch, hidden_size\) = \[2, 4\], but got hx of size \[2, 3\]"),
    ("wrong c size", (t(2, 5), (t(2, 4), t(2, 5)), t(16, 5), t(16, 4), None, None), RuntimeError,
     r"expected cx of size \(batch, hidden_size\) = \[2, 4\], but got cx of size \[2, 5\]"),
    ("batch mismatch", (t(3, 5), (t(2, 4), t(2, 4)), t(16, 5), t(16, 4), None, None), RuntimeError,
     r"expected hx of size \(batch, hidden_size\) = \[3, 4\], but got hx of size \[2, 4\]"),
    ("w_hh not 4H x H", (t(2, 5), (t(2, 4), t(2, 4)), t(16, 5), t(12, 4), None, None), RuntimeError,
     r"expected w_hh of size \(4 \* hidden_size, hidden_size\), but got w_hh of size \[12, 4\]"),
    ("bias of wrong size", (t(2, 5), (t(2, 4), t(2, 4)), t(16, 5), t(16, 4), t(15), t(16)), RuntimeError,
     r"expected biases of size \(4 \* hidden_size\) = \[16\], but got a bias of size \[15\]"),
    ("3-D input", (t(2, 2, 5), (t(2, 4), t(2, 4)), t(16, 5), t(16, 4), None, None), RuntimeError,
     r"expected input of size \(batch, input_size\), but got input of size \[2, 2, 5\]"),
    ("dtype mismatch", (t(2, 5, dtype=torch.float64), (t(2, 4), t(2, 4)), t(16, 5), t(16, 4), None, None),
     RuntimeError, r"input \(Double\) and hx \(Float\) must have the same dtype"),
    ("integer input", (t(2, 5, dtype=torch.int32), (t(2, 4, dtype=torch.int32), t(2, 4, dtype=torch.int32)),
                       t(16, 5, dtype=torch.int32), t(16, 4, dtype=torch.int32), None, None),
     NotImplementedError, r"input has dtype Int, but only float32 and float64 are supported"),
]


@pytest.mark.parametrize("name,args,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, args, error, message):
    with pytest.raises(error, match="^pyconvext.lstm_cell: " + message):
        P.lstm_cell(*args)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch._VF.lstm_cell(*args)


def test_module_errors_as_native(gen):
    native, ours = cells(gen, 5, 4, True, torch.float32)
    for bad in ((t(2, 2, 5), None), (t(2, 5), (t(1, 2, 4), t(2, 4)))):
        with pytest.raises(ValueError) as want:
            native(*bad)
        with pytest.raises(ValueError, match=re.escape(str(want.value))):
            ours(*bad)


def test_module_state_dict_and_repr(gen):
    native, ours = cells(gen, 5, 4, False, torch.float32)
    assert isinstance(ours, torch.nn.LSTMCell)
    assert repr(ours) == repr(native)
    assert ours.state_dict().keys() == native.state_dict().keys()
    native.load_state_dict(ours.state_dict(), strict=True)


# --- nn.LSTM and lstm_layer ---------------------------------------------------------------

from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402


def lstms(gen, input_size, hidden_size, dtype=torch.float32, **options):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    native = torch.nn.LSTM(input_size, hidden_size, dtype=dtype, **options)
    ours = pyconvext.nn.LSTM(input_size, hidden_size, dtype=dtype, **options)
    ours.load_state_dict(native.state_dict(), strict=True)
    return native, ours


def lstm_run(module, x, hx):
    """The outputs and the gradients of the input, the state and every parameter,
    for a fixed random combination of the outputs."""
    packed = isinstance(x, PackedSequence)
    data = x.data if packed else x
    leaf = data.detach().clone().requires_grad_()
    state = None if hx is None else tuple(t.detach().clone().requires_grad_() for t in hx)
    arg = PackedSequence(leaf, x.batch_sizes, x.sorted_indices, x.unsorted_indices) if packed else leaf
    output, (h, c) = module(arg, state)
    out = output.data if packed else output
    gen = torch.Generator().manual_seed(5)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (out, h, c))
    inputs = [leaf, *(state or ()), *module.parameters()]
    return (out, h, c), torch.autograd.grad(loss, inputs)


def assert_lstm_matches(native, ours, x, hx):
    want, want_grads = lstm_run(native, x, hx)
    got, got_grads = lstm_run(ours, x, hx)
    for g, w in zip(got, want):
        assert_close(g, w)
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w)


LSTM_OPTIONS = [
    dict(),
    dict(num_layers=2),
    dict(bias=False, batch_first=True),
    dict(bidirectional=True),
    dict(proj_size=3),
    dict(num_layers=2, bidirectional=True, proj_size=4, batch_first=True),
    dict(num_layers=3, bias=False, bidirectional=True),
    dict(num_layers=2, dropout=0.5),  # eval mode: no dropout
]


@pytest.mark.parametrize("options", LSTM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("state", ["given", "missing"])
def test_lstm_matches_native(gen, options, dtype, state):
    native, ours = lstms(gen, 5, 7, dtype, **options)
    native.eval(), ours.eval()
    steps, batch = 6, 3
    shape = (batch, steps, 5) if options.get("batch_first") else (steps, batch, 5)
    x = randn(gen, *shape, dtype=dtype)
    directions = 2 if options.get("bidirectional") else 1
    layers = options.get("num_layers", 1) * directions
    hx = (randn(gen, layers, batch, options.get("proj_size") or 7, dtype=dtype),
          randn(gen, layers, batch, 7, dtype=dtype)) if state == "given" else None
    assert_lstm_matches(native, ours, x, hx)


@pytest.mark.parametrize("options", [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=2)])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_lstm_packed_sequences(gen, options, enforce_sorted):
    native, ours = lstms(gen, 4, 6, torch.float64, **options)
    lengths = [5, 5, 3, 1] if enforce_sorted else [3, 5, 1, 5]
    padded = randn(gen, 5, 4, 4, dtype=torch.float64)
    x = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    directions = 2 if options.get("bidirectional") else 1
    layers = options.get("num_layers", 1) * directions
    hx = (randn(gen, layers, 4, options.get("proj_size") or 6, dtype=torch.float64),
          randn(gen, layers, 4, 6, dtype=torch.float64))
    for state in (hx, None):
        assert_lstm_matches(native, ours, x, state)


# Shapes that take each path of the CPU kernel: the recurrence split among
# threads by rows (batch >= 16) or by columns, several gate groups and GEMM
# panels with tails (hidden 40, 70), GEMM depth blocks of 256 (input 300).
@pytest.mark.parametrize("batch,input_size,hidden_size", [(3, 300, 40), (19, 300, 40), (37, 20, 70)])
@pytest.mark.parametrize("options", [dict(), dict(bidirectional=True, proj_size=9)], ids=["default", "bidirectional,proj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_large_shapes(gen, batch, input_size, hidden_size, options, dtype):
    native, ours = lstms(gen, input_size, hidden_size, dtype, **options)
    x = randn(gen, 4, batch, input_size, dtype=dtype)
    directions = 2 if options.get("bidirectional") else 1
    hx = (randn(gen, directions, batch, options.get("proj_size") or hidden_size, dtype=dtype),
          randn(gen, directions, batch, hidden_size, dtype=dtype))
    assert_lstm_matches(native, ours, x, hx)


@pytest.mark.parametrize("batch", [3, 19])
def test_lstm_strided_input(gen, batch):
    """An input whose features are not adjacent in memory (every other one of
    a larger tensor), split among threads by columns and by rows."""
    native, ours = lstms(gen, 12, 40, torch.float32)
    x = randn(gen, 4, batch, 24)[..., ::2]
    assert_lstm_matches(native, ours, x, None)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_lstm_packed_sequences_large_batch(gen, enforce_sorted):
    """Rows that end at different steps, in blocks of rows that threads run apart."""
    native, ours = lstms(gen, 6, 20, torch.float64, bidirectional=True)
    lengths = [7 - i // 4 for i in range(24)]
    if not enforce_sorted:
        lengths = lengths[::-1]
    x = pack_padded_sequence(randn(gen, 7, 24, 6, dtype=torch.float64), lengths, enforce_sorted=enforce_sorted)
    assert_lstm_matches(native, ours, x, None)


@pytest.mark.parametrize("options", LSTM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("batch", [3, 19])
def test_lstm_inference_matches_native(gen, options, batch):
    """Under no_grad the layers run lstm_layer_values, which saves no activations."""
    native, ours = lstms(gen, 5, 7, torch.float64, **options)
    native.eval(), ours.eval()
    shape = (batch, 6, 5) if options.get("batch_first") else (6, batch, 5)
    x = randn(gen, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert_close(ours(x), native(x))
        packed = pack_padded_sequence(x if options.get("batch_first") else x.transpose(0, 1),
                                      [6 - i % 6 for i in range(batch)], batch_first=True, enforce_sorted=False)
        got, want = ours(packed), native(packed)
    assert_close(got[0].data, want[0].data)
    assert_close(got[1], want[1])


def test_lstm_values_operator(gen):
    """functional.lstm picks lstm_layer_values only when no gradient is needed;
    the operator refuses arguments that require grad."""
    native, ours = lstms(gen, 5, 6)
    x = randn(gen, 4, 3, 5)
    with torch.profiler.profile() as prof:
        with torch.no_grad():
            ours(x)
        ours(x)
        ours(x.requires_grad_())
    names = [e.name for e in prof.events() if e.name.startswith("pyconvext::lstm_layer")]
    assert names == ["pyconvext::lstm_layer_values", "pyconvext::lstm_layer", "pyconvext::lstm_layer"]
    args = [x, randn(gen, 3, 6), randn(gen, 3, 6), ours.weight_ih_l0, ours.weight_hh_l0, None, None, None, None, False]
    with pytest.raises(RuntimeError, match=r"^pyconvext.lstm_layer_values: an argument requires grad, but this "
                                           r"operator has no gradient; use pyconvext::lstm_layer"):
        OPS.lstm_layer_values(*args)
    with torch.no_grad():
        got = OPS.lstm_layer_values(*args)
    assert not any(t.requires_grad for t in got)
    assert_close(got, OPS.lstm_layer(*args)[:3])
    torch.library.opcheck(OPS.lstm_layer_values.default, [t.detach() if isinstance(t, torch.Tensor) else t for t in args])


def test_operators_with_empty_input_features(gen):
    """input_size 0 (which the modules refuse, the operators take): the gates
    come from the state and the biases alone."""
    x, h, c = randn(gen, 3, 2, 0), randn(gen, 2, 5), randn(gen, 2, 5)
    w_ih, w_hh, b = randn(gen, 20, 0), randn(gen, 20, 5), randn(gen, 20)
    want = torch.lstm(x, (h[None], c[None]), [w_ih, w_hh, b, b], True, 1, 0.0, False, False, False)
    for op in (OPS.lstm_layer, OPS.lstm_layer_values):
        out, hy, cy = op(x, h, c, w_ih, w_hh, b, b, None, None, False)[:3]
        assert_close((out, hy, cy), (want[0], want[1][0], want[2][0]))
    hy, cy, _ = OPS.lstm_cell(x[0], h, c, w_ih, w_hh, b, b)
    assert_close((hy, cy), torch.lstm_cell(x[0], (h, c), w_ih, w_hh, b, b))


def test_lstm_batchless_input(gen):
    native, ours = lstms(gen, 5, 6, num_layers=2, bidirectional=True)
    x = randn(gen, 7, 5)
    hx = (randn(gen, 4, 6), randn(gen, 4, 6))
    for state in (hx, None):
        want, got = native(x, state), ours(x, state)
        assert got[0].shape == (7, 12)
        assert_close(got, want)


def test_lstm_dropout_in_training(gen):
    """Dropout between layers: p = 1 drops everything (exactly native's result);
    p = 0.5 draws a new mask per call from torch's generator."""
    native, ours = lstms(gen, 5, 6, num_layers=2, dropout=1.0)
    x = randn(gen, 4, 3, 5)
    assert_close(ours(x)[0], native(x)[0])
    ours.dropout = 0.5
    torch.manual_seed(1)
    first = ours(x)[0]
    torch.manual_seed(1)
    assert torch.equal(ours(x)[0], first)
    assert not torch.equal(ours(x)[0], first)
    ours.eval()
    assert not torch.equal(ours(x)[0], first)


def test_lstm_gradcheck(gen):
    x = randn(gen, 4, 2, 3, dtype=torch.float64).requires_grad_()
    h, c = randn(gen, 2, 4, dtype=torch.float64).requires_grad_(), randn(gen, 2, 5, dtype=torch.float64).requires_grad_()
    w = [randn(gen, *s, dtype=torch.float64).requires_grad_() for s in ((20, 3), (20, 4), (20,), (20,), (4, 5))]
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a: OPS.lstm_layer(*a, None, reverse)[:3], (x, h, c, *w))
    packed = randn(gen, 6, 3, dtype=torch.float64).requires_grad_()
    sizes = torch.tensor([3, 2, 1])
    h3, c3 = randn(gen, 3, 5, dtype=torch.float64).requires_grad_(), randn(gen, 3, 5, dtype=torch.float64).requires_grad_()
    w_hh = randn(gen, 20, 5, dtype=torch.float64).requires_grad_()
    for reverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a: OPS.lstm_layer(*a, None, None, None, sizes, reverse)[:3], (packed, h3, c3, w[0], w_hh))


def test_lstm_layer_opcheck(gen):
    x, h, c = randn(gen, 4, 2, 3), randn(gen, 2, 4), randn(gen, 2, 5)
    w = [randn(gen, *s) for s in ((20, 3), (20, 4), (20,), (20,), (4, 5))]
    args = [t.requires_grad_() for t in (x, h, c, *w)]
    torch.library.opcheck(OPS.lstm_layer.default, [*args, None, True])
    torch.library.opcheck(OPS.lstm_layer.default, [randn(gen, 6, 3).requires_grad_(), randn(gen, 3, 5),
                                                   randn(gen, 3, 5), randn(gen, 20, 3), randn(gen, 20, 5),
                                                   None, None, None, torch.tensor([3, 2, 1]), False])


def test_lstm_bad_input(gen):
    native, ours = lstms(gen, 5, 6)
    for x, hx in ((randn(gen, 4, 3, 7), None), (randn(gen, 4, 3, 5), (randn(gen, 1, 2, 6), randn(gen, 1, 2, 6))),
                  (randn(gen, 4, 3, 5), (randn(gen, 1, 3, 6), randn(gen, 1, 3, 5))),
                  (randn(gen, 2, 3, 4, 5), None), (randn(gen, 4, 3, 5), (randn(gen, 3, 6), randn(gen, 3, 6)))):
        with pytest.raises((RuntimeError, ValueError)) as want:
            native(x, hx)
        with pytest.raises(want.type, match=re.escape(str(want.value))):
            ours(x, hx)
    with pytest.raises(RuntimeError, match=r"^pyconvext.lstm_layer: expected hx of size \(batch, hidden_size\) = \[3, 6\]"):
        OPS.lstm_layer(randn(gen, 4, 3, 5), randn(gen, 2, 6), randn(gen, 3, 6), randn(gen, 24, 5), randn(gen, 24, 6),
                       None, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"batch_sizes must be non-negative and non-increasing"):
        OPS.lstm_layer(randn(gen, 6, 5), randn(gen, 2, 6), randn(gen, 2, 6), randn(gen, 24, 5), randn(gen, 24, 6),
                       None, None, None, torch.tensor([2, 3, 1]), False)
    with pytest.raises(RuntimeError, match=r"^pyconvext.lstm_layer: batch_sizes \(their sum\) overflows 64-bit"):
        OPS.lstm_layer(randn(gen, 6, 5), randn(gen, 2, 6), randn(gen, 2, 6), randn(gen, 24, 5), randn(gen, 24, 6),
                       None, None, None, torch.tensor([2**63 - 1, 2**63 - 1, 3]), False)
    # An empty sequence, as native refuses it.
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
        native(randn(gen, 0, 3, 5))
    with pytest.raises(RuntimeError, match=r"^pyconvext.lstm_layer: expected a sequence of at least one step, "
                                           r"but got input of size \[0, 3, 5\]"):
        ours(randn(gen, 0, 3, 5))


def test_lstm_packed_steps_of_no_rows(gen):
    """Hand-made batch sizes may end in zeros (steps with no rows), as native
    accepts them: the same outputs as without them."""
    native, ours = lstms(gen, 5, 6)
    data = randn(gen, 5, 5)
    for sizes in ([3, 2, 0], [3, 2, 0, 0], [0], [0, 0]):
        rows = sum(sizes)
        packed = PackedSequence(data[:rows], torch.tensor(sizes))
        (out, (h, c)), (want, (want_h, want_c)) = ours(packed), native(packed)
        torch.testing.assert_close(out.data, want.data)
        torch.testing.assert_close(h, want_h)
        torch.testing.assert_close(c, want_c)


def test_lstm_empty_batch_any_steps(gen):
    """An empty batch has nothing to run, however many steps it has (2**40
    steps would otherwise loop or allocate per step)."""
    native, ours = lstms(gen, 5, 6)
    x = randn(gen, 4, 0, 5)
    for got, want in zip(ours(x), native(x)):
        torch.testing.assert_close(got, want)
    output, (h, c) = ours(torch.empty(2**40, 0, 5))
    assert output.shape == (2**40, 0, 6) and h.shape == c.shape == (1, 0, 6)


def test_lstm_module_state_dict(gen):
    native, ours = lstms(gen, 5, 6, num_layers=2, bidirectional=True, proj_size=3)
    assert isinstance(ours, torch.nn.LSTM) and repr(ours) == repr(native)
    assert ours.state_dict().keys() == native.state_dict().keys()
    native.load_state_dict(ours.state_dict(), strict=True)


def test_gradients_through_some_outputs_only(gen):
    """Outputs that take no part in the loss have no gradient (no zeros are made
    for them): h alone, c alone, the LSTM's output alone, its final state alone."""
    native, ours = cells(gen, 5, 6, True, torch.float32)
    x, hx = randn(gen, 3, 5), (randn(gen, 3, 6), randn(gen, 3, 6))
    for pick in (0, 1):
        grads = [torch.autograd.grad(m(x, hx)[pick].sum(), list(m.parameters())) for m in (native, ours)]
        for g, w in zip(grads[1], grads[0]):
            assert_close(g, w)
    native, ours = lstms(gen, 5, 6, num_layers=2)
    x = randn(gen, 4, 3, 5)
    for pick in (lambda out: out[0], lambda out: out[1][0], lambda out: out[1][1]):
        grads = [torch.autograd.grad(pick(m(x)).sum(), list(m.parameters())) for m in (native, ours)]
        for g, w in zip(grads[1], grads[0]):
            assert_close(g, w)


def test_double_backward_is_refused(gen):
    """No second-order gradients: a clear error, never silent zeros."""
    cell, layer = pyconvext.nn.LSTMCell(3, 2), pyconvext.nn.LSTM(3, 2)
    for module, x in ((cell, torch.randn(2, 3, generator=gen)), (layer, torch.randn(4, 2, 3, generator=gen))):
        x.requires_grad_()
        out = module(x)[0]
        grad, = torch.autograd.grad(out.tanh().sum(), x, create_graph=True)
        op = "lstm_cell" if module is cell else "lstm_layer"
        with pytest.raises(NotImplementedError, match=rf"^pyconvext.{op}: double backward .* is not supported$"):
            torch.autograd.grad(grad.square().sum(), list(module.parameters()))


def test_autocast_runs_in_float32(gen):
    """Our kernels take float32 and float64: under CPU autocast they run in float32."""
    torch.manual_seed(0)
    native_cell, native_layer = torch.nn.LSTMCell(4, 3), torch.nn.LSTM(4, 3)
    cell, layer = pyconvext.nn.LSTMCell(4, 3), pyconvext.nn.LSTM(4, 3)
    cell.load_state_dict(native_cell.state_dict())
    layer.load_state_dict(native_layer.state_dict())
    x = torch.randn(5, 2, 4, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = cell(x[0])
        output, _ = layer(x)
    assert h.dtype == c.dtype == output.dtype == torch.float32
    torch.testing.assert_close((h, c), native_cell(x[0]))
    torch.testing.assert_close(output, native_layer(x)[0])
