"""The `hf-offload` command (also `python -m hf_offload`): one subcommand per module, loaded when it is used.

Each subcommand's module defines `register(subparsers)`, which adds its parser (taking its one-line summary from
`SUBCOMMANDS`) and sets `func` on it. Building a subcommand's options can import torch and transformers (the
launcher's options come from the option declarations), so `hf-offload --help` and a command's own run load only
what they need: the other subcommands get a placeholder parser with their summary.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (the module that registers it, its one-line summary in `hf-offload --help`)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "launch": (
        "hf_offload.commands.launch",
        "Run a training command with layer streaming on for every Trainer it creates.",
    ),
    "plan": (
        "hf_offload.commands.plan",
        "Will a model fit, and how fast will it stream? From its config alone (no weights are loaded).",
    ),
    "bench": (
        "hf_offload.commands.bench",
        "Measure training speed: hf_offload against resident training, DeepSpeed ZeRO-3 and accelerate.",
    ),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command's parser; with `only`, the other subcommands are placeholders (their modules not imported)."""
    parser = argparse.ArgumentParser(
        prog="hf-offload",
        description="Fine-tune Hugging Face causal LMs bigger than the GPU: decoder layers stream from host memory.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, summary) in SUBCOMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=chosen if chosen in SUBCOMMANDS else "")
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
