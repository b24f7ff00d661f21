"""Kill hf_offload's saves at random moments (SIGKILL) and check that nothing is lost.

Three kinds of trials, each in a forked child that saves in a loop while the parent kills it after a random delay:
- `merged`: `hf_offload.integrations.hub.save_merged` of a streamed LoRA model, rewritten again and again into one
  directory.
  After each kill the directory must load with `AutoModelForCausalLM.from_pretrained` (the previous export or the
  new one).
- `checkpoint`: a streamed `OffloadTrainer` run saving a checkpoint every step. After each kill,
  `resume_from_checkpoint=True` must pick a complete checkpoint (adapter, optimizer and trainer state readable).
- `final`: a trained `OffloadTrainer`'s final save (`trainer.save_model()`) into its output directory, numbered
  saves again and again. After each kill the directory must hold one save whole, old or new, that peft loads, with
  the checkpoint and the user's file beside it untouched (see `final_trials`).

Usage:
    python tools/kill_saves.py --kind merged --trials 20
    python tools/kill_saves.py --kind checkpoint --trials 20
    python tools/kill_saves.py --kind final --trials 30
Prints one line per trial and a summary; exits 1 if any trial lost the export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import random
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's hf_offload


def tiny_lora_model(seed: int = 0, layers: int = 4, hidden: int = 64):
    from peft import LoraConfig, get_peft_model

    model = tiny_base_model(seed, layers, hidden)
    config_lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config_lora)


def tiny_base_model(seed: int = 0, layers: int = 4, hidden: int = 64):
    import torch
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
    return LlamaForCausalLM(config)


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
    from safetensors.torch import load_file

    from hf_offload import OffloadTrainer, OffloadTrainingArguments
    from hf_offload.integrations.resume import newest_complete_checkpoint

    data = _tiny_dataset()
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


def _tiny_dataset():
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (64, 12), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def final_trials(trials: int, seed: int, workdir: str) -> list[dict]:
    """Kill a loop of a Trainer's final saves into its output directory (`trainer.save_model()`).

    Each save is numbered: every LoRA B matrix starts with the number, and `run_name` in training_args.bin ends with
    it, so a directory holding files of two saves shows it. After each kill the directory is read as it was left
    (`mixed_before_finish`: weights and arguments of different saves), then after `finish_staged_save`, which the next
    save or training run does: it must hold one save whole, old or new, that peft loads; the checkpoint and the
    user's file beside it must be untouched.
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from hf_offload import OffloadTrainer, OffloadTrainingArguments
    from hf_offload.integrations import atomic

    out = os.path.join(workdir, "out")
    args = OffloadTrainingArguments(
        output_dir=out,
        layer_streaming=True,
        max_steps=1,
        save_strategy="no",
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        optim="adamw_torch",
        offload_lora_r=4,
    )
    trainer = OffloadTrainer(model=tiny_base_model(), args=args, train_dataset=_tiny_dataset())
    trainer.train()
    keep = {os.path.join(out, "notes.txt"): b"the user's", os.path.join(out, "checkpoint-7", "optimizer.pt"): b"x"}
    for path, content in keep.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]

    def save(number: int) -> None:
        with torch.no_grad():
            for p in lora_b:
                p.view(-1)[0] = number
        trainer.args.run_name = f"save-{number}"
        trainer.save_model()

    def numbers() -> tuple[int, int]:  # (the save the weights are from, the one training_args.bin is from)
        tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
        weights = {int(t.view(-1)[0]) for n, t in tensors.items() if "lora_B" in n}
        saved_args = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
        return (weights.pop() if len(weights) == 1 else -1), int(saved_args.run_name.split("-")[1])

    start = time.perf_counter()
    save(0)
    one_save = time.perf_counter() - start
    rng = random.Random(seed)
    results = []
    for trial in range(trials):
        first = 1000 * (trial + 1)
        child = os.fork()
        if child == 0:  # the child saves again and again, each save numbered
            try:
                for number in range(first, first + 10**6):
                    save(number)
            finally:
                os._exit(0)
        delay = rng.uniform(0, 3 * one_save)
        _kill_after(child, delay)
        staged = [os.path.join(workdir, n) for n in os.listdir(workdir) if n.startswith(".out.staged-")]
        committed = any(os.path.isfile(os.path.join(d, atomic.COMPLETE_MARKER)) for d in staged)
        moment = "after" if committed else "before" if staged else "between"  # the commit point, or saves
        try:
            weights_before, args_before = numbers()
            finished = atomic.finish_staged_save(out)
            weights, from_args = numbers()
            PeftModel.from_pretrained(tiny_base_model(), out)
            ok = weights == from_args and all(pathlib.Path(p).read_bytes() == c for p, c in keep.items())
            error = "" if ok else f"weights of save {weights}, arguments of save {from_args}"
        except Exception as err:  # what a user would see: any failure to load is a loss
            ok, error, finished, weights_before, args_before = False, f"{type(err).__name__}: {err}", False, -1, -2
        results.append(
            {
                "trial": trial,
                "delay_s": round(delay, 4),
                "loadable": ok,
                "killed": moment,
                "finished_by_next_save": finished,
                "mixed_before_finish": weights_before != args_before,
                "error": error,
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["merged", "checkpoint", "final"], required=True)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        run = {"merged": merged_trials, "checkpoint": checkpoint_trials, "final": final_trials}[args.kind]
        results = run(args.trials, args.seed, workdir)
    for r in results:
        print(json.dumps(r))
    good = sum(r.get("loadable", r.get("ok")) for r in results)
    extra = ""
    if args.kind == "checkpoint":
        extra = f", {sum(r['killed_mid_checkpoint'] for r in results)} killed mid-checkpoint"
    if args.kind == "final":
        extra = (
            ", killed "
            + ", ".join(f"{sum(r['killed'] == m for r in results)} {m}" for m in ("before", "after", "between"))
            + f"; {sum(r['finished_by_next_save'] for r in results)} committed saves finished by the next, "
            f"{sum(r['mixed_before_finish'] for r in results)} mixed before that"
        )
    seconds = time.perf_counter() - start
    print(f"{args.kind}: {good}/{len(results)} trials left a loadable export{extra} ({seconds:.1f} s)")
    return 0 if good == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
