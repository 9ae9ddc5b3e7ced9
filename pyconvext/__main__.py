"""Command line: python -m pyconvext <command> ...

  bench   race pyconvext's kernels against native PyTorch over the shape catalog
  info    print what this build of pyconvext was compiled with
"""

import argparse
import json
import sys

import torch

import pyconvext
from pyconvext import bench

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def run_bench(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("pyconvext bench: --device cuda, but no CUDA GPU is visible")
    ops = list(bench.CATALOGS) if args.op == "all" else [args.op]
    setting = args.dtype
    if args.batch:
        setting += f", batch {args.batch}"
    elif args.batch_scale != 1:
        setting += f", batch x{args.batch_scale}"
    print(f"# {bench.machine(args.device)}; {setting}", flush=True)
    bench.print_line(bench.HEADER)
    results = []
    for op in ops:
        results += bench.run(op, args.device, DTYPES[args.dtype], layers=args.layers,
                             min_time=args.min_time, progress=bench.print_row,
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
            f.write(f"Machine: {bench.machine(args.device)}; {setting}\n\n")
            f.write(bench.markdown_table(results) + "\n\n")
            f.write("\n".join(f"- {line}" for line in bench.summary(results)) + "\n")
        print(f"wrote {args.markdown}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyconvext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("bench", help="race our kernels against native PyTorch")
    p.add_argument("--op", choices=[*bench.CATALOGS, "all"], default="all")
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
    p.set_defaults(run=run_bench)

    p = commands.add_parser("info", help="print build_info() as JSON")
    p.set_defaults(run=lambda args: print(json.dumps(pyconvext.build_info(), indent=2)))

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
