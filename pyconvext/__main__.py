"""Command line: python -m pyconvext <command> ...

  demo         build info, one race per operator against native, one epoch of MNIST
  train-mnist  the classic PyTorch MNIST example on pyconvext's kernels (or native ones)
  test-mnist   a train-mnist checkpoint on the MNIST test set, in pyconvext's net and native's
  bench        race pyconvext's kernels against native PyTorch over the shape catalog
  info         print what this build of pyconvext was compiled with
"""

import argparse
import json
import os
import sys

import torch

import pyconvext
from pyconvext import bench, demo, mnist_example
from pyconvext.data import mnist

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
OPS = ("conv2d", "max_pool2d", "lstm")


def run_bench(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("pyconvext bench: --device cuda, but no CUDA GPU is visible")
    _check_output_folders(args.csv, args.markdown, args.plot)
    if args.plot:
        try:
            bench.pyplot()  # fail now, not after the races
        except ImportError as error:
            sys.exit(f"pyconvext bench: {error}")
    catalogs = list(OPS) if args.op == "all" or (args.op is None and not args.models and not args.overhead) else []
    catalogs += [args.op] if args.op in OPS else []
    catalogs += ["models"] if args.models else []
    catalogs += ["overhead"] if args.overhead else []
    setting = args.dtype
    if args.batch:
        setting += f", batch {args.batch}"
    elif args.batch_scale != 1:
        setting += f", batch x{args.batch_scale}"
    machine = f"{bench.machine(args.device)}; {setting}"
    print(f"# {machine}", flush=True)
    bench.print_line(bench.HEADER)
    results = []
    for catalog in catalogs:
        results += bench.run(catalog, args.device, DTYPES[args.dtype], layers=args.layers,
                             min_time=args.min_time, progress=bench.ConsoleProgress(),
                             batch_scale=args.batch_scale, batch=args.batch)
    if not results:
        sys.exit(f"pyconvext bench: no layer matched {args.layers}")
    for line in bench.summary(results):
        print(line)
    if args.csv:
        bench.write_csv(results, args.csv)
        print(f"wrote {args.csv}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Machine: {machine}\n\n")
            f.write(bench.markdown_table(results) + "\n\n")
            f.write("\n".join(f"- {line}" for line in bench.summary(results)) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        bench.plot(results, args.plot, title=machine)
        print(f"wrote {args.plot}")


def _check_output_folders(*paths):
    """Refuses, before any work, an output file whose folder does not exist."""
    for path in paths:
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            sys.exit(f"pyconvext: cannot write {path}: its folder does not exist")


def run_train_mnist(args):
    _check_output_folders(args.save)
    backends = mnist_example.BACKENDS if args.backend == "both" else (args.backend,)
    models, history = mnist_example.train(
        backends, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
        batch_size=args.batch_size, test_batch_size=args.test_batch_size, seed=args.seed,
        device=args.device, data_dir=args.data_dir, log_interval=args.log_interval,
        log=lambda line: print(line, flush=True))
    print(mnist_example.summary_table(history))
    if args.save:
        torch.save(models[backends[0]].state_dict(), args.save)
        print(f"saved the {backends[0]} net's state_dict to {args.save}")


def run_test_mnist(args):
    mnist_example.test_checkpoint(args.checkpoint, device=args.device, data_dir=args.data_dir,
                                  test_batch_size=args.test_batch_size)


def run_demo(args):
    sys.exit(demo.main(data_dir=args.data_dir, min_time=args.min_time, skip_mnist=args.skip_mnist))


def make_parser():
    """The command line's parser (the README's commands are checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m pyconvext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data_dir_help = "folder of the four MNIST .gz files (default $PYCONVEXT_DATA, else ~/.cache/pyconvext)"

    p = commands.add_parser("demo", help="a one-minute tour: build, kernels against native, MNIST")
    p.add_argument("--data-dir", metavar="D", help=data_dir_help)
    p.add_argument("--min-time", type=float, default=1.0,
                   help="seconds of measurement per operator and mode (default 1)")
    p.add_argument("--skip-mnist", action="store_true",
                   help="leave out the MNIST epoch (no MNIST files needed)")
    p.set_defaults(run=run_demo)

    p = commands.add_parser("train-mnist", help="the classic MNIST example on our kernels")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=10, help="batches between log lines")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--backend", choices=["pyconvext", "native", "both"], default="pyconvext",
                   help="whose conv2d and max_pool2d; both: train the two side by side, an epoch each in turn")
    p.add_argument("--data-dir", metavar="D", help=data_dir_help)
    p.add_argument("--save", metavar="FILE", help="write the trained net's state_dict (with both: pyconvext's)")
    p.set_defaults(run=run_train_mnist)

    p = commands.add_parser("test-mnist", help="evaluate a train-mnist checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--data-dir", metavar="D", help=data_dir_help)
    p.set_defaults(run=run_test_mnist)

    p = commands.add_parser("bench", help="race our kernels against native PyTorch")
    p.add_argument("--op", choices=[*OPS, "all"],
                   help="operator catalog to race (default: all, unless only --models or --overhead is given)")
    p.add_argument("--models", action="store_true", help="also race whole networks, ours against native")
    p.add_argument("--overhead", action="store_true",
                   help="also time one call per operator on a tiny input, one thread (the per-call cost)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--layers", nargs="+", metavar="NAME", help="only these catalog layers")
    p.add_argument("--min-time", type=float, default=2.0,
                   help="seconds of measurement per layer and mode (default 2)")
    p.add_argument("--batch-scale", type=int, default=1, metavar="K",
                   help="multiply the catalog's batch sizes by K (e.g. 8 to fill a GPU)")
    p.add_argument("--batch", type=int, metavar="N", help="run every layer at batch N instead")
    p.add_argument("--csv", metavar="FILE", help="also write the results as CSV")
    p.add_argument("--markdown", metavar="FILE", help="also write a Markdown table")
    p.add_argument("--plot", metavar="FILE.png", help="also draw a bar chart of the speedups (needs matplotlib)")
    p.set_defaults(run=run_bench)

    p = commands.add_parser("info", help="print build_info() as JSON")
    p.set_defaults(run=lambda args: print(json.dumps(pyconvext.build_info(), indent=2)))
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    try:
        args.run(args)
    except (mnist.MNISTUnavailable, mnist_example.DeviceUnavailable) as error:
        sys.exit(f"pyconvext {args.command}: {error}")


if __name__ == "__main__":
    main()
