"""Evaluation batch by batch against layer-major, side by side: eval tokens/s, layers loaded and bytes moved.

    python -m hf_offload.commands.bench.eval_schedule --preset small --batches 16 --batch 1 --seq 32

Both schedules evaluate the same batches with the same streamed model (random weights, LoRA, eval mode), their
timed runs alternating (fair on a shared machine); the median run of each is reported, with the streaming counters
of one run (`layer_loads`, `bytes_to_device`, and the hidden-state bytes parked in host memory by layer-major on an
accelerator), and the largest difference between the two schedules' losses (0 expected: the same operations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ... import api
from ...config import OffloadConfig
from ...evaluation import evaluate_layer_major
from .measure import synchronize
from .methods import add_lora
from .models import PRESETS, build_model, load_config, random_batch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compare(
    preset: str = "small",
    batches: int = 16,
    batch: int = 1,
    seq: int = 32,
    group_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    repeats: int = 3,
    layers: int | None = None,
) -> dict:
    """Evaluate `batches` random batches both ways; returns {"settings", "rows", "max_loss_difference"}.

    Args:
        preset: A model shape of `hf-offload bench` (`tiny`, `small`, `8b`, ...).
        batches, batch, seq: Eval batches, sequences per batch, tokens per sequence.
        group_size: Layer-major batches per group (None: planned from memory).
        device, dtype: Where layers compute (default: cuda if present, else cpu) and the model dtype (default: fp32
            on the CPU, bf16 on an accelerator).
        repeats: Timed runs of each schedule (after one untimed run of each).
        layers: Override the preset's number of decoder layers.

    Returns:
        A JSON-ready dict: one row per schedule with seconds, tokens_per_s, layer_loads, bytes_to_device,
        activation_bytes, and the settings.
    """
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_ = DTYPES[dtype or ("fp32" if target.type == "cpu" else "bf16")]
    config = load_config(preset, None, layers)
    model = build_model(config, dtype_, target)
    setup = argparse.Namespace(lora_r=8, seed=0)
    model = add_lora(model, setup)
    api.enable_layer_streaming(model, OffloadConfig(device=target, show_progress=False, check_host_memory=False))
    model.eval()
    data = [random_batch(config.vocab_size, batch, seq, target, seed=k) for k in range(batches)]

    def batch_major():
        with torch.no_grad():
            return [model(**b).loss for b in data]

    def layer_major():
        return list(evaluate_layer_major(model, data, forward=lambda m, b: m(**b).loss, group_size=group_size))

    schedules = {"batch-major": batch_major, "layer-major": layer_major}
    times: dict[str, list[float]] = {name: [] for name in schedules}
    counters: dict[str, dict] = {}
    losses: dict[str, list[float]] = {}
    for repeat in range(repeats + 1):
        for name, run in schedules.items():
            api.reset_stats(model)
            synchronize(target)
            start = time.perf_counter()
            result = run()
            synchronize(target)
            if repeat:  # the first run of each warms up
                times[name].append(time.perf_counter() - start)
            counters[name] = api.stats(model)
            losses[name] = [float(loss) for loss in result]
    tokens = batches * batch * seq
    rows = []
    for name in schedules:
        seconds = statistics.median(times[name])
        stats = counters[name]
        rows.append(
            {
                "schedule": name,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "layer_loads": stats["layer_loads"],
                "bytes_to_device": stats["bytes_to_device"],
                "activation_bytes": stats["bytes_to_host"] + stats["bytes_from_host_activations"],
            }
        )
    difference = max(abs(a - b) for a, b in zip(losses["batch-major"], losses["layer-major"]))
    settings = dict(
        preset=preset,
        layers=config.num_hidden_layers,
        device=str(target),
        dtype=str(dtype_).removeprefix("torch."),
        batches=batches,
        batch=batch,
        seq=seq,
        group_size=group_size,
        repeats=repeats,
        threads=torch.get_num_threads(),
        host_store_bytes=api.summary(model)["host_store_bytes"],
    )
    return {"settings": settings, "rows": rows, "max_loss_difference": difference}


def table(result: dict) -> str:
    header = ("schedule", "seconds", "tokens/s", "layer loads", "GB to device", "act. GB")
    lines = ["{:<12} {:>9} {:>10} {:>12} {:>13} {:>8}".format(*header)]
    for row in result["rows"]:
        lines.append(
            f"{row['schedule']:<12} {row['seconds']:>9.3f} {row['tokens_per_s']:>10.1f} {row['layer_loads']:>12} "
            f"{row['bytes_to_device'] / 1e9:>13.4f} {row['activation_bytes'] / 1e9:>8.4f}"
        )
    batch_major, layer_major = result["rows"]
    lines.append(
        f"layer-major / batch-major: {layer_major['tokens_per_s'] / batch_major['tokens_per_s']:.2f}x tokens/s, "
        f"{batch_major['bytes_to_device'] / max(layer_major['bytes_to_device'], 1):.1f}x fewer bytes to the device; "
        f"largest loss difference {result['max_loss_difference']:.3g}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hf_offload.commands.bench.eval_schedule", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--layers", type=int, help="override the preset's number of decoder layers")
    parser.add_argument("--batches", type=int, default=16, help="eval batches (default: 16)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch (default: 1)")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence (default: 32)")
    parser.add_argument("--group-size", type=int, help="layer-major batches per group (default: planned from memory)")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each schedule (default: 3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    for name in ("batches", "batch", "seq", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} should be at least 1, not {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = compare(
        args.preset,
        args.batches,
        args.batch,
        args.seq,
        args.group_size,
        args.device,
        args.dtype,
        args.repeats,
        args.layers,
    )
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
