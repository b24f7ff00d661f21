"""Peak host-memory growth of one LoRA training step on one long sequence, streamed vs ordinary, on the CPU.

Each case (mode x sequence length) runs in a fresh subprocess: build a narrow Llama (2 layers, hidden 128, a 32k
vocabulary) with LoRA, reset the process's peak RSS (Linux `clear_refs`), run one forward + backward, and report the
peak RSS minus the RSS before the step. The subprocess also saves its loss and LoRA gradients; the streamed ones are
compared with the ordinary ones (loss to 1e-5 relative, every gradient to 1e-4 relative).

Usage:
    python tools/long_context_memory.py                      # 4k, 8k, 16k tokens
    python tools/long_context_memory.py --tokens 2048 --loss-chunk-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_case(mode: str, tokens: int, out: str, args: argparse.Namespace) -> dict:
    """One step in this process (the child): returns its measurements and saves its loss and gradients to `out`."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    import hf_offload

    torch.set_num_threads(args.threads)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(tokens, 2048),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch.manual_seed(123)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, lora)
    if mode == "streamed":
        options = dict(loss_chunk_tokens=args.loss_chunk_tokens, mlp_tile_tokens=args.mlp_tile_tokens)
        options["chunked_loss"] = args.chunked_loss
        options = {k: v for k, v in options.items() if v is not None}  # unset: hf_offload's defaults
        hf_offload.enable_layer_streaming(model, hf_offload.OffloadConfig(device="cpu", **options))
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, args.vocab, (1, tokens), generator=generator)
    batch = dict(input_ids=input_ids, labels=input_ids.clone())
    model.train()

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    torch.manual_seed(0)
    loss = model(**batch).loss
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")

    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"loss": loss.detach(), "grads": grads}, out)
    result = {"mode": mode, "tokens": tokens, "peak_growth_mib": (peak - before) / 1024, "seconds": seconds}
    engine = hf_offload.api.get_runtime(model)
    if engine is not None:  # what ran: chunked loss forwards, MLP calls computed in tiles
        result["chunked_forwards"] = engine.chunked_loss.chunked_forwards if engine.chunked_loss else 0
        result["tiled_mlp_calls"] = engine.tiled_mlps.tiled_calls
    return result


def compare(reference: str, streamed: str) -> dict:
    """Relative loss error and the largest relative gradient error of the streamed step against the ordinary one."""
    import torch

    ref, st = torch.load(reference), torch.load(streamed)
    loss_rel = ((st["loss"] - ref["loss"]).abs() / ref["loss"].abs()).item()
    grad_rel = max(((st["grads"][n] - g).norm() / g.norm()).item() for n, g in ref["grads"].items())
    return {"loss_rel": loss_rel, "max_grad_rel": grad_rel, "exact": loss_rel <= LOSS_RTOL and grad_rel <= GRAD_RTOL}


def measure(tokens: int, mode: str, out: str, args: argparse.Namespace) -> dict:
    """Run one case in a fresh Python process and return what it reported."""
    command = [sys.executable, __file__, "--child", mode, "--out", out, "--tokens", str(tokens), *_shared(args)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # glibc serves blocks above this from their own mappings and unmaps them when freed, so the RSS follows the live
    # tensors (with its default, growing threshold, freed blocks of up to 32 MiB stay in the heap and in the RSS).
    env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} at {tokens} tokens failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shared(args: argparse.Namespace) -> list[str]:
    shared = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--layers", str(args.layers)]
    shared += ["--threads", str(args.threads)]
    if args.loss_chunk_tokens is not None:
        shared += ["--loss-chunk-tokens", str(args.loss_chunk_tokens)]
    if args.mlp_tile_tokens is not None:
        shared += ["--mlp-tile-tokens", str(args.mlp_tile_tokens)]
    shared += ["--chunked-loss" if args.chunked_loss else "--no-chunked-loss"]
    return shared


def run(args: argparse.Namespace) -> list[dict]:
    """Every length, ordinary then streamed; one row per length with both peaks, their ratio and the parity."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in args.tokens:
            paths = {mode: os.path.join(tmp, f"{mode}-{tokens}.pt") for mode in ("ordinary", "streamed")}
            results = {mode: measure(tokens, mode, path, args) for mode, path in paths.items()}
            row = {
                "tokens": tokens,
                "ordinary_mib": results["ordinary"]["peak_growth_mib"],
                "streamed_mib": results["streamed"]["peak_growth_mib"],
                "ordinary_s": results["ordinary"]["seconds"],
                "streamed_s": results["streamed"]["seconds"],
                "chunked_forwards": results["streamed"].get("chunked_forwards"),
                "tiled_mlp_calls": results["streamed"].get("tiled_mlp_calls"),
            }
            row["ratio"] = row["streamed_mib"] / row["ordinary_mib"]
            row.update(compare(paths["ordinary"], paths["streamed"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loss-chunk-tokens", type=int, default=None, help="None: hf_offload's default")
    parser.add_argument("--mlp-tile-tokens", type=int, default=None, help="None: hf_offload's default")
    parser.add_argument(
        "--chunked-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="streamed step with the chunked loss (default) or without it (to see what it saves)",
    )
    parser.add_argument("--child", choices=("ordinary", "streamed"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, args.tokens[0], args.out, args)))
        return
    rows = run(args)
    print()
    header = ["tokens", "ordinary peak growth (MiB)", "streamed peak growth (MiB)", "ratio", "loss rel. err"]
    print("| " + " | ".join([*header, "max grad rel. err"]) + " |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['ordinary_mib']:.0f} | {r['streamed_mib']:.0f} | {r['ratio']:.3f} | "
            f"{r['loss_rel']:.1e} | {r['max_grad_rel']:.1e} |"
        )


if __name__ == "__main__":
    main()
