"""Data parallel over processes: torchrun / accelerate launch ranks, each streaming to its own device, adapter
gradients all-reduced by the ordinary DDP path (gloo on the CPU), against the same runs without streaming.

The multi-process runs are slow on 2 cores (each rank imports torch, transformers and peft): one small model, two
ranks, three steps; the plain run is shared by the tests that compare with it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_families import build as build_moe
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tests" / "dp_scripts"
TRAINER_SCRIPT = str(SCRIPTS / "trainer_script.py")
ACCELERATE_SCRIPT = str(SCRIPTS / "accelerate_script.py")
TOLERANCE = 1e-5  # relative, on losses and adapter weights

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    tests = str(REPO / "tests")
    path = os.pathsep.join([str(REPO), tests, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _run(command: list[str], cwd, timeout: int = 240, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env={**_env(), **env}, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _torchrun(nproc: int = 2, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *extra,
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]  # fmt: skip


def _trainer_argv(model_dir, output_dir, *extra: str) -> list[str]:
    return [
        "--model_dir", str(model_dir), "--output_dir", str(output_dir), "--max_steps", "3", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--optim", "adamw_torch", "--use_cpu",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7", *extra,
    ]  # fmt: skip


def _launch(*options: str) -> list[str]:
    return [sys.executable, "-m", "hf_offload", "launch", *options, "--"]


def _losses(output_dir) -> list[float]:
    with open(Path(output_dir) / "trainer_state.json", encoding="utf-8") as f:
        return [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]


def assert_same_run(output_dir, reference) -> None:
    """Same logged losses and the same saved adapter, within TOLERANCE."""
    got, want = _losses(output_dir), _losses(reference)
    assert len(got) == len(want) and len(got) > 0
    assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=TOLERANCE, atol=0), (got, want)
    assert_same_adapter(output_dir, reference)


def assert_same_adapter(output_dir, reference) -> None:
    got = load_file(Path(output_dir) / "adapter_model.safetensors")
    want = load_file(Path(reference) / "adapter_model.safetensors")
    assert got.keys() == want.keys() and got
    for name, tensor in want.items():
        scale = tensor.abs().max().clamp_min(1e-12)
        assert (got[name] - tensor).abs().max() / scale <= TOLERANCE, name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from hf_offload.demo import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama-2", num_hidden_layers=2)


@pytest.fixture(scope="module")
def plain_run(model_dir, tmp_path_factory):
    """The script under torchrun with 2 ranks, no streaming: the reference."""
    out = tmp_path_factory.mktemp("plain") / "out"
    _run([*_torchrun(), TRAINER_SCRIPT, *_trainer_argv(model_dir, out)], cwd=out.parent)
    return out


def test_launcher_over_torchrun_matches_plain_ddp(model_dir, plain_run, tmp_path):
    out = tmp_path / "launched"
    done = _run([*_launch(), *_torchrun(), TRAINER_SCRIPT, *_trainer_argv(model_dir, out)], cwd=tmp_path)
    assert "hf_offload: the Trainer keeps" in done.stderr  # the ranks really streamed
    # the launcher loads into the store: local rank 0 loads it for the node, rank 1 reads no layer of the checkpoint
    assert "local rank 1 maps the node's shared host store built by local rank 0" in done.stderr
    assert_same_run(out, plain_run)


def test_partitioned_fetch_under_the_launcher_matches_plain_ddp(model_dir, plain_run, tmp_path):
    """Each rank copies half of each layer from the node's shared store and all-gathers the rest (gloo)."""
    out = tmp_path / "partitioned"
    command = [*_launch("--partitioned_fetch"), *_torchrun(), TRAINER_SCRIPT, *_trainer_argv(model_dir, out)]
    done = _run(command, cwd=tmp_path)
    assert "local rank 0 copies 1/2 of each layer" in done.stderr  # the other ranks log warnings only
    assert_same_run(out, plain_run)


