"""The `hf-offload` command: a subcommand's module (and what it imports) loads only when that subcommand runs."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_lists_every_subcommand_without_importing_torch():
    out = _run(
        "import sys\n"
        "from hf_offload.commands import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    for name in ("launch", "plan", "bench"):
        assert name in out
    assert out.strip().splitlines()[-1] == "False False"


def test_a_subcommand_builds_only_its_own_parser():
    out = _run(
        "import sys\n"
        "from hf_offload.commands import cli\n"
        "parser = cli.build_parser(only='launch')\n"
        "args = parser.parse_args(['launch', '--lora_r', '4', '--', 'python'])\n"
        "print(args.lora_r, 'hf_offload.commands.plan' in sys.modules, 'hf_offload.commands.bench' in sys.modules)\n"
    )
    assert out.strip().splitlines()[-1] == "4 False False"
