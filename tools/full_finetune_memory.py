"""Host memory of streamed full fine-tuning on the CPU, measured (RSS, anonymous memory) against `hf-offload plan`.

One run builds a Llama of the given size in a fresh process, enables streaming with `full_finetune=True`, trains a
few AdamW steps (torch AdamW, or HostAdamW with `--host-adamw`) and reads /proc/self/status (RssAnon, VmHWM) at
each phase. On the CPU the "device" is host memory too, so the plan's figure to compare with is its host terms
(compute copy, fp32 masters, gradients, AdamW state) plus what the plan puts on the device: the resident modules with
their gradients and AdamW state, the layer slots and one layer's gradients (`expected`). Activations are freed by
the end of a step; the peak (VmHWM) includes them.

Usage (`--trim` calls glibc's malloc_trim after each step, to tell memory glibc keeps from memory in use):
    python tools/full_finetune_memory.py --hidden 1024 --layers 16 --dtype bfloat16
    python tools/full_finetune_memory.py --hidden 1024 --layers 16 --dtype float32 --host-adamw
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's hf_offload, not an installed one


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _anon() -> float:
    return _status_mib("RssAnon")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--host-adamw", action="store_true", help="HostAdamW stepping during backward")
    parser.add_argument("--trim", action="store_true", help="glibc malloc_trim(0) after each step (diagnosis)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    import hf_offload
    from hf_offload.commands.plan import make_plan
    from hf_offload.engine.host_optimizer import HostAdamW

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    plan = make_plan(
        config, dtype=dtype, full_finetune=True, early_layer_steps=args.host_adamw, seq=args.tokens, prefetch=1
    )
    if args.host_adamw:
        assert "early_step_backups" in plan["host_terms"]
    rows: dict[str, float] = {"baseline": _anon()}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    rows["model_built"] = _anon()
    model = hf_offload.enable_layer_streaming(model, hf_offload.OffloadConfig(device="cpu", full_finetune=True))
    rows["streaming_enabled"] = _anon()
    if args.host_adamw:
        optimizer = HostAdamW(model.parameters(), lr=1e-4, threads=args.threads, step_during_backward=lambda: True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(3, args.vocab, (1, args.tokens))
    for step in range(args.steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        rows[f"step{step + 1}_before_zero_grad"] = _anon()
        optimizer.zero_grad()
        if args.trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            rows[f"step{step + 1}_trimmed"] = _anon()
    rows["peak_vmhwm"] = _status_mib("VmHWM")
    mib = 2**20
    gpu = plan["gpu_terms"]
    on_cpu_device = gpu["resident_modules"] + gpu["resident_grads_adamw"] + gpu["layer_slots"] + gpu["layer_gradients"]
    last = rows[f"step{args.steps}_before_zero_grad"]
    measured = last - rows["baseline"]
    expected = (plan["host_bytes"] + on_cpu_device) / mib
    result = {
        "dtype": args.dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "plan_host_terms_mib": {k: round(v / mib, 1) for k, v in plan["host_terms"].items()},
        "plan_host_mib": round(plan["host_bytes"] / mib, 1),
        "plan_device_terms_on_cpu_mib": round(on_cpu_device / mib, 1),
        "expected_mib": round(expected, 1),
        "rss_anon_mib": {k: round(v, 1) for k, v in rows.items()},
        "measured_growth_mib": round(measured, 1),
        "measured_over_expected": round(measured / expected - 1, 4),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
