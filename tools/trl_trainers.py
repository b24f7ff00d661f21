"""Run TRL's trainers beyond SFT under `hf-offload launch` on a tiny model, and report what each did.

    python tools/trl_trainers.py [--only dpo,kto,...] [--workdir DIR]

Each run: `hf-offload launch --lora_r 4 -- python -m trl.scripts.<name> ...` (ORPO, which has no script in TRL,
through a small script on TRL's Python API), two steps on the CPU. Printed per trainer: exit status, wall time,
whether the adapter was saved, and the `offload/` metrics of the last training line (streaming was on). Heavy for
the test suite (a minute each on two shared cores), so it is a tool; the figures are in the ecosystem note.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "none",
    "--disable_tqdm", "true", "--bf16", "false", "--use_cpu", "true", "--learning_rate", "2e-4",
    "--save_strategy", "no",
]  # fmt: skip

ORPO_SCRIPT = """
import sys
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

model_dir, data_dir, out = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
args = ORPOConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to="none",
                  disable_tqdm=True, use_cpu=True, learning_rate=2e-4, save_strategy="no", max_length=32)
trainer = ORPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, processing_class=tokenizer,
                      train_dataset=load_dataset("json", data_dir=data_dir, split="train"))
trainer.train()
trainer.save_model()
"""

REWARD_MODULE = "def length_reward(completions, **kwargs):\n    return [float(len(str(c))) for c in completions]\n"


def write_data(work: Path) -> dict[str, Path]:
    pairs = [(a, b) for a in range(8) for b in range(2)]
    sets = {
        "pref": [{"prompt": f"{a} + {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + 1}"} for a, b in pairs],
        "unpaired": [
            {"prompt": f"{a} + {b} =", "completion": f" {a + b + (k % 2)}", "label": k % 2 == 0}
            for k, (a, b) in enumerate(pairs)
        ],
        "prompts": [{"prompt": f"{a} + {b} ="} for a, b in pairs],
    }
    folders = {}
    for name, rows in sets.items():
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        folders[name] = folder
    return folders


def commands(model: str, data: dict[str, Path], work: Path) -> dict[str, list[str]]:
    (work / "rewards.py").write_text(REWARD_MODULE)
    (work / "orpo_run.py").write_text(ORPO_SCRIPT)
    trl = [sys.executable, "-m"]
    return {
        "dpo": [*trl, "trl.scripts.dpo", "--dataset_name", str(data["pref"]), "--max_length", "32"],
        "kto": [*trl, "trl.scripts.kto", "--dataset_name", str(data["unpaired"]), "--max_length", "32"],
        "reward": [*trl, "trl.scripts.reward", "--dataset_name", str(data["pref"]), "--max_length", "32"],
        "grpo": [
            *trl,
            "trl.scripts.grpo",
            "--dataset_name",
            str(data["prompts"]),
            "--reward_funcs",
            "rewards.length_reward",
            "--num_generations",
            "2",
            "--max_completion_length",
            "8",
            "--generation_batch_size",
            "4",
        ],  # fmt: skip
        "orpo": [sys.executable, str(work / "orpo_run.py"), model, str(data["pref"]), str(work / "orpo")],
    }


def last_training_line(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("{") and "'offload/" in line]
    return ast.literal_eval(lines[-1]) if lines else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="dpo,kto,reward,grpo,orpo")
    parser.add_argument("--workdir", default="/tmp/hf-offload-trl")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from hf_offload.demo import tiny_checkpoint

    model = str(tiny_checkpoint(work / "tiny", num_hidden_layers=2))
    data = write_data(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(work)])}
    for name, command in commands(model, data, work).items():
        if name not in args.only.split(","):
            continue
        out = work / name
        if name != "orpo":
            command = [*command, "--model_name_or_path", model, "--output_dir", str(out), *COMMON]
        launch = [sys.executable, "-m", "hf_offload", "launch", "--lora_r", "4", "--lora_alpha", "8", "--", *command]
        start = time.perf_counter()
        done = subprocess.run(launch, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - start
        (work / f"{name}.log").write_text(done.stdout + done.stderr)
        line = last_training_line(done.stdout + done.stderr)
        saved = (out / "adapter_model.safetensors").is_file()
        offload = {k: v for k, v in line.items() if "offload/" in k}
        metrics = offload or "no offload metrics"
        print(f"{name}: exit {done.returncode}, {wall:.0f} s, adapter saved: {saved}, {metrics}")
        if done.returncode != 0:
            print("   " + "\n   ".join((done.stderr or done.stdout).strip().splitlines()[-4:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
