"""pyconvext.convert() / revert() on the seed architectures and on the cases
that break naive module swapping: shared modules, tied weights, hooks,
optimizers built before, subclasses, wrappers, checkpoints."""

import copy
import io
import pickle

import pytest
import torch
import torchvision

import pyconvext
from pyconvext.convert import SWAPS
from pyconvext.models import LeNet5, MNISTNet, ZFNet

NATIVE_TYPES = tuple(SWAPS)
OURS = tuple(ours for ours, _, _ in SWAPS.values())


class Captioner(torch.nn.Module):
    """An image-captioning shape: conv features as the first step of an LSTM
    over word embeddings, and an LSTMCell decoder step."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.project = torch.nn.Linear(8 * 4 * 4, 16)
        self.embed = torch.nn.Embedding(20, 16)
        self.lstm = torch.nn.LSTM(16, 12, num_layers=2, batch_first=True, bidirectional=True)
        self.cell = torch.nn.LSTMCell(24, 12)
        self.out = torch.nn.Linear(12, 20)

    def forward(self, images, words):
        features = self.project(self.pool(torch.relu(self.conv(images))).flatten(1))
        steps = torch.cat([features.unsqueeze(1), self.embed(words)], 1)
        output, _ = self.lstm(steps)
        h, c = self.cell(output[:, -1])
        return self.out(h)


# name: (build the native model, inputs)
ARCHITECTURES = {
    "alexnet": (lambda: torchvision.models.alexnet(num_classes=10), lambda g: (torch.randn(2, 3, 64, 64, generator=g),)),
    "vgg11": (lambda: torchvision.models.vgg11(num_classes=10), lambda g: (torch.randn(2, 3, 32, 32, generator=g),)),
    "googlenet": (lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True),
                  lambda g: (torch.randn(2, 3, 64, 64, generator=g),)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), lambda g: (torch.randn(2, 3, 64, 64, generator=g),)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), lambda g: (torch.randn(2, 3, 64, 64, generator=g),)),
    "mnist": (lambda: MNISTNet(native=True), lambda g: (torch.randn(4, 1, 28, 28, generator=g),)),
    "lenet5": (lambda: LeNet5(native=True), lambda g: (torch.randn(4, 1, 28, 28, generator=g),)),
    "zfnet": (lambda: ZFNet(num_classes=10, native=True), lambda g: (torch.randn(2, 3, 112, 112, generator=g),)),
    "captioner": (Captioner, lambda g: (torch.randn(3, 3, 8, 8, generator=g), torch.randint(0, 20, (3, 5), generator=g))),
}


def _dropout_off(model):
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return model


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_matches_native(name, gen):
    build, make_inputs = ARCHITECTURES[name]
    torch.manual_seed(0)
    native = _dropout_off(build()).double()
    ours, report = pyconvext.convert(native, inplace=False, return_report=True)
    inputs = [t.double() if t.is_floating_point() else t for t in make_inputs(gen)]

    assert not [m for m in ours.modules() if type(m) in NATIVE_TYPES]
    assert sum(type(m) in OURS for m in ours.modules()) == len(report) > 0
    assert all(e.action == "converted" for e in report)
    assert [type(m) for m in native.modules() if type(m) in OURS] == []  # the original is untouched
    assert list(ours.state_dict()) == list(native.state_dict())

    native.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(*inputs), native(*inputs))
    native.train(), ours.train()  # batch statistics in BatchNorm; dropout modules are off
    grads = []
    for model in (native, ours):
        torch.manual_seed(1)  # the same masks for functional dropout (MNISTNet's)
        leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
        loss = model(*leaves).square().mean()
        params = list(model.parameters())
        differentiable = [t for t in leaves if t.requires_grad]
        grads.append((loss, torch.autograd.grad(loss, params + differentiable)))
    torch.testing.assert_close(grads[1], grads[0])


def test_optimizer_built_before_keeps_working(gen):
    torch.manual_seed(0)
    model = LeNet5(native=True)
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    assert pyconvext.convert(model) is model
    assert all(a is b for a, b in zip(model.parameters(), params))
    x = torch.randn(8, 1, 28, 28, generator=gen)
    for net, opt in ((model, optimizer), (reference, reference_optimizer)):
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert not torch.equal(params[0], LeNet5(native=True).c1.weight)


def test_shared_modules_tied_weights_hooks_attributes_and_mode(gen):
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), conv, torch.nn.Conv2d(2, 2, 3, padding=1))
    model[3].weight = conv.weight  # tied
    conv.note = "kept"
    calls = []
    conv.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    conv.register_forward_hook(lambda m, args, out: calls.append("post"))
    model.eval()
    x = torch.randn(1, 2, 5, 5, generator=gen)
    expected = model(x)
    calls.clear()

    converted, report = pyconvext.convert(model, return_report=True)
    assert [e.name for e in report] == ["0", "3"]  # the shared module once
    assert model[0] is model[2] is conv and type(conv) is pyconvext.nn.Conv2d
    assert model[3].weight is conv.weight
    assert conv.note == "kept" and not model.training and not conv.training
    torch.testing.assert_close(model(x), expected)
    assert calls == ["pre", "post", "pre", "post"]


class NamedConv(torch.nn.Conv2d):
    """A subclass that only adds a method: converted."""

    def describe(self):
        return f"{self.in_channels}->{self.out_channels}"


class ScaledConv(torch.nn.Conv2d):
    """A subclass with its own forward: left native."""

    def forward(self, input):
        return 2 * super().forward(input)


def test_subclasses(gen):
    model = torch.nn.Sequential(NamedConv(1, 2, 3), ScaledConv(2, 2, 1))
    x = torch.randn(1, 1, 6, 6, generator=gen)
    expected = model(x)
    _, report = pyconvext.convert(model, return_report=True)
    assert isinstance(model[0], NamedConv) and isinstance(model[0], pyconvext.nn.Conv2d)
    assert model[0].describe() == "1->2" and type(model[0]).__name__ == "NamedConv"
    assert type(model[1]) is ScaledConv
    assert [(e.name, e.action, e.reason) for e in report] == [
        ("0", "converted", ""), ("1", "left", "ScaledConv overrides forward")]
    torch.testing.assert_close(model(x), expected)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), _save_load(model)):
        assert type(copied[0]) is type(model[0]) and copied[0].describe() == "1->2"
        torch.testing.assert_close(copied(x), expected)
    pyconvext.revert(model)
    assert type(model[0]) is NamedConv


def test_unsupported_dtypes_are_left_with_the_reason():
    model = torch.nn.ModuleDict({
        "complex": torch.nn.Conv2d(1, 1, 3, dtype=torch.complex64),
        "half_lstm": torch.nn.LSTM(4, 4, dtype=torch.float16),
        "cell": torch.nn.LSTMCell(4, 4),
        "meta": torch.nn.Conv2d(1, 1, 3, device="meta"),
    })
    _, report = pyconvext.convert(model, return_report=True)
    assert [(e.name, e.action, e.reason) for e in report] == [
        ("complex", "left", "dtype torch.complex64 is not supported by pyconvext.conv2d"),
        ("half_lstm", "left", "dtype torch.float16 is not supported by pyconvext.lstm_layer"),
        ("cell", "converted", ""),
        ("meta", "converted", ""),
    ]
    assert type(model["complex"]) is torch.nn.Conv2d and type(model["meta"]) is pyconvext.nn.Conv2d
    assert model["meta"](torch.empty(2, 1, 5, 5, device="meta")).shape == (2, 1, 3, 3)
    text = str(report)
    assert "complex    Conv2d                   left: dtype torch.complex64" in text
    assert text.endswith("2 left, 2 converted")


def test_include_and_exclude():
    def fresh():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.MaxPool2d(2),
                                   torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1)), torch.nn.LSTMCell(3, 3))

    def kinds(model):
        return [type(m).__module__.split(".")[0] for m in (model[0], model[1], model[2][0], model[3])]

    assert kinds(pyconvext.convert(fresh(), include=[torch.nn.Conv2d])) == ["pyconvext", "torch", "pyconvext", "torch"]
    assert kinds(pyconvext.convert(fresh(), exclude=["2.*", torch.nn.LSTMCell])) == ["pyconvext", "pyconvext", "torch", "torch"]
    assert kinds(pyconvext.convert(fresh(), include=["[01]"], exclude=[torch.nn.MaxPool2d])) == ["pyconvext", "torch", "torch", "torch"]
    assert kinds(pyconvext.revert(pyconvext.convert(fresh()), include=[torch.nn.MaxPool2d])) == ["pyconvext", "torch", "pyconvext", "pyconvext"]


def test_include_and_exclude_take_one_pattern_and_every_name_of_a_shared_module():
    shared = torch.nn.Conv2d(1, 1, 1)
    model = torch.nn.ModuleDict({"encoder": torch.nn.Sequential(shared), "frozen": torch.nn.Sequential(shared),
                                 "head": torch.nn.Conv2d(1, 1, 1)})
    assert type(pyconvext.convert(copy.deepcopy(model), include="head")["encoder"][0]) is torch.nn.Conv2d
    converted = pyconvext.convert(copy.deepcopy(model), exclude="frozen.*")
    assert type(converted["encoder"][0]) is torch.nn.Conv2d and type(converted["head"]) is pyconvext.nn.Conv2d
    converted, report = pyconvext.convert(copy.deepcopy(model), include=torch.nn.Conv2d, return_report=True)
    assert [e.name for e in report] == ["encoder.0", "head"]
    converted = pyconvext.convert(copy.deepcopy(model), include=["frozen.0"])
    assert type(converted["frozen"][0]) is pyconvext.nn.Conv2d and type(converted["head"]) is torch.nn.Conv2d


def test_parametrized_and_lazy_modules_are_left(gen):
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    conv = torch.nn.Conv2d(1, 1, 1, bias=False)
    parametrize.register_parametrization(conv, "weight", Double())
    model = torch.nn.Sequential(conv, torch.nn.LazyConv2d(2, 1))
    _, report = pyconvext.convert(model, return_report=True)
    assert [(e.name, e.action, e.reason) for e in report] == [
        ("0", "left", "it has parametrizations (convert before registering them)"),
        ("1", "left", "it is a lazy module (convert after its first call)")]
    model(torch.randn(1, 1, 3, 3, generator=gen))  # the lazy module initializes itself
    weight = conv.weight.clone()
    parametrize.remove_parametrizations(conv, "weight")
    torch.testing.assert_close(conv.weight, weight)
    _, report = pyconvext.convert(model, return_report=True)
    assert [e.action for e in report] == ["converted", "converted"]


def test_revert_restores_native_types(gen):
    model = MNISTNet()  # built on pyconvext's modules
    x = torch.randn(2, 1, 28, 28, generator=gen)
    model.eval()
    expected = model(x)
    reverted, report = pyconvext.revert(model, inplace=False, return_report=True)
    assert [type(m) for m in (reverted.conv1, reverted.conv2, reverted.pool)] == [
        torch.nn.Conv2d, torch.nn.Conv2d, torch.nn.MaxPool2d]
    assert type(model.conv1) is pyconvext.nn.Conv2d  # not in place
    assert [e.action for e in report] == ["reverted"] * 3
    torch.testing.assert_close(reverted(x), expected)
    assert str(pyconvext.convert(reverted, return_report=True)[1]).endswith("3 converted")


def _save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_checkpoints(gen):
    torch.manual_seed(0)
    native = torchvision.models.resnet18(num_classes=10).eval()
    ours = pyconvext.convert(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64, generator=gen)
    ours.load_state_dict(native.state_dict(), strict=True)  # native into converted
    expected = native(x)
    torch.testing.assert_close(ours(x), expected)
    back = torchvision.models.resnet18(num_classes=10).eval()
    back.load_state_dict(ours.state_dict(), strict=True)  # and back
    torch.testing.assert_close(back(x), expected)
    for copied in (_save_load(ours), copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(copied.conv1) is pyconvext.nn.Conv2d and type(copied.maxpool) is pyconvext.nn.MaxPool2d
        torch.testing.assert_close(copied(x), expected)


def test_data_parallel_is_converted_through(gen):
    model = torch.nn.DataParallel(LeNet5(native=True))
    x = torch.randn(2, 1, 28, 28, generator=gen)
    expected = model(x)
    assert pyconvext.convert(model) is model
    assert type(model.module.c1) is pyconvext.nn.Conv2d
    torch.testing.assert_close(model(x), expected)


def test_compiled_models_are_refused():
    model = LeNet5(native=True)
    with pytest.raises(TypeError, match=r"^pyconvext.convert: the model is wrapped by torch.compile; "
                                        r"convert the model before compiling it: torch.compile\(pyconvext.convert\(model\)\)$"):
        pyconvext.convert(torch.compile(model))
    outer = torch.nn.Sequential(torch.compile(model))
    with pytest.raises(TypeError, match=r"^pyconvext.revert: the model \(at '0'\) is wrapped by torch.compile"):
        pyconvext.revert(outer)
    assert type(model.c1) is torch.nn.Conv2d


def test_compile_after_convert(gen):
    model = pyconvext.convert(LeNet5(native=True))
    x = torch.randn(2, 1, 28, 28, generator=gen)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_not_a_module():
    with pytest.raises(TypeError, match="^pyconvext.convert: expected a torch.nn.Module, got int$"):
        pyconvext.convert(3)
    with pytest.raises(TypeError, match="^pyconvext.revert: expected a torch.nn.Module, got dict$"):
        pyconvext.revert({})
