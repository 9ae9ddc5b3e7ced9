"""torch.export of converted models: every operator and the seed architectures
export with a dynamic batch, torch.export.save / load round-trips, and the
loaded program runs on pyconvext's kernels."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyconvext
from test_convert import ARCHITECTURES


class Sequence(torch.nn.Module):
    """An nn.LSTM returning its output and both final states; with_state takes
    (h0, c0) as inputs too."""

    def __init__(self, with_state=False, **options):
        super().__init__()
        self.lstm = torch.nn.LSTM(5, 7, **options)
        self.with_state = with_state

    def forward(self, x, h0=None, c0=None):
        output, (h, c) = self.lstm(x, (h0, c0) if self.with_state else None)
        return output, h, c


class CellLoop(torch.nn.Module):
    """An nn.LSTMCell stepped over a (steps, batch, features) input."""

    def __init__(self, bias=True):
        super().__init__()
        self.cell = torch.nn.LSTMCell(5, 7, bias=bias)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], 7)
        outputs = []
        for step in x:
            h, c = self.cell(step, (h, c))
            outputs.append(h)
        return torch.stack(outputs), c


# name: (nn.LSTM options, with (h0, c0) inputs)
LSTMS = {
    "layers": (dict(num_layers=2), False),
    "bidirectional": (dict(bidirectional=True), False),
    "batch_first": (dict(batch_first=True, num_layers=2), False),
    "proj_size": (dict(proj_size=3, num_layers=2, bidirectional=True), False),
    "no_bias": (dict(bias=False, bidirectional=True), False),
    "state": (dict(num_layers=2, bidirectional=True, batch_first=True), True),
}
STEPS = 4


def lstm_model(name, dtype=torch.float32):
    options, with_state = LSTMS[name]
    torch.manual_seed(0)
    return pyconvext.convert(Sequence(with_state, **options)).to(dtype).eval()


def lstm_inputs(name, batch, gen, dtype=torch.float32, steps=STEPS):
    """The inputs of lstm_model(name) and the batch dimension of each."""
    options, with_state = LSTMS[name]
    batch_dim = 0 if options.get("batch_first") else 1
    shape = [steps, steps, 5]
    shape[batch_dim] = batch
    inputs = [torch.randn(*shape, generator=gen, dtype=dtype)]
    dims = [batch_dim]
    if with_state:
        layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
        inputs += [torch.randn(layers, batch, 7, generator=gen, dtype=dtype) for _ in range(2)]
        dims += [1, 1]
    return tuple(inputs), dims


def cell_model(bias=True):
    torch.manual_seed(0)
    return pyconvext.convert(CellLoop(bias)).eval()


def architecture(name):
    """A seed architecture, converted, in eval mode."""
    torch.manual_seed(0)
    return pyconvext.convert(ARCHITECTURES[name][0]()).eval()


def with_batch(inputs, batch):
    """The inputs again at another batch size (random, of the same dtypes)."""
    gen = torch.Generator().manual_seed(batch)
    out = []
    for x in inputs:
        shape = (batch, *x.shape[1:])
        if x.dtype.is_floating_point:
            out.append(torch.randn(*shape, generator=gen, dtype=x.dtype))
        else:
            out.append(torch.randint(0, int(x.max()) + 1, shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def our_ops(graph):
    """pyconvext operator name: how many nodes call it."""
    return collections.Counter(node.target.name() for node in graph.nodes
                               if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                               and node.target.namespace == "pyconvext")


class DispatchLog(TorchDispatchMode):
    """The operators dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.name()] += 1
        return func(*args, **(kwargs or {}))


def export_round_trip(model, inputs, batch_dims, tmp_path):
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple({dim: batch} for dim in batch_dims)
    exported = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
    path = tmp_path / "model.pt2"
    torch.export.save(exported, path)
    return exported, torch.export.load(path)


