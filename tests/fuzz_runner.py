"""Runs fuzz cases, each side (ours, native) in a forked child of this process.

Started once by tests/test_fuzz.py as `python tests/fuzz_runner.py`; it reads one
JSON case per line on stdin and answers one JSON line per side on stdout:
{"side", "status": ok | error | crash | hang, "type", "message", "path"}. torch
and pyconvext are imported once here and no parallel region runs before a
fork, so each child starts cheaply with fresh thread pools; a child that dies
by a signal, or runs past the timeout, is reported as such, and a heap that
one side corrupts cannot touch the other.
"""

import json
import os
import signal
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

import pyconvext
import pyconvext.functional as P

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _tensor(shape, dtype, gen, channels_last=False):
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(DTYPES[dtype])
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _backward(outputs, leaves, gen, values_dtype=None):
    """Gradients of every leaf for random output gradients (None for a leaf
    the outputs do not reach), of values representable in values_dtype."""
    outputs = [o for o in outputs if o.requires_grad]
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(values_dtype or o.dtype).to(o.dtype)
             for o in outputs]
    return list(torch.autograd.grad(outputs, leaves, grads, allow_unused=True))


def run_conv2d(case, ours):
    gen = torch.Generator().manual_seed(case["seed"])
    x = _tensor(case["input"], case["dtype"], gen, case.get("channels_last", False))
    w = _tensor(case["weight"], case["dtype"], gen, case.get("channels_last", False))
    b = _tensor([case["weight"][0]], case["dtype"], gen) if case.get("bias") else None
    leaves = [t for t in (x, w, b) if t is not None]
    grad = case.get("grad", False)
    for t in leaves:
        t.requires_grad_(grad)
    conv = P.conv2d if ours else F.conv2d
    out = conv(x, w, b, case["stride"], case["padding"], case["dilation"], case["groups"])
    return [out] + (_backward([out], leaves, gen) if grad else [])


def run_max_pool2d(case, ours):
    gen = torch.Generator().manual_seed(case["seed"])
    x = _tensor(case["input"], case["dtype"], gen, case.get("channels_last", False))
    rounded = None
    if not ours and x.dtype == torch.bfloat16:
        # Native sums overlapping windows' gradients in bfloat16, ours in
        # float32 rounded once: the reference is native in float64 on the
        # same values, rounded once.
        x, rounded = x.double(), torch.bfloat16
    grad = case.get("grad", False)
    x.requires_grad_(grad)
    pool = P.max_pool2d if ours else F.max_pool2d
    result = pool(x, case["kernel_size"], case["stride"], case["padding"], case["dilation"],
                  case["ceil_mode"], case["return_indices"])
    outputs = list(result) if case["return_indices"] else [result]
    results = outputs + (_backward(outputs[:1], [x], gen, rounded) if grad else [])
    return [t.to(rounded) if rounded and t is not None and t.is_floating_point() else t for t in results]


def run_max_pool2d_backward(case, ours):
    """The backward operator on hand-made indices (shifted by case["shift"])."""
    gen = torch.Generator().manual_seed(case["seed"])
    x = _tensor(case["input"], case["dtype"], gen)
    args = (case["kernel_size"], case["stride"], case["padding"], case["dilation"], case["ceil_mode"])
    out, indices = torch.ops.aten.max_pool2d_with_indices(x, *args)
    indices = indices + case["shift"]
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    if ours:
        return [torch.ops.pyconvext.max_pool2d_backward(grad_out, x, indices, *args)]
    return [torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *args, indices)]


def run_lstm(case, ours):
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    module_class = pyconvext.nn.LSTM if ours else torch.nn.LSTM
    lstm = module_class(case["input_size"], case["hidden_size"], num_layers=case["num_layers"],
                        bias=case["bias"], batch_first=case["batch_first"],
                        bidirectional=case["bidirectional"], proj_size=case["proj_size"],
                        dtype=DTYPES[case["dtype"]])
    x = _tensor(case["input"], case["dtype"], gen)
    grad = case.get("grad", False)
    x.requires_grad_(grad)
    if case.get("batch_sizes") is not None:
        x = torch.nn.utils.rnn.PackedSequence(x, torch.tensor(case["batch_sizes"]))
    output, (h, c) = lstm(x)
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        output = output.data
    outputs = [output, h, c]
    leaves = [x.data if case.get("batch_sizes") is not None else x, *lstm.parameters()]
    return outputs + (_backward(outputs, leaves, gen) if grad else [])


def run_lstm_cell(case, ours):
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    module_class = pyconvext.nn.LSTMCell if ours else torch.nn.LSTMCell
    cell = module_class(case["input_size"], case["hidden_size"], bias=case["bias"],
                        dtype=DTYPES[case["dtype"]])
    x = _tensor(case["input"], case["dtype"], gen)
    grad = case.get("grad", False)
    x.requires_grad_(grad)
    h, c = cell(x)
    return [h, c] + (_backward([h, c], [x, *cell.parameters()], gen) if grad else [])


RUNNERS = {"conv2d": run_conv2d, "max_pool2d": run_max_pool2d,
           "max_pool2d_backward": run_max_pool2d_backward, "lstm": run_lstm, "lstm_cell": run_lstm_cell}


def run_side(case, side, folder, timeout):
    """Forks a child that runs one side of the case; returns its report."""
    path = os.path.join(folder, f"{side}.pt")
    error_path = os.path.join(folder, f"{side}.error")
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            with torch.no_grad() if not case.get("grad") else torch.enable_grad():
                result = RUNNERS[case["op"]](case, side == "ours")
            torch.save([t.detach() if isinstance(t, torch.Tensor) else t for t in result], path)
        except Exception as error:  # a Python exception is a result: the error
            with open(error_path, "w") as f:
                json.dump({"type": type(error).__name__, "message": str(error)[:2000]}, f)
        except BaseException:
            status = 3
        os._exit(status)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"side": side, "status": "hang", "message": f"still running after {timeout} s"}
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return {"side": side, "status": "crash", "message": f"killed by {name}"}
    if os.WEXITSTATUS(status) != 0:
        return {"side": side, "status": "crash", "message": f"exit status {os.WEXITSTATUS(status)}"}
    if os.path.exists(error_path):
        with open(error_path) as f:
            return {"side": side, "status": "error", **json.load(f)}
    return {"side": side, "status": "ok", "path": path}


def main():
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    torch.set_num_threads(1)  # no thread pool before the forks; cases are small
    warnings.simplefilter("ignore")  # native's notes about its own paths
    for line in sys.stdin:
        case = json.loads(line)
        folder = tempfile.mkdtemp(prefix="pyconvext-fuzz-")
        for side in ("ours", "native"):
            print(json.dumps(run_side(case, side, folder, timeout)), flush=True)


if __name__ == "__main__":
    main()
