"""The `smoe` command. Subcommands are added as the project grows: `smoe bench layer` now."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoe", description="SMoE-Dropout transformers on DeepSpeed.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks.")
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    from . import bench_layer

    layer = benches.add_parser("layer", help="MoE layer time and memory vs the dense MLP and stock DeepSpeed",
                               description=bench_layer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_layer.add_arguments(layer)
    layer.set_defaults(run=bench_layer.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported and probes for one
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        print(f"smoe: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
