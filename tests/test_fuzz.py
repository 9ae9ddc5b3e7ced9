"""Differential fuzzing against native PyTorch: random shapes and options, and
hostile integers (0, negative, 2**31, 2**62, 2**63 - 1) for every argument of
conv2d, max_pool2d and the LSTM, forward and gradients.

Each case runs twice in tests/fuzz_runner.py, ours and native each in a
forked child with a timeout, so a crash or a hang is seen as such and
charged to the side that had it. Ours may never crash or hang where native
answers; where both answer, outputs and gradients agree at the dtype's
default tolerance (indices exactly); where native raises, we raise an
exception of native's class (or a subclass); where native crashes or hangs
(it has cases of its own), the case is recorded as native's and not compared.

By default a short seeded slice runs (CI); `pytest -m fuzz --fuzz-minutes N`
fuzzes for N minutes with fresh seeds, and `--fuzz-log FILE` appends every
case and both outcomes as JSON lines.
"""

import builtins
import itertools
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.fuzz

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_runner.py")
TIMEOUT_S = 20
HOSTILE = [0, -1, -(2**31), 2**31, 2**62, 2**63 - 1]
# The CI slice: examples per operator (about 60 s in all on 2 cores).
SLICE_EXAMPLES = {"conv2d": 70, "max_pool2d": 70, "max_pool2d_backward": 10, "lstm": 40, "lstm_cell": 15}


