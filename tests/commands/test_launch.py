"""`hf-offload launch`: the environment it builds, the start-up hook, bad commands, and real launched runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from faces import EXAMPLES, example_argv, run_example, state_losses

from hf_offload.commands import cli
from hf_offload.commands.launch import STARTUP_DIR, launch_environment
from hf_offload.integrations.plugin import ENV_VAR, LayerStreamingPlugin

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
LORA = ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1"]


def test_launch_is_a_registered_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["launch", "--help"])
    assert "every transformers Trainer it creates" in capsys.readouterr().out


def test_environment_carries_the_plugin_and_puts_the_hook_first():
    plugin = LayerStreamingPlugin(prefetch=2, lora_r=8)
    env = launch_environment(plugin, {"PYTHONPATH": os.pathsep.join(["/somewhere", STARTUP_DIR]), "PATH": "/bin"})
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths[0] == STARTUP_DIR and paths.count(STARTUP_DIR) == 1 and "/somewhere" in paths
    assert LayerStreamingPlugin.from_env(env) == plugin
    assert env["PATH"] == "/bin"


def test_full_finetune_fixes_the_mmap_threshold_of_the_script_unless_set():
    """See Note: [Host heap during full fine-tuning] in commands/launch.py."""
    assert "MALLOC_MMAP_THRESHOLD_" not in launch_environment(LayerStreamingPlugin(), {})
    full = LayerStreamingPlugin(full_finetune=True)
    assert launch_environment(full, {})["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
    assert launch_environment(full, {"MALLOC_MMAP_THRESHOLD_": "4096"})["MALLOC_MMAP_THRESHOLD_"] == "4096"


def test_command_that_does_not_exist_is_a_clear_error(capsys):
    assert cli.main(["launch", "--", "hf-offload-no-such-command", "--flag"]) == 127
    assert "command not found: 'hf-offload-no-such-command'" in capsys.readouterr().err


def test_missing_command_and_bad_options(capsys):
    assert cli.main(["launch"]) == 2
    assert "no command given" in capsys.readouterr().err
    assert cli.main(["launch", "--prefetch", "-1", "--", "python"]) == 2
    assert "--prefetch should be a non-negative integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch", "--lora_r", "sixteen", "--", "python"])
    assert exit_info.value.code == 2
    assert "argument --lora_r: invalid int value: 'sixteen'" in capsys.readouterr().err


def test_exit_status_of_the_command_is_returned():
    assert cli.main(["launch", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3


def _python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_startup_hook_waits_for_transformers_and_runs_the_sitecustomize_it_shadows(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['SHADOWED_SITECUSTOMIZE_RAN'] = '1'\n")
    env = launch_environment(LayerStreamingPlugin(), {**os.environ, "PYTHONPATH": str(tmp_path)})
    probe = (
        "import os, sys\n"
        "print(os.environ.get('SHADOWED_SITECUSTOMIZE_RAN'))\n"
        "print([type(f).__name__ for f in sys.meta_path if 'Patch' in type(f).__name__])\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    lines = _python(probe, env).splitlines()
    assert lines == ["1", "['_PatchTrainerAfterImport']", "False False"]  # nothing heavy imported at start-up

    env.pop(ENV_VAR)  # the hook folder on the path without settings: no patch, shadowed one still runs
    assert _python(probe, env).splitlines()[:2] == ["1", "[]"]


def _launch(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "hf_offload", "launch", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_unmodified_example_under_launch_streams_like_the_flag(tiny_model_dir, tmp_path, monkeypatch):
    common = example_argv(tiny_model_dir, tmp_path / "launched")
    done = _launch([*LORA, "--", sys.executable, str(EXAMPLES / "finetune.py"), *common], cwd=tmp_path)
    assert "hf_offload: the Trainer keeps" in done.stderr
    assert "'offload/h2d_GB'" in done.stdout
    assert "2 layers loaded straight from the checkpoint" in done.stderr  # the script's from_pretrained, patched

    run_example("finetune.py", example_argv(tiny_model_dir, tmp_path / "flag", "--layer_streaming"), monkeypatch)
    assert state_losses(tmp_path / "launched") == state_losses(tmp_path / "flag")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate command")
def test_trl_sft_under_accelerate_launch_streams_in_the_child_process(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(REPO / "hf_offload" / "data" / "arithmetic.jsonl", data / "train.jsonl")
    command = [
        "accelerate", "launch", "--cpu", "--num_processes", "1", "--num_cpu_threads_per_process", "1",
        "-m", "trl.scripts.sft", "--model_name_or_path", tiny_model_dir, "--dataset_name", str(data),
        "--output_dir", str(tmp_path / "sft"), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--report_to", "none", "--max_length", "32", "--disable_tqdm", "true",
        "--bf16", "false", "--use_cpu", "true",
    ]  # fmt: skip
    done = _launch([*LORA, "--", *command], cwd=tmp_path)
    assert "hf_offload: the Trainer keeps" in done.stderr  # printed by the child, a TRL SFTTrainer
    assert "'offload/h2d_GB'" in done.stdout
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()
