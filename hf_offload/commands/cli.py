"""The `hf-offload` command (also `python -m hf_offload`): one subcommand per module, registered below."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module named here defines `register(subparsers)`, which adds its subcommand and sets `func` on it.
SUBCOMMAND_MODULES: list[str] = ["hf_offload.commands.launch", "hf_offload.commands.plan", "hf_offload.commands.bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-offload",
        description="Fine-tune Hugging Face causal LMs bigger than the GPU: decoder layers stream from host memory.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
