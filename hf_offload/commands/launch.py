"""`hf-offload launch [OPTIONS] -- COMMAND [ARGS...]`: run an unchanged command with layer streaming in every Trainer.

The options become a `LayerStreamingPlugin`, carried to the command in the environment variable
`HF_OFFLOAD_LAYER_STREAMING`. The folder `hf_offload/_startup` goes first on PYTHONPATH; its `sitecustomize`
runs at start-up in every Python process the command starts and patches `transformers.Trainer` in place when it
is imported (see `hf_offload.integrations.trainer.patch_trainer`). Then every `Trainer` and subclass (TRL's
included) adds LoRA if the model has none, streams its decoder layers from host memory and uses 8-bit AdamW unless
the script chose an optimizer.

Note: [Why sitecustomize on PYTHONPATH]
`accelerate launch` and `trl sft` start new Python processes, so patching the launcher's own process is not
enough. The start-up hook must travel with the environment. A `.pth` file would have to be installed into
site-packages and would then run in every Python on the machine, launched or not; PYTHONPATH is inherited by
children, reaches only the launched command, and needs no installation step. `sitecustomize` is the one module
Python imports at start-up from the path; ours runs the one it shadows (e.g. a distribution's) afterwards. Python
started with `-I`, `-E` or `-S` ignores PYTHONPATH or site, and then the command runs without streaming.

Example:
    $ hf-offload launch --lora_r 32 -- python train.py --model_name_or_path meta-llama/Llama-3.1-70B ...
    $ hf-offload launch -- accelerate launch train.py ...
    $ hf-offload launch -- python -m trl.scripts.sft --model_name_or_path Qwen/Qwen3-32B ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from .. import options
from ..engine.shared_store import JOB_ENV, remove_job
from ..integrations.recipe import REPORT_ENV_VAR, launch_report
from .cli import SUBCOMMANDS

# Note: [Host heap during full fine-tuning]
# glibc serves an allocation from the heap unless it is at least the "mmap threshold" large, and raises that threshold
# (up to 32 MiB) each time a large mapped block is freed. Training frees and makes tensors of weight size every step
# (a layer's gradients in the compute dtype, the optimizer's temporaries, activations on the CPU): once the threshold
# has risen above a weight's size, they come from the heap, where freed memory between long-lived tensors is kept by
# the process rather than returned. With full fine-tuning of models whose weights are under 32 MiB the resident memory
# crept 3-19% above what the tensors need (tools/full_finetune_memory.py, 150-250M parameters); with a fixed threshold
# of 1 MiB (the environment variable MALLOC_MMAP_THRESHOLD_, read by glibc at start-up) it stayed within 0.2%. The
# price is a fresh mapping, and page faults, for every large temporary: on the CPU the resident model's own step in
# the same process ran up to 2x slower. So it is a choice of the process: `hf-offload launch --full_finetune` makes it
# for the script it starts (`FULL_FINETUNE_ENV`), unless the environment already sets the variable; in Python, set
# it before starting the interpreter.
FULL_FINETUNE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}

PACKAGE_DIR = Path(__file__).resolve().parent.parent
STARTUP_DIR = str(PACKAGE_DIR / "_startup")

_EPILOG = """examples:
  hf-offload launch -- python train.py --output_dir out
  hf-offload launch --prefetch 2 --lora_r 32 -- accelerate launch train.py --output_dir out
  hf-offload launch -- python -m trl.scripts.sft --model_name_or_path Qwen/Qwen3-8B --dataset_name trl-lib/Capybara
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "launch",
        help=SUBCOMMANDS["launch"][1],
        description="Run COMMAND (python train.py ..., accelerate launch ..., python -m trl.scripts.sft ...) "
        "unchanged, with layer streaming on for every transformers Trainer it creates, in child processes too.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ..integrations.plugin import LayerStreamingPlugin

    options.add_arguments(parser, options.declared(LayerStreamingPlugin), "launch")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The command to run, after --.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..integrations.plugin import LayerStreamingPlugin, check_combinations

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("hf-offload launch: no command given. Usage: hf-offload launch [OPTIONS] -- COMMAND ...", file=sys.stderr)
        return 2
    try:
        values = options.values_from(args, options.declared(LayerStreamingPlugin), "launch")
        check_combinations(values, "launch")
        plugin = LayerStreamingPlugin(**values)
    except ValueError as err:
        print(f"hf-offload launch: {err}", file=sys.stderr)
        return 2
    env = launch_environment(plugin)
    if shutil.which(command[0], path=env.get("PATH")) is None:
        print(
            f"hf-offload launch: command not found: {command[0]!r}. Give the command to run after --, for example "
            "`hf-offload launch -- python train.py`.",
            file=sys.stderr,
        )
        return 127
    job = env[JOB_ENV] = f"launch{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="hf-offload-launch-") as report:
        env[REPORT_ENV_VAR] = report
        try:
            code = _run(command, env)
        finally:  # however the command ended (a rank killed, Ctrl-C): its node's shared host stores go
            remove_job(job)
        message = launch_report(report)
    if message is not None:
        print(message, file=sys.stderr)
    return code


def launch_environment(plugin, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) plus the plugin and the start-up hook on PYTHONPATH, and with
    full fine-tuning glibc's mmap threshold (unless `base` sets it)."""
    env = dict(os.environ if base is None else base)
    env.update(plugin.to_env())
    if plugin.full_finetune:  # see Note: [Host heap during full fine-tuning]
        for name, value in FULL_FINETUNE_ENV.items():
            env.setdefault(name, value)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != STARTUP_DIR]
    # The launched Python must import this hf_offload, wherever it was imported from here.
    package_root = str(PACKAGE_DIR.parent)
    if package_root not in rest and not _installed_in_site_packages():
        rest.append(package_root)
    env["PYTHONPATH"] = os.pathsep.join([STARTUP_DIR, *rest])
    return env


def _installed_in_site_packages() -> bool:
    import site
    import sysconfig

    here = Path(__file__).resolve()
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    return any(here.is_relative_to(Path(root).resolve()) for root in roots if root)


def _run(command: list[str], env: dict[str, str]) -> int:
    """Run `command` to completion and return its exit status as a shell would (128 + signal when killed)."""
    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT from the terminal; let it finish
        code = process.wait()
    return 128 - code if code < 0 else code