def check_program(model, loaded, inputs, expected_ops):
    """The loaded program holds (and dispatches) our operators, and gives the
    model's outputs on inputs of a batch it was not exported with."""
    assert dict(our_ops(loaded.graph)) == expected_ops
    with DispatchLog() as log:
        got = loaded.module()(*inputs)
    assert {op: n for op, n in log.ops.items() if op.startswith("pyconvext::")} == expected_ops
    with torch.no_grad():
        want = model(*inputs)
    # The same kernels on the same inputs: the same numbers.
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# Our operators in each architecture's program (exported with gradients on, as
# torch.export does by default: max_pool2d is the one that saves indices).
ARCHITECTURE_OPS = {
    "alexnet": {"pyconvext::conv2d": 5, "pyconvext::max_pool2d": 3},
    "vgg11": {"pyconvext::conv2d": 8, "pyconvext::max_pool2d": 5},
    "googlenet": {"pyconvext::conv2d": 57, "pyconvext::max_pool2d": 13},
    "resnet18": {"pyconvext::conv2d": 20, "pyconvext::max_pool2d": 1},
    "resnet50": {"pyconvext::conv2d": 53, "pyconvext::max_pool2d": 1},
    "mnist": {"pyconvext::conv2d": 2, "pyconvext::max_pool2d": 2},
    "lenet5": {"pyconvext::conv2d": 2, "pyconvext::max_pool2d": 2},
    "zfnet": {"pyconvext::conv2d": 5, "pyconvext::max_pool2d": 3},
    "captioner": {"pyconvext::conv2d": 1, "pyconvext::max_pool2d": 1, "pyconvext::lstm_layer": 4,
                  "pyconvext::lstm_cell": 1},
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_exports_with_a_dynamic_batch_and_round_trips(name, tmp_path):
    model = architecture(name)
    inputs = ARCHITECTURES[name][1](torch.Generator().manual_seed(0))
    exported, loaded = export_round_trip(model, inputs, [0] * len(inputs), tmp_path)
    assert dict(our_ops(exported.graph)) == ARCHITECTURE_OPS[name]
    check_program(model, loaded, with_batch(inputs, inputs[0].shape[0] + 1), ARCHITECTURE_OPS[name])


def _lstm_layers(name):
    options, _ = LSTMS[name]
    return options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)


@pytest.mark.parametrize("name", list(LSTMS))
def test_lstm_exports_with_a_dynamic_batch_and_round_trips(name, gen, tmp_path):
    model = lstm_model(name)
    inputs, dims = lstm_inputs(name, 2, gen)
    _, loaded = export_round_trip(model, inputs, dims, tmp_path)
    check_program(model, loaded, lstm_inputs(name, 3, gen)[0], {"pyconvext::lstm_layer": _lstm_layers(name)})


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_loop_exports_with_a_dynamic_batch_and_round_trips(bias, gen, tmp_path):
    model = cell_model(bias)
    _, loaded = export_round_trip(model, (torch.randn(STEPS, 2, 5, generator=gen),), [1], tmp_path)
    check_program(model, loaded, (torch.randn(STEPS, 3, 5, generator=gen),), {"pyconvext::lstm_cell": STEPS})


def test_export_without_gradients_keeps_the_values_only_operators(gen, tmp_path):
    """Under no_grad the model runs the forwards that save nothing for a
    backward, and its program does too."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.MaxPool2d(2), torch.nn.Flatten(2),
                                torch.nn.LSTM(9, 5))
    model = pyconvext.convert(model).eval()
    x = torch.randn(3, 2, 8, 8, generator=gen)
    with torch.no_grad():
        _, loaded = export_round_trip(model, (x,), [0], tmp_path)
    with torch.no_grad():
        check_program(model, loaded, (torch.randn(5, 2, 8, 8, generator=gen),),
                      {"pyconvext::conv2d": 1, "pyconvext::max_pool2d_values": 1,
                       "pyconvext::lstm_layer_values": 1})