class Runner:
    """The runner process: one JSON case in, one report per side out."""

    def __init__(self):
        self.process = None

    def start(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen([sys.executable, RUNNER, str(TIMEOUT_S)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)

    def run(self, case):
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        reports = {}
        for _ in range(2):
            line = self.process.stdout.readline()
            assert line, f"the fuzz runner itself died on {case}"
            report = json.loads(line)
            reports[report["side"]] = report
        return reports["ours"], reports["native"]

    def stop(self):
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def log(request):
    path = request.config.getoption("--fuzz-log")
    f = open(path, "a") if path else None
    yield (lambda record: f.write(json.dumps(record) + "\n") and f.flush()) if f else (lambda record: None)
    if f:
        f.close()


def exception_class(name):
    return getattr(builtins, name, None) or getattr(torch, name, None) or Exception


def native_quirk(case, ours, native):
    """Where native answers without checking an argument, and we refuse it
    (the README lists these under the differences from native): the quirk's
    name, else None."""
    if ours["status"] != "error" or native["status"] != "ok":
        return None
    if case["op"] == "conv2d" and 0 in case["input"][:-2] and min(as_pair(case["dilation"])) < 1:
        return "native skips the dilation check on an empty batch"
    if "overflows 64-bit integers" in ours["message"]:
        return "native's size arithmetic wraps around"
    if "would have more elements than 64-bit integers count" in ours["message"]:
        return "native returns an empty output whose strides overflow"
    if case["op"] == "lstm" and ("batch_sizes add up to" in ours["message"]
                                 or "batch_sizes must be non-negative and non-increasing" in ours["message"]):
        return "native's LSTM ignores packed rows its batch sizes do not account for"
    return None


def compare(case, ours, native):
    """Fails on a defect of ours; returns the outcome's name."""
    quirk = native_quirk(case, ours, native)
    if quirk:
        return quirk
    if case["op"] == "max_pool2d_backward" and case["shift"] != 0 and ours["status"] == "ok":
        # Every index lies far outside its plane: native's CPU kernel writes
        # those gradients somewhere (or corrupts the heap); ours adds nothing.
        (grad,) = torch.load(ours["path"])
        assert not grad.any(), f"indices outside the plane gave a gradient: {case}"
        return "indices outside the plane ignored"
    if ours["status"] in ("crash", "hang") and native["status"] not in ("crash", "hang"):
        pytest.fail(f"pyconvext {ours['status']}ed ({ours['message']}) where native gave "
                    f"{native.get('type', 'a result')}: {case}")
    if native["status"] in ("crash", "hang"):
        return f"native {native['status']}"  # native's own defect, not compared
    if native["status"] == "error":
        assert ours["status"] == "error", (
            f"native raised {native['type']}: {native['message'][:300]}, but pyconvext returned a result: {case}")
        assert issubclass(exception_class(ours["type"]), exception_class(native["type"])), (
            f"pyconvext raised {ours['type']} ({ours['message'][:300]}) where native raises "
            f"{native['type']} ({native['message'][:300]}): {case}")
        return "both raised"
    assert ours["status"] == "ok", (
        f"pyconvext raised {ours['type']}: {ours['message'][:500]}, where native returned a result: {case}")
    mine, theirs = torch.load(ours["path"]), torch.load(native["path"])
    for path in (ours["path"], native["path"]):
        os.remove(path)
    assert len(mine) == len(theirs), case
    for k, (a, b) in enumerate(zip(mine, theirs)):
        if b is None:
            assert a is None or not a.any(), f"result {k}: native has no gradient, ours is not zero: {case}"
            continue
        assert a is not None, f"result {k}: native has a gradient, ours has none: {case}"
        torch.testing.assert_close(a, b, msg=lambda m: f"result {k} of {case}: {m}")
    return "both answered"


# --- strategies ----------------------------------------------------------------

def hostile_or(small):
    """Mostly a small valid value, one time in eight a hostile integer."""
    return st.integers(0, 7).flatmap(lambda pick: st.sampled_from(HOSTILE) if pick == 0 else small)


def pair_of(values):
    return st.one_of(values, st.lists(values, min_size=2, max_size=2))


def as_pair(value):
    return value if isinstance(value, list) else [value, value]


def worth_running(out_sizes, element_work):
    """Whether a case is quick for both sides: an output that allocates
    and computes in well under a second, or one too large for any allocator
    (which both must refuse at once). In between, both would just grind."""
    elements = 1
    for size in out_sizes:
        elements *= max(size, 0)
    return elements * element_work <= 2**22 or elements >= 2**40


@st.composite
def conv2d_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    batch = draw(st.sampled_from([0, 1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    size = [draw(st.integers(1, 9)), draw(st.integers(1, 9))]
    stride = draw(pair_of(hostile_or(st.integers(1, 3))))
    padding = draw(st.one_of(pair_of(hostile_or(st.integers(0, 3))), st.sampled_from(["same", "valid"])))
    dilation = draw(pair_of(hostile_or(st.integers(1, 3))))
    if padding == "same":
        stride = 1
    batched = draw(st.booleans()) or batch != 1
    case = {"op": "conv2d", "input": ([batch] if batched else []) + [in_channels] + size,
            "weight": [out_channels, in_channels // groups] + kernel, "bias": draw(st.booleans()),
            "stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
            "dtype": draw(st.sampled_from(["float32", "float64"])),
            "channels_last": draw(st.booleans()), "grad": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**31 - 1))}
    if isinstance(padding, str):
        return case
    s, p, d = as_pair(stride), as_pair(padding), as_pair(dilation)
    if min(s + d) < 1 or min(p) < 0:
        return case  # refused before any work
    out = [(size[i] + 2 * p[i] - d[i] * (kernel[i] - 1) - 1) // s[i] + 1 for i in range(2)]
    taps = in_channels // groups * kernel[0] * kernel[1] * (3 if case["grad"] else 1)
    if min(out) > 0:
        assume(worth_running([batch, out_channels, *out], taps))
    return case


@st.composite
def max_pool2d_cases(draw):
    kernel = draw(pair_of(hostile_or(st.integers(1, 4))))
    k = as_pair(kernel)
    padding = draw(pair_of(hostile_or(st.integers(0, max(0, min(k) // 2)))))
    stride = draw(st.one_of(st.none(), pair_of(hostile_or(st.integers(1, 3))),
                            st.sampled_from([2**31 - 1])))
    batch = draw(st.sampled_from([0, 1, 2]))
    batched = draw(st.booleans()) or batch != 1
    return {"op": "max_pool2d",
            "input": ([batch] if batched else []) + [draw(st.integers(1, 3)), draw(st.integers(1, 9)),
                                                     draw(st.integers(1, 9))],
            "kernel_size": kernel, "stride": stride, "padding": padding,
            "dilation": draw(pair_of(hostile_or(st.integers(1, 3)))), "ceil_mode": draw(st.booleans()),
            "return_indices": draw(st.booleans()), "grad": draw(st.booleans()),
            "dtype": draw(st.sampled_from(["float32", "float64", "bfloat16"])),
            "channels_last": draw(st.booleans()), "seed": draw(st.integers(0, 2**31 - 1))}


@st.composite
def max_pool2d_backward_cases(draw):
    """Valid windows, and indices shifted off their positions (out of the plane too)."""
    kernel = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    return {"op": "max_pool2d_backward",
            "input": [draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(3, 8)),
                      draw(st.integers(3, 8))],
            "kernel_size": kernel, "stride": [draw(st.integers(1, 3)), draw(st.integers(1, 3))],
            "padding": [draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2))],
            "dilation": [1, 1], "ceil_mode": draw(st.booleans()),
            # Native's CPU kernel writes into the next plane, or past the
            # tensor (corrupting the heap), for indices a little outside their
            # plane: indices in place, or all far outside.
            "shift": draw(st.sampled_from([0, 2**20, -(2**20), 2**62, -(2**62)])),
            "dtype": draw(st.sampled_from(["float32", "float64"])), "seed": draw(st.integers(0, 2**31 - 1))}


@st.composite
def lstm_cases(draw):
    hidden = draw(st.integers(1, 4))
    proj = draw(st.one_of(st.integers(0, hidden - 1), st.sampled_from([hidden, -1, 2**62])))
    steps, batch, input_size = draw(st.integers(0, 4)), draw(st.integers(0, 3)), draw(st.integers(1, 4))
    batch_first = draw(st.booleans())
    case = {"op": "lstm", "input_size": input_size, "hidden_size": hidden,
            "num_layers": draw(st.integers(1, 2)), "bias": draw(st.booleans()), "batch_first": batch_first,
            "bidirectional": draw(st.booleans()), "proj_size": proj,
            "dtype": draw(st.sampled_from(["float32", "float64"])), "grad": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**31 - 1))}
    kind = draw(st.sampled_from(["dense", "dense", "batchless", "packed", "hand-made packed"]))
    if kind == "dense":
        case["input"] = [batch, steps, input_size] if batch_first else [steps, batch, input_size]
    elif kind == "batchless":
        case["input"] = [steps, input_size]
    else:
        if kind == "packed":
            lengths = sorted(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)), reverse=True)
            sizes = [sum(1 for n in lengths if n > t) for t in range(lengths[0])]
        else:  # batch sizes that may not add up, increase, or hold hostile values
            sizes = draw(st.lists(hostile_or(st.integers(1, 3)), min_size=0, max_size=4))
        rows = sum(sizes) if draw(st.booleans()) else draw(st.integers(0, 6))
        case["input"] = [max(0, min(rows, 12)), input_size]
        case["batch_sizes"] = sizes
    return case


@st.composite
def lstm_cell_cases(draw):
    input_size = draw(st.integers(1, 4))
    batch = draw(st.sampled_from([None, 0, 1, 3]))
    return {"op": "lstm_cell", "input_size": input_size, "hidden_size": draw(st.integers(1, 4)),
            "bias": draw(st.booleans()),
            "input": [input_size] if batch is None else [batch, input_size],
            "dtype": draw(st.sampled_from(["float32", "float64"])), "grad": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**31 - 1))}


# Calls that killed the process by SIGFPE, hung, or asked for terabytes
# before csrc/common/sizes.h; each must now give native's answer.
def _conv(stride, **kwargs):
    return {"op": "conv2d", "input": [1, 2, 9, 3], "weight": [4, 2, 1, 1], "bias": False, "stride": stride,
            "padding": 0, "dilation": 1, "groups": 1, "dtype": "float32", "seed": 0, **kwargs}


HOSTILE_CALLS = {
    "max_pool2d stride 2**62": {"op": "max_pool2d", "input": [1, 1, 5, 5], "kernel_size": 2, "stride": 2**62,
                                "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False,
                                "dtype": "float32", "seed": 0},
    "max_pool2d stride 2**31-1": {"op": "max_pool2d", "input": [1, 1, 5, 5], "kernel_size": 2,
                                  "stride": 2**31 - 1, "padding": 1, "dilation": 1, "ceil_mode": True,
                                  "return_indices": True, "grad": True, "dtype": "float32", "seed": 0},
    "conv2d stride [2**62, 1]": _conv([2**62, 1]),
    "conv2d stride [1, 2**63-1]": _conv([1, 2**63 - 1], grad=True),
    "conv2d stride [1, 2**31]": _conv([1, 2**31]),
    "conv2d stride [3, 2**40]": _conv([3, 2**40], grad=True),
    "conv2d stride [1, 2**62]": _conv([1, 2**62]),
    "conv2d padding 2**61 stride 2**62": _conv([2**62, 1], padding=[2**61, 0], weight=[4, 2, 3, 3], grad=True),
    "conv2d padding and stride 2**20": _conv([2**20, 2**20], padding=2**20, weight=[4, 2, 3, 3], grad=True),
    "lstm batch_sizes that wrap around": {
        "op": "lstm", "input": [5, 3], "input_size": 3, "hidden_size": 4, "num_layers": 1, "bias": True,
        "batch_first": False, "bidirectional": False, "proj_size": 0, "dtype": "float32", "seed": 0,
        "batch_sizes": [2**63 - 1, 2**63 - 1, 3]},
}


@pytest.mark.parametrize("name", list(HOSTILE_CALLS))
def test_hostile_call_as_native(name, runner):
    ours, native = runner.run(HOSTILE_CALLS[name])
    assert ours["status"] in ("ok", "error") and native["status"] in ("ok", "error")
    compare(HOSTILE_CALLS[name], ours, native)
    assert ours["status"] == native["status"]


STRATEGIES = {"conv2d": conv2d_cases, "max_pool2d": max_pool2d_cases,
              "max_pool2d_backward": max_pool2d_backward_cases, "lstm": lstm_cases, "lstm_cell": lstm_cell_cases}


@pytest.mark.parametrize("op", list(STRATEGIES))
def test_fuzz_against_native(op, runner, log, request):
    minutes = request.config.getoption("--fuzz-minutes")
    outcomes = {}

    def check(case):
        ours, native = runner.run(case)
        outcome = compare(case, ours, native)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        log({"case": case, "ours": ours, "native": native, "outcome": outcome})

    common = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
    if not minutes:
        settings(max_examples=SLICE_EXAMPLES[op], derandomize=True, **common)(
            given(case=STRATEGIES[op]())(check))()
    else:
        deadline = time.monotonic() + 60 * minutes / len(STRATEGIES)
        for round_seed in itertools.count(int(time.time())):
            if time.monotonic() > deadline:
                break
            seed(round_seed)(settings(max_examples=50, **common)(given(case=STRATEGIES[op]())(check)))()
    print(f"\n{op}: {sum(outcomes.values())} cases: {outcomes}")
    assert outcomes.get("both answered", 0) > 0, f"no {op} case was compared: {outcomes}"
