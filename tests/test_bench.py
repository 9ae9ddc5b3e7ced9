"""The benchmark harness: the catalog the issue names, and the command line."""

import csv
import dataclasses
import subprocess
import sys

import pytest
import torch

from pyconvext.bench import CONV2D_CATALOG, MAX_POOL2D_CATALOG, PoolLayer, geomean
from test_build import ROOT

# (name, N, C, H, W, K, kernel, stride, padding, groups) as the foundation issue lists them.
REQUIRED = [
    ("mnist.conv1", 64, 1, 28, 28, 10, 5, 1, 0, 1),
    ("mnist.conv2", 64, 10, 12, 12, 20, 5, 1, 0, 1),
    ("lenet5.c3", 64, 6, 14, 14, 16, 5, 1, 0, 1),
    ("alexnet.conv1", 8, 3, 224, 224, 64, 11, 4, 2, 1),
    ("zfnet.conv1", 8, 3, 224, 224, 96, 7, 2, 1, 1),
    ("vgg.conv3", 4, 128, 56, 56, 256, 3, 1, 1, 1),
    ("googlenet.5x5", 8, 16, 28, 28, 32, 5, 1, 2, 1),
    ("googlenet.1x1", 8, 192, 28, 28, 64, 1, 1, 0, 1),
    ("resnet.stem", 8, 3, 224, 224, 64, 7, 2, 3, 1),
    ("resnet.l3", 8, 256, 14, 14, 256, 3, 1, 1, 1),
    ("depthwise", 8, 32, 112, 112, 32, 3, 1, 1, 32),
]


def test_catalog_has_the_required_layers():
    catalog = {
        layer.name: (layer.name, layer.batch, layer.in_channels, layer.height, layer.width,
                     layer.out_channels, layer.kernel, layer.stride, layer.padding, layer.groups)
        for layer in CONV2D_CATALOG
    }
    for required in REQUIRED:
        assert catalog.get(required[0]) == required


# (name, N, C, H, W, kernel, stride, padding, ceil_mode) as the max_pool2d issue lists them.
REQUIRED_POOLS = [
    ("mnist.pool1", 64, 10, 24, 24, 2, 2, 0, False),
    ("mnist.pool2", 64, 20, 8, 8, 2, 2, 0, False),
    ("alexnet.pool", 8, 64, 55, 55, 3, 2, 0, False),
    ("vgg.pool", 8, 64, 224, 224, 2, 2, 0, False),
    ("googlenet.pool", 8, 192, 56, 56, 3, 2, 0, True),
    ("resnet.pool", 8, 64, 112, 112, 3, 2, 1, False),
]


def test_pool_catalog_has_the_required_layers():
    catalog = {layer.name: layer for layer in MAX_POOL2D_CATALOG}
    for name, *sizes in REQUIRED_POOLS:
        assert catalog[name] == PoolLayer(name, *sizes)


def test_pool_output_sizes_follow_native():
    for layer in MAX_POOL2D_CATALOG:
        x = torch.empty(1, 1, layer.height, layer.width)
        out = torch.nn.functional.max_pool2d(x, layer.kernel, layer.stride, layer.padding,
                                             ceil_mode=layer.ceil_mode)
        assert out.shape[2:] == layer.output_size()


def test_geomean():
    assert abs(geomean([2.0, 0.5, 1.0]) - 1.0) < 1e-12
    assert abs(geomean([4.0, 1.0]) - 2.0) < 1e-12


def test_bench_command(tmp_path):
    out_csv, out_md = tmp_path / "conv2d.csv", tmp_path / "conv2d.md"
    result = subprocess.run(
        [sys.executable, "-m", "pyconvext", "bench", "--op", "conv2d", "--layers", "mnist.conv2",
         "lenet5.c3", "--min-time", "0.05", "--csv", str(out_csv), "--markdown", str(out_md)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "forward+backward: geometric mean speedup" in result.stdout
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["layer"], r["mode"]) for r in rows] == [
        ("mnist.conv2", "forward"), ("mnist.conv2", "forward+backward"),
        ("lenet5.c3", "forward"), ("lenet5.c3", "forward+backward"),
    ]
    for r in rows:
        native, ours = float(r["native_ms"]), float(r["ours_ms"])
        assert native > 0 and ours > 0
        assert abs(float(r["speedup"]) - native / ours) < 1e-3
    assert "| mnist.conv2 |" in out_md.read_text()