def test_layer_streaming_flag_under_torchrun_matches_plain_ddp(model_dir, plain_run, tmp_path):
    out = tmp_path / "flag"
    command = [*_torchrun(), TRAINER_SCRIPT, *_trainer_argv(model_dir, out, "--layer_streaming")]
    done = _run(command, cwd=tmp_path, HF_OFFLOAD_VERBOSITY="info")  # the replica's info lines too
    assert "hf_offload: streaming 2 decoder layers" in done.stderr
    assert "local rank 1 maps the node's shared host store built by local rank 0" in done.stderr  # packs nothing
    assert_same_run(out, plain_run)


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_node(model_dir, plain_run, tmp_path):
    """Two torchrun "nodes" of one rank each (same global batch) give the one-node run's losses and adapter."""
    out, port = tmp_path / "nodes", str(_free_port())
    nodes = []
    for node_rank in (0, 1):
        command = [
            *_launch(), sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
            TRAINER_SCRIPT, *_trainer_argv(model_dir, out),
        ]  # fmt: skip
        nodes.append(
            subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = [node.communicate(timeout=240)[0].decode() for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_run(out, plain_run)


@pytest.mark.slow
def test_launcher_resumes_a_data_parallel_checkpoint(model_dir, plain_run, tmp_path):
    """A checkpoint of step 2 of a launched run, resumed by another launched run: the plain run's losses and
    adapter."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    steps = ["--save_strategy", "steps", "--save_steps", "2"]
    _run([*_launch(), *_torchrun(), TRAINER_SCRIPT, *_trainer_argv(model_dir, first), *steps], cwd=tmp_path)
    again = [*_trainer_argv(model_dir, resumed), "--resume_from_checkpoint", str(first / "checkpoint-2")]
    _run([*_launch(), *_torchrun(), TRAINER_SCRIPT, *again], cwd=tmp_path)
    assert_same_run(resumed, plain_run)


@pytest.mark.slow
def test_routed_experts_under_the_launcher_match_plain_ddp(tmp_path):
    """An MoE model with LoRA on its experts: each rank routes its own tokens (experts no token of a rank reached
    get no gradient there), and DDP averages what the ranks produced, as for the unstreamed model."""
    model_dir = tmp_path / "moe"
    build_moe("qwen3_moe").save_pretrained(model_dir)
    runs = {}
    for name, prefix in (("plain", []), ("launched", _launch("--expert_fetch", "routed"))):
        runs[name] = tmp_path / name
        argv = _trainer_argv(model_dir, runs[name], "--expert_lora", "true", "--ddp_find_unused_parameters", "true")
        _run([*prefix, *_torchrun(), TRAINER_SCRIPT, *argv], cwd=tmp_path)
    assert_same_run(runs["launched"], runs["plain"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate command")
def test_offload_accelerator_under_accelerate_launch_matches_accelerator(model_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` with `cpu=True` in the script: 2 gloo ranks on the CPU
    (`accelerate launch --cpu --num_processes 2` starts one process unless given an mpirun host file). Gradient
    accumulation over 2 micro-batches (DDP's no_sync on the first)."""
    runs = {}
    for name, extra in (("plain", []), ("streamed", ["--streaming"])):
        runs[name] = tmp_path / name
        command = [
            "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            ACCELERATE_SCRIPT, "--model_dir", str(model_dir), "--output_dir", str(runs[name]), "--accumulation", "2",
            *extra,
        ]  # fmt: skip
        _run(command, cwd=tmp_path)
    records = {name: json.loads((out / "losses.json").read_text()) for name, out in runs.items()}
    assert records["streamed"]["processes"] == 2 and records["streamed"]["wrapper"] == "DistributedDataParallel"
    got, want = torch.tensor(records["streamed"]["losses"]), torch.tensor(records["plain"]["losses"])
    assert torch.allclose(got, want, rtol=TOLERANCE, atol=0)
    assert_same_adapter(runs["streamed"], runs["plain"])


GUARD_RANK = """
import json, sys
import torch.distributed as dist
from hf_offload.integrations.bad_steps import BadStepGuard, BadStepOptions

dist.init_process_group("gloo")
guard = BadStepGuard(BadStepOptions(skip_bad_steps=True, spike_min_steps=3, spike_window=8))
decisions = []
for step, loss in enumerate([1.0, 1.1, 0.9, 1.0, 30.0 if dist.get_rank() == 0 else 1.0, 1.0]):
    guard.add_loss(loss)
    decisions.append(guard.judge(grad_norm=1.0) is None)
print(json.dumps(decisions))
dist.destroy_process_group()
"""


def test_the_bad_step_guard_takes_one_decision_for_all_ranks(tmp_path):
    """A loss spike on one rank only: every rank skips that step (a step skipped on one rank only would leave the
    adapters different across ranks)."""
    script = tmp_path / "guard_rank.py"
    script.write_text(GUARD_RANK)
    done = _run([*_torchrun(), "--tee", "3", str(script)], cwd=tmp_path, timeout=120)
    decisions = {json.dumps(json.loads(line.split("]:", 1)[1])) for line in done.stdout.splitlines() if "]:[" in line}
    assert decisions == {json.dumps([True, True, True, True, False, True])}, done.stdout
