"""ONNX export of converted models (pyconvext/onnx.py): with both of
torch.onnx.export's exporters, as the user calls them on a native model, the
graph holds standard ONNX nodes only (Conv, MaxPool, LSTM, ...), and
onnxruntime (CPU) gives pyconvext's outputs at a batch size other than the one
exported."""

import collections
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

import pyconvext
from test_build import ROOT
from test_convert import ARCHITECTURES
from test_export import LSTMS, STEPS, architecture, cell_model, lstm_inputs, lstm_model, with_batch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter's dependency

EXPORTERS = ("dynamo", "torchscript")


def export(model, inputs, path, exporter, batch_dims, opset=None, **options):
    """torch.onnx.export as a user calls it on a native model: named inputs
    and dynamic batch axes."""
    names = [f"input{i}" for i in range(len(inputs))]
    dynamic_axes = {name: {dim: "batch"} for name, dim in zip(names, batch_dims) if dim is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, export's notes
        torch.onnx.export(model, inputs, path, dynamo=exporter == "dynamo", input_names=names,
                          dynamic_axes=dynamic_axes, opset_version=opset, verbose=False, **options)
    graph = onnx.load(path)
    onnx.checker.check_model(graph, full_check=True)
    return graph


def op_types(graph):
    return collections.Counter(node.op_type for node in graph.graph.node)


def check_standard(graph, min_opset=pyconvext.onnx.MIN_OPSET):
    """Standard operators only: the default domain, no functions, opset >= 17."""
    assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}
    assert not graph.functions
    opsets = {entry.domain: entry.version for entry in graph.opset_import}
    assert set(opsets) <= {"", "ai.onnx"} and opsets.get("", opsets.get("ai.onnx")) >= min_opset


