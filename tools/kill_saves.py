"""Kill hf_offload's saves at random moments (SIGKILL) and check that nothing is lost.

Two kinds of trials, each in a forked child that saves in a loop while the parent kills it after a random delay:
- `merged`: `hf_offload.integrations.hub.save_merged` of a streamed LoRA model, rewritten again and again into one
  directory.
  After each kill the directory must load with `AutoModelForCausalLM.from_pretrained` (the previous export or the
  new one).
- `checkpoint`: a streamed `OffloadTrainer` run saving a checkpoint every step. After each kill,
  `resume_from_checkpoint=True` must pick a complete checkpoint (adapter, optimizer and trainer state readable).

Usage:
    python tools/kill_saves.py --kind merged --trials 20
    python tools/kill_saves.py --kind checkpoint --trials 20
Prints one line per trial and a summary; exits 1 if any trial lost the export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's hf_offload


def tiny_lora_model(seed: int = 0, layers: int = 4, hidden: int = 64):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    config_lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config_lora)


def _kill_after(child: int, delay: float) -> None:
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)


def merged_trials(trials: int, seed: int, workdir: str) -> list[dict]:
    """Kill a loop of merged exports; after each kill the export directory must load."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_offload
    from hf_offload.integrations.hub import save_merged

    model = tiny_lora_model()
    hf_offload.enable_layer_streaming(model, hf_offload.OffloadConfig(device="cpu"))
    target = os.path.join(workdir, "merged")
    start = time.perf_counter()
    save_merged(model, target, max_shard_size="40kB")  # several shards: a save has many moments to die in
    one_save = time.perf_counter() - start
    rng = random.Random(seed)
    results = []
    for trial in range(trials):
        child = os.fork()
        if child == 0:  # the child rewrites the export forever, with other adapter weights each time
            try:
                for k in range(1, 10**9):
                    with torch.no_grad():
                        for name, p in model.named_parameters():
                            if "lora_B" in name:
                                p.add_(0.01 * k)
                    save_merged(model, target, max_shard_size="40kB")
            finally:
                os._exit(0)
        delay = rng.uniform(0, 3 * one_save)
        _kill_after(child, delay)
        try:
            AutoModelForCausalLM.from_pretrained(target)
            ok, error = True, ""
        except Exception as err:  # what a user would see: any failure to load is a loss
            ok, error = False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        results.append({"trial": trial, "delay_s": round(delay, 4), "loadable": ok, "error": error})
    return results


def checkpoint_trials(trials: int, seed: int, workdir: str) -> list[dict]:
    """Kill a run that checkpoints every step; after each kill the newest complete checkpoint must be readable."""
    import torch
    from datasets import Dataset
    from safetensors.torch import load_file

    from hf_offload import OffloadTrainer, OffloadTrainingArguments
    from hf_offload.integrations.resume import newest_complete_checkpoint

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (64, 12), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    rng = random.Random(seed)
    results = []
    for trial in range(trials):
        out = os.path.join(workdir, f"run-{trial}")
        child = os.fork()
        if child == 0:
            try:
                args = OffloadTrainingArguments(
                    output_dir=out,
                    layer_streaming=True,
                    max_steps=10**6,
                    save_strategy="steps",
                    save_steps=1,
                    per_device_train_batch_size=4,
                    report_to="none",
                    use_cpu=True,
                    disable_tqdm=True,
                    optim="adamw_torch",
                    offload_lora_r=4,
                )
                OffloadTrainer(model=tiny_lora_model().get_base_model(), args=args, train_dataset=data).train()
            finally:
                os._exit(0)
        # wait for the first complete checkpoint, then kill at a random moment of the following saves
        deadline = time.time() + 120
        while newest_complete_checkpoint(out)[0] is None and time.time() < deadline:
            time.sleep(0.01)
        delay = rng.uniform(0, 0.5)
        _kill_after(child, delay)
        names = sorted(os.listdir(out), key=lambda n: int(n.split("-")[1]) if n.startswith("checkpoint-") else -1)
        newest = os.path.join(out, names[-1]) if names else None
        chosen, skipped = newest_complete_checkpoint(out)
        ok, error = chosen is not None, ""
        try:
            load_file(os.path.join(chosen, "adapter_model.safetensors"))
            torch.load(os.path.join(chosen, "optimizer.pt"), weights_only=True)
            with open(os.path.join(chosen, "trainer_state.json")) as f:
                json.load(f)
        except Exception as err:
            ok, error = False, f"{type(err).__name__}: {err}"
        results.append(
            {
                "trial": trial,
                "delay_s": round(delay, 4),
                "killed_mid_checkpoint": bool(skipped),
                "newest_dir": os.path.basename(newest or ""),
                "resumes_from": os.path.basename(chosen or ""),
                "ok": ok,
                "error": error,
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["merged", "checkpoint"], required=True)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        run = merged_trials if args.kind == "merged" else checkpoint_trials
        results = run(args.trials, args.seed, workdir)
    for r in results:
        print(json.dumps(r))
    good = sum(r.get("loadable", r.get("ok")) for r in results)
    extra = ""
    if args.kind == "checkpoint":
        extra = f", {sum(r['killed_mid_checkpoint'] for r in results)} killed mid-checkpoint"
    seconds = time.perf_counter() - start
    print(f"{args.kind}: {good}/{len(results)} trials left a loadable export{extra} ({seconds:.1f} s)")
    return 0 if good == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