def test_bench_refuses_unknown_layer():
    result = subprocess.run(
        [sys.executable, "-m", "pyconvext", "bench", "--op", "conv2d", "--layers", "nope"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode != 0
    assert "no layer matched" in result.stderr


def test_pool_bench_command(tmp_path):
    """Both layouts and all three modes, with the bandwidth floor from a copy
    measured in the same run."""
    out_csv = tmp_path / "pool.csv"
    result = subprocess.run(
        [sys.executable, "-m", "pyconvext", "bench", "--op", "max_pool2d", "--layers", "mnist.pool2",
         "--min-time", "0.05", "--csv", str(out_csv)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out_csv.open()))
    modes = ["forward", "forward+indices", "forward+backward"]
    assert [r["mode"] for r in rows] == modes + [m + " channels_last" for m in modes]
    for r in rows:
        assert r["unit"] == "GB/s"
        ours_s, floor_s = float(r["ours_ms"]) / 1e3, float(r["floor_ms"]) / 1e3
        assert ours_s > 0 and floor_s > 0
        moved = float(r["rate"]) * 1e9 * ours_s
        # forward moves the input and the output once: 64 * 20 * (64 + 16) floats.
        if r["mode"] == "forward":
            assert abs(moved - 64 * 20 * 80 * 4) < 0.01 * moved
    assert "forward channels_last: geometric mean speedup" in result.stdout


def test_lstm_catalog_and_command(tmp_path):
    from pyconvext.bench import LSTM_CATALOG, LstmCellLayer, LstmSequence

    assert LSTM_CATALOG == (
        LstmCellLayer("cell.small", 64, 128, 256), LstmCellLayer("cell.large", 64, 512, 512),
        LstmCellLayer("cell.b1", 1, 256, 256), LstmSequence("lstm.lm", 35, 32, 256, 256),
        LstmSequence("lstm.caption", 20, 64, 512, 512),
        LstmSequence("lstm.seq2seq", 30, 32, 256, 256, num_layers=2, bidirectional=True),
    )
    out_csv = tmp_path / "lstm.csv"
    result = subprocess.run(
        [sys.executable, "-m", "pyconvext", "bench", "--op", "lstm", "--layers", "cell.b1", "--min-time", "0.05",
         "--csv", str(out_csv)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["layer"], r["mode"], r["unit"]) for r in rows] == [
        ("cell.b1", "forward", "GFLOP/s"), ("cell.b1", "forward+backward", "GFLOP/s")]


def test_models_and_plot(tmp_path):
    """--models races whole networks (alone, without --op); --plot draws the chart."""
    out_csv, out_png = tmp_path / "models.csv", tmp_path / "speedups.png"
    result = subprocess.run(
        [sys.executable, "-m", "pyconvext", "bench", "--models", "--layers", "mnist", "lenet5", "--min-time", "0.05",
         "--csv", str(out_csv), "--plot", str(out_png)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["op"], r["layer"], r["shape"], r["mode"], r["unit"]) for r in rows] == [
        ("models", name, "64x1x28x28", mode, "images/s")
        for name in ("mnist", "lenet5") for mode in ("forward", "forward+backward")]
    for r in rows:  # images/s: the batch over our time
        assert abs(float(r["rate"]) - 64 / (float(r["ours_ms"]) / 1e3)) < 1e-3 * float(r["rate"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out_png}" in result.stdout


def test_model_catalog():
    from pyconvext.bench import MODEL_CATALOG, Model

    assert MODEL_CATALOG == (
        Model("mnist", 64, 1, 28, 28), Model("lenet5", 64, 1, 28, 28),
        Model("alexnet", 8, 3, 224, 224, torchvision=True), Model("zfnet", 8, 3, 224, 224),
        Model("vgg11", 2, 3, 224, 224, torchvision=True), Model("googlenet", 8, 3, 224, 224, torchvision=True),
        Model("resnet18", 8, 3, 112, 112, torchvision=True), Model("resnet50", 8, 3, 112, 112, torchvision=True),
    )


@pytest.mark.parametrize("name", ["mnist", "lenet5", "resnet18"])
def test_model_cases_race_the_converted_copy(name):
    from pyconvext.bench import MODEL_CATALOG, model_cases

    model = dataclasses.replace(next(m for m in MODEL_CATALOG if m.name == name), batch=2)
    for mode, native, ours, images in model_cases(model, dtype=torch.float64):  # float64: compare tightly
        assert images == 2
        ops = []
        for fn in (native, ours):
            torch.manual_seed(0)  # the same dropout masks in training mode
            with torch.profiler.profile() as profile:
                result = fn()
            ops.append({event.name for event in profile.events()})
            if fn is native:
                expected = result
        torch.testing.assert_close(result, expected)
        assert not any(name.startswith("pyconvext::") for name in ops[0])
        assert "pyconvext::conv2d" in ops[1]


def test_models_without_torchvision_are_left_out():
    code = ("import sys; sys.modules['torchvision'] = None\n"
            "from pyconvext.__main__ import main\n"
            "main(['bench', '--models', '--layers', 'lenet5', 'resnet18', '--min-time', '0.01'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "# torchvision is not installed: left out resnet18" in result.stdout
    assert "lenet5" in result.stdout


def test_plot_draws_a_panel_per_operator(tmp_path):
    from pyconvext.bench import Result, plot, pyplot

    results = [Result("conv2d", "a", "s", "forward", 2.0, 1.0, 1.0),
               Result("conv2d", "b", "s", "forward", 1.0, 2.0, 1.0),
               Result("conv2d", "a", "s", "forward+backward", 3.0, 1.0, 1.0),
               Result("max_pool2d", "p", "s", "forward", 10.0, 1.0, 1.0)]
    plt = pyplot()
    saved = []
    original = plt.Figure.savefig
    plt.Figure.savefig = lambda fig, *args, **kwargs: saved.append(fig) or original(fig, *args, **kwargs)
    try:
        plot(results, tmp_path / "x.png", title="machine")
    finally:
        plt.Figure.savefig = original
    axes = saved[0].axes
    assert [ax.get_title().split(":")[0] for ax in axes] == ["conv2d", "max_pool2d"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["a", "b"]
    bars = sorted(round(patch.get_width(), 6) for patch in axes[0].patches)
    assert bars == [0.5, 2.0, 3.0]
    assert [text.get_text() for text in axes[1].texts] == ["10.00x"]


def test_plot_without_matplotlib_says_how_to_get_it():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from pyconvext.__main__ import main\n"
            "main(['bench', '--op', 'conv2d', '--layers', 'mnist.conv1', '--plot', 'x.png'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip() == ("pyconvext bench: plotting needs matplotlib, an optional dependency of "
                                     "pyconvext: pip install matplotlib (or pip install 'pyconvext[plot]')")
    assert "layer" not in result.stdout  # refused before racing


def test_catalogs_without_a_kernel_on_the_device_are_left_out():
    """No LSTM CUDA kernel yet: racing it would raise mid-run and lose the other tables."""
    from pyconvext.bench import has_kernel, run

    notes = []

    class Progress:
        def note(self, text):
            notes.append(text)

    assert has_kernel("conv2d", "cpu") and has_kernel("lstm", "cpu") and not has_kernel("lstm", "cuda")
    assert run("lstm", device="cuda", progress=Progress()) == []
    assert notes == ["lstm: pyconvext has no cuda kernel for it in this build: left out"]


def test_overhead_command(tmp_path):
    """bench --overhead: one call per operator on a tiny input, on one thread,
    and the largest extra cost per call in the summary."""
    out_csv = tmp_path / "overhead.csv"
    result = subprocess.run(
        [sys.executable, "-m", "pyconvext", "bench", "--overhead", "--min-time", "0.05", "--csv", str(out_csv)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["layer"], r["mode"]) for r in rows] == [
        (name, mode) for name in ("conv2d", "max_pool2d", "max_pool2d.indices", "lstm_cell", "lstm.step")
        for mode in ("forward", "forward+backward")]
    assert "forward: extra cost per call at most" in result.stdout
    assert "forward+backward: extra cost per call at most" in result.stdout


def test_overhead_runs_on_one_thread(monkeypatch):
    from pyconvext import bench

    seen = []
    monkeypatch.setattr(bench, "_run", lambda *args: seen.append(torch.get_num_threads()) or [])
    threads = torch.get_num_threads()
    bench.run("overhead")
    bench.run("conv2d")
    assert seen == [1, threads] and torch.get_num_threads() == threads