def run_onnx(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    return tuple(torch.from_numpy(y) for y in session.run(None, feeds))


def _outputs(model, inputs):
    with torch.no_grad():
        outputs = model(*inputs)
    return outputs if isinstance(outputs, tuple) else (outputs,)


def check_parity(model, path, inputs):
    """onnxruntime's outputs against pyconvext's, at float32's default
    tolerance (rtol 1.3e-6, atol 1e-5), its atol widened by the rounding the
    network itself carries in float32: twice the largest difference between
    pyconvext's float32 outputs and its float64 outputs of the same model (two
    float32 computations each that far from the exact result can be twice as
    far apart; ResNet-50's logits: 1.1e-5, GoogLeNet's and ResNet-18's 1e-6).
    Integer outputs (pooling indices) compare exactly."""
    got, want = run_onnx(path, inputs), _outputs(model, inputs)
    try:
        torch.testing.assert_close(got, want)
    except AssertionError:  # compute the widening only where it matters (it only widens)
        exact = _outputs(copy.deepcopy(model).double(),
                         tuple(x.double() if x.is_floating_point() else x for x in inputs))
        for g, w, e in zip(got, want, exact):
            rounding = (w.double() - e).abs().max().item() if w.is_floating_point() else 0.0
            torch.testing.assert_close(g, w, rtol=1.3e-6, atol=1e-5 + 2 * rounding)


def calls(model, inputs, types):
    """How many times modules of `types` run in a forward."""
    count = [0]
    hooks = [m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
             for m in model.modules() if isinstance(m, types)]
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return count[0]


# --- the seed architectures ---------------------------------------------------------------

# Image size per architecture: small, except where the TorchScript exporter's
# adaptive_avg_pool2d (native's translation, not ours) needs a feature map that
# is a multiple of its output size (6x6, 7x7): 224x224, as for the native model.
SIZES = {"alexnet": 224, "vgg11": 224, "zfnet": 224, "googlenet": 64, "resnet18": 64, "resnet50": 64}
HEAVY = ("alexnet", "vgg11", "zfnet", "resnet50")  # one image exported, two run


def architecture_inputs(name, batch):
    inputs = ARCHITECTURES[name][1](torch.Generator().manual_seed(0))
    if name in SIZES:
        inputs = (torch.randn(batch, 3, SIZES[name], SIZES[name], generator=torch.Generator().manual_seed(1)),)
    return with_batch(inputs, batch)


@pytest.mark.parametrize("name, exporter", [(n, e) for n in ARCHITECTURES for e in EXPORTERS])
def test_architecture_exports_standard_nodes_and_matches_onnxruntime(name, exporter, tmp_path):
    model = architecture(name)
    batch = 1 if name in HEAVY else 2
    inputs = architecture_inputs(name, batch)
    graph = export(model, inputs, tmp_path / "model.onnx", exporter, [0] * len(inputs))
    check_standard(graph)
    types = op_types(graph)
    # One Conv per convolution run, one MaxPool (values only) per pooling run.
    assert types["Conv"] == calls(model, inputs, torch.nn.Conv2d)
    assert types["MaxPool"] == calls(model, inputs, torch.nn.MaxPool2d)
    assert all(len(node.output) == 1 for node in graph.graph.node if node.op_type == "MaxPool")
    if name == "captioner":  # 2 layers x 2 directions; the LSTMCell as its subgraph
        assert types["LSTM"] == 4 and types["Sigmoid"] == 3 and types["Tanh"] == 2
    check_parity(model, tmp_path / "model.onnx", with_batch(inputs, batch + 1))


# --- LSTMs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(LSTMS))
def test_lstm_exports_to_lstm_nodes_and_matches_onnxruntime(name, exporter, gen, tmp_path):
    model = lstm_model(name)
    inputs, dims = lstm_inputs(name, 2, gen)
    graph = export(model, inputs, tmp_path / "lstm.onnx", exporter, dims)
    check_standard(graph)
    options, _ = LSTMS[name]
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    types = op_types(graph)
    if options.get("proj_size"):
        # ONNX's LSTM has no projection: each layer and direction unrolled over
        # the steps, one projection MatMul per step.
        assert types["LSTM"] == 0
        assert types["MatMul"] == layers * (1 + 2 * STEPS)
        assert types["Tanh"] == layers * 2 * STEPS
    else:
        assert types["LSTM"] == layers
    check_parity(model, tmp_path / "lstm.onnx", lstm_inputs(name, 3, gen)[0])


def check_float64(model, path, inputs):
    """onnx's reference evaluator against pyconvext in float64, at float64's
    tolerance (onnxruntime's CPU LSTM and Conv take no float64)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))
    feeds = {name: x.numpy() for name, x in zip(evaluator.input_names, inputs)}
    got = tuple(torch.from_numpy(y) for y in evaluator.run(None, feeds))
    torch.testing.assert_close(got, _outputs(model, inputs))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["state", "proj_size"])
def test_lstm_in_float64_matches_the_onnx_reference(name, exporter, gen, tmp_path):
    model = lstm_model(name, torch.float64)
    inputs, dims = lstm_inputs(name, 2, gen, torch.float64)
    export(model, inputs, tmp_path / "lstm.onnx", exporter, dims)
    check_float64(model, tmp_path / "lstm.onnx", lstm_inputs(name, 3, gen, torch.float64)[0])


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_lstm_cell_and_conv_in_float64_match_the_onnx_reference(exporter, gen, tmp_path):
    model = torch.nn.Sequential(
        pyconvext.nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        torch.nn.Flatten(1), Step(6 * 5 * 11, 5))
    model = model.double().eval()
    export(model, (torch.randn(2, 4, 9, 11, generator=gen, dtype=torch.float64),), tmp_path / "m.onnx",
           exporter, [0])
    check_float64(model, tmp_path / "m.onnx", (torch.randn(3, 4, 9, 11, generator=gen, dtype=torch.float64),))


class Step(torch.nn.Module):
    """One LSTMCell step from a zero state; returns both states."""

    def __init__(self, features, hidden):
        super().__init__()
        self.cell = pyconvext.nn.LSTMCell(features, hidden)

    def forward(self, x):
        return self.cell(x)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_lstm_exports_a_dynamic_sequence_length(exporter, gen, tmp_path):
    model = lstm_model("bidirectional")
    x = torch.randn(STEPS, 2, 5, generator=gen)
    path = tmp_path / "lstm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=exporter == "dynamo", input_names=["x"],
                          dynamic_axes={"x": {0: "steps", 1: "batch"}}, verbose=False)
    check_parity(model, path, (torch.randn(STEPS + 3, 3, 5, generator=gen),))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_loop_exports_its_subgraph_and_matches_onnxruntime(bias, exporter, gen, tmp_path):
    model = cell_model(bias)
    graph = export(model, (torch.randn(STEPS, 2, 5, generator=gen),), tmp_path / "cell.onnx", exporter, [1])
    check_standard(graph)
    types = op_types(graph)
    # Per step: two Gemm (input and state), three Sigmoid and two Tanh.
    assert (types["Gemm"], types["Sigmoid"], types["Tanh"]) == (2 * STEPS, 3 * STEPS, 2 * STEPS)
    assert types["LSTM"] == 0
    # No workspace (the Concat of i, f, g, o, tanh(c) that pyconvext's backward reads).
    assert not [node for node in graph.graph.node if node.op_type == "Concat" and len(node.input) == 5]
    check_parity(model, tmp_path / "cell.onnx", (torch.randn(STEPS, 3, 5, generator=gen),))


# --- operator options -------------------------------------------------------------------------

class Pool(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.pool = pyconvext.nn.MaxPool2d(**options)

    def forward(self, x):
        return self.pool(x)


# name: (module, input shape without the batch (None: an unbatched input), dtype)
OPTIONS = {
    "conv strided, padded, dilated, grouped": (
        lambda: pyconvext.nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        (4, 9, 11), torch.float32),
    "conv unbatched": (lambda: pyconvext.nn.Conv2d(4, 6, 3), None, torch.float32),
    "conv padding same, even kernel, no bias": (
        lambda: pyconvext.nn.Conv2d(4, 6, (4, 3), padding="same", bias=False), (4, 9, 11), torch.float32),
    "conv reflect padding": (lambda: pyconvext.nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                             (4, 9, 11), torch.float32),
    "conv channels_last": (lambda: pyconvext.nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last),
                           (4, 9, 11), torch.float32),
    "pool ceil_mode, padded": (lambda: Pool(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                               (4, 10, 11), torch.float32),
    "pool dilated, rectangular": (lambda: Pool(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
                                  (4, 10, 11), torch.float64),
    "pool unbatched": (lambda: Pool(kernel_size=2), None, torch.float32),
    "pool indices": (lambda: Pool(kernel_size=3, stride=2, padding=1, ceil_mode=True, return_indices=True),
                     (4, 10, 11), torch.float32),
    "pool indices dilated": (lambda: Pool(kernel_size=2, stride=1, dilation=2, return_indices=True),
                             (4, 10, 11), torch.float64),
    "pool indices unbatched": (lambda: Pool(kernel_size=2, return_indices=True), None, torch.float32),
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_operator_options_match_onnxruntime(name, exporter, gen, tmp_path):
    build, shape, dtype = OPTIONS[name]
    model = build().to(dtype).eval()
    if shape is None:  # an unbatched input: no batch axis to vary
        inputs, run, dims = (torch.randn(4, 9, 11, generator=gen, dtype=dtype),), None, [None]
    else:
        inputs, dims = (torch.randn(2, *shape, generator=gen, dtype=dtype),), [0]
        run = (torch.randn(3, *shape, generator=gen, dtype=dtype),)
    graph = export(model, inputs, tmp_path / "op.onnx", exporter, dims)
    check_standard(graph)
    [node] = [n for n in graph.graph.node if n.op_type in ("Conv", "MaxPool")]
    with_indices = "indices" in name
    assert len(node.output) == (2 if with_indices else 1)
    # Indices compare exactly (assert_close on integers); values at the dtype's tolerance.
    check_parity(model, tmp_path / "op.onnx", run or (torch.randn(4, 9, 11, generator=gen, dtype=dtype),))


# --- opsets, registration, errors ------------------------------------------------------------

@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("opset", [17, None])
def test_opset_17_and_the_default(opset, exporter, gen, tmp_path):
    model = architecture("mnist")
    graph = export(model, (torch.randn(2, 1, 28, 28, generator=gen),), tmp_path / "m.onnx", exporter, [0],
                   opset=opset)
    check_standard(graph)
    version = {entry.domain: entry.version for entry in graph.opset_import}[""]
    assert version == 17 if opset == 17 else version >= 18
    check_parity(model, tmp_path / "m.onnx", (torch.randn(5, 1, 28, 28, generator=gen),))


def test_the_translation_table_also_works_passed_explicitly(gen, tmp_path):
    """The documented fallback: custom_translation_table=pyconvext.onnx.TABLE."""
    model = architecture("lenet5")
    graph = export(model, (torch.randn(2, 1, 28, 28, generator=gen),), tmp_path / "m.onnx", "dynamo", [0],
                   custom_translation_table=pyconvext.onnx.TABLE)
    check_standard(graph)
    check_parity(model, tmp_path / "m.onnx", (torch.randn(3, 1, 28, 28, generator=gen),))


REGISTRATION = """
import sys, torch
{before}
import pyconvext
assert ("torch.onnx" in sys.modules) == {onnx_loaded}, "torch.onnx"
assert ("onnxscript" in sys.modules) == {onnx_loaded}, "onnxscript"
from torch.onnx._internal.torchscript_exporter import registration
from torch.onnx._internal.exporter import _registration
for op, symbolic in pyconvext.onnx.SYMBOLICS.items():
    assert registration.registry.get_function_group(op).get(17) is symbolic, op
registry = _registration.ONNXRegistry.from_torchlib()
for op, translation in pyconvext.onnx.TABLE.items():
    assert registry.get_decomps(op)[0].onnx_function is translation, op
print("registered")
"""


@pytest.mark.parametrize("onnx_loaded", [False, True], ids=["pyconvext first", "exporters first"])
def test_translations_register_when_the_exporters_load(onnx_loaded):
    """Importing pyconvext loads neither torch.onnx nor onnxscript (about 5 s
    here); each exporter gets the translations as it loads, or at pyconvext's
    import when it was loaded before."""
    before = "import torch.onnx._internal.exporter._registration" if onnx_loaded else ""
    code = REGISTRATION.format(before=before, onnx_loaded=onnx_loaded)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "registered"


def _messages(error):
    """The messages of an exception and of its causes."""
    while error is not None:
        yield str(error)
        error = error.__cause__ or error.__context__


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_projected_lstm_needs_a_static_sequence_length(exporter, gen, tmp_path):
    model = lstm_model("proj_size")
    with pytest.raises(Exception) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(STEPS, 2, 5, generator=gen),), tmp_path / "m.onnx",
                          dynamo=exporter == "dynamo", input_names=["x"],
                          dynamic_axes={"x": {0: "steps", 1: "batch"}}, verbose=False)
    assert any("its sequence length must be static" in m for m in _messages(info.value))


def test_packed_sequences_are_refused_with_a_message(gen, tmp_path):
    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(5, 7)

        def forward(self, x, lengths):
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
            return torch.nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0])[0]

    model = pyconvext.convert(Packed()).eval()
    inputs = (torch.randn(STEPS, 2, 5, generator=gen), torch.tensor([STEPS, 2]))
    with pytest.raises(Exception) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, tmp_path / "m.onnx", dynamo=False)
    assert any("an LSTM on a PackedSequence has no ONNX translation" in m for m in _messages(info.value))


def test_an_opset_below_17_is_refused_with_a_message(gen, tmp_path):
    with pytest.raises(Exception) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(architecture("mnist"), (torch.randn(2, 1, 28, 28, generator=gen),),
                          tmp_path / "m.onnx", dynamo=False, opset_version=16)
    assert any("opset 16 asked for; pyconvext's operators export to opset 17 and newer" in m
               for m in _messages(info.value))
