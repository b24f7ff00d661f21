"""`hf-offload bench`: parse the options, run every method side by side in this process, print the results."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import traceback

import torch

from ...engine.facts import bytes_per_train_step
from ...options import add_arguments, add_flag, all_options, values_from
from ...units import parse_dtype
from ..cli import SUBCOMMANDS
from ..model_sizes import measure
from .measure import StepClock, current_peak_rss, memory_peaks, overlap_from_trace, pinned_copy_peak
from .methods import DEFAULT_METHODS, METHODS, Setup
from .models import PRESETS, load_config
from .report import Row, ratios, row_dict, table

MiB = 1 << 20

# The long-context sweep (--long_context): sequence lengths at batch 1, the rows that answer "how long a sequence
# trains, how fast": resident with gradient checkpointing (where it fits), streamed, streamed with the saved
# boundary states in host memory.
LONG_CONTEXT_SEQ_LENS = "32k,64k,128k,256k,512k"
LONG_CONTEXT_METHODS = "resident-checkpointed,hf_offload,hf_offload-activations"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help=SUBCOMMANDS["bench"][1],
        description=(
            "Train LoRA steps on a random-weight model with each method side by side in one process and print "
            "tokens/s, model TFLOP/s (6*N*tokens / step time), step time, host->device GB/s against a plain "
            "pinned copy, copy/compute overlap, peak GPU memory and peak host RSS. Nothing is downloaded."
        ),
    )
    model = parser.add_mutually_exclusive_group()
    add_flag(model, "preset", choices=list(PRESETS), help="model shape (default: tiny on CPU, 8b on CUDA)")
    add_flag(model, "config", help="a transformers config.json instead of a preset")
    add_flag(parser, "layers", type=int, help="override the number of decoder layers (fit a model in memory)")
    add_flag(
        parser,
        "methods",
        help=f"comma-separated, from: {', '.join(METHODS)} (default: all but "
        f"{', '.join(m for m in METHODS if m not in DEFAULT_METHODS)}; with --long_context: {LONG_CONTEXT_METHODS})",
    )
    add_flag(parser, "dtype", help="model dtype: bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    add_flag(parser, "batch", type=int, default=None, help="sequences per step (default: 2 on cpu, 4 on cuda)")
    add_flag(parser, "seq", type=int, default=None, help="tokens per sequence (default: 64 on cpu, 4096 on cuda)")
    add_flag(
        parser,
        "seq_lens",
        help="a sweep: comma-separated sequence lengths (k = 1024: 512,1k or 32k,64k), every method at each, one "
        "table with a row per length and method (batch 1 unless --batch; a method out of device memory at one "
        "length is skipped at the longer ones)",
    )
    add_flag(
        parser,
        "long_context",
        action="store_true",
        help=f"GPU only: the long-context sweep, --seq_lens {LONG_CONTEXT_SEQ_LENS} at batch 1 with methods "
        f"{LONG_CONTEXT_METHODS} (default model: the 8b preset), without the profiled step. Refused on the CPU: "
        "pass --seq_lens with short lengths there for a scaled-down sweep",
    )
    add_arguments(parser, all_options(), "bench")
    add_flag(
        parser,
        "deepspeed_optimizer",
        choices=["deepspeed", "torch"],
        default="deepspeed",
        help="deepspeed-zero3-offload: DeepSpeedCPUAdam (the default; compiled on first use) or torch AdamW",
    )
    add_flag(parser, "warmup", type=int, default=1, help="untimed steps per method (default: 1)")
    add_flag(parser, "steps", type=int, default=3, help="timed steps per method, median reported (default: 3)")
    add_flag(parser, "no_profile", action="store_true", help="CUDA: skip the profiled step (no overlap columns)")
    add_flag(
        parser,
        "order",
        choices=["auto", "interleaved", "sequential"],
        default="auto",
        help="interleaved: all models built at once, their steps alternating (fair on a shared machine; peak memory "
        "not per method); sequential: one method after the other. auto: interleaved on cpu, sequential on cuda",
    )
    add_flag(parser, "threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_flag(parser, "json", action="store_true", help="print one JSON document instead of the table")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)  # main() also runs in-process (tests): leave the process as it was


def _main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("hf-offload bench: --device cuda, but torch sees no CUDA device.")
        device = torch.device("cuda", torch.cuda.current_device())
    on_cpu = device.type == "cpu"
    seq_lens = _sweep_lengths(args, on_cpu)
    if args.long_context:
        args.no_profile = True  # a profiled step of 512k tokens: a trace of minutes, for columns the sweep omits
    chosen = args.methods if args.methods is not None else LONG_CONTEXT_METHODS if args.long_context else None
    methods = DEFAULT_METHODS if chosen is None else [m.strip() for m in chosen.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"hf-offload bench: unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    if len(set(methods)) != len(methods):
        raise SystemExit(f"hf-offload bench: --methods names a method twice ({chosen}); name each once.")
    for name in ("batch", "seq", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"hf-offload bench: --{name} should be at least 1, but the value passed is {value}")
    if args.warmup < 0:
        raise SystemExit(f"hf-offload bench: --warmup should be non-negative, but the value passed is {args.warmup}")
    try:
        values_from(args, all_options(), "bench")
    except ValueError as err:
        raise SystemExit(f"hf-offload bench: {err}") from None
    try:
        dtype = parse_dtype(args.dtype or ("fp32" if on_cpu else "bf16"))
    except ValueError as err:
        raise SystemExit(f"hf-offload bench: --dtype {err}") from None

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = args.preset or (None if args.config else ("tiny" if on_cpu else "8b"))
    try:
        config = load_config(preset, args.config, args.layers)
        facts = measure(config, dtype)
    except ValueError as err:  # ConfigError, UnsupportedModelError
        raise SystemExit(f"hf-offload bench: {err}") from err
    lengths = seq_lens or [args.seq or (64 if on_cpu else 4096)]
    if seq_lens:  # rotary tables and position checks cover the longest sequence
        config.max_position_embeddings = max(getattr(config, "max_position_embeddings", 0) or 0, max(seq_lens))
    setups = [
        Setup(
            config=config,
            facts=facts,
            dtype=dtype,
            device=device,
            batch=args.batch or (1 if seq_lens else 2 if on_cpu else 4),
            seq=length,
            lora_r=args.lora_r,
            prefetch=args.prefetch,
            offload_activations=args.offload_activations,
            deepspeed_optimizer=args.deepspeed_optimizer,
        )
        for length in lengths
    ]
    setup = setups[0]
    model_bytes = sum(facts.layer_bytes) + facts.resident_bytes
    document = {
        "command": "hf-offload bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
        "machine": machine(device),
        "model": {
            "preset": preset,
            "config": args.config,
            "model_type": config.model_type,
            "layers": len(facts.layer_bytes),
            "hidden_size": facts.hidden,
            "parameters": facts.total_params,
            "active_parameters": round(facts.compute_params),
            "bytes": model_bytes,
            "max_layer_bytes": max(facts.layer_bytes),
        },
        "settings": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "batch": setup.batch,
            "seq": setup.seq,
            "tokens_per_step": setup.tokens,
            "seq_lens": seq_lens,
            "lora_r": setup.lora_r,
            "methods": methods,
            "prefetch": setup.prefetch,
            "offload_activations": setup.offload_activations,
            "warmup": args.warmup,
            "steps": args.steps,
            "order": args.order if args.order != "auto" else ("interleaved" if on_cpu else "sequential"),
        },
        "flops_formula": "model TFLOP/s = 6 * N * tokens_per_step / step_time / 1e12, N = "
        + ("active parameters per token (MoE)" if facts.compute_params < facts.total_params else "parameters"),
        "flops_parameters": round(facts.compute_params),
        "h2d_peak_gbps": None,
    }
    say = lambda text: print(text, file=sys.stderr if args.json else sys.stdout, flush=True)
    say(header(document))

    if device.type == "cuda":
        size = min(max(max(facts.layer_bytes), 64 * MiB), 1024 * MiB)
        document["h2d_peak_gbps"] = pinned_copy_peak(device, size)
        document["h2d_peak_copy_bytes"] = size
        say(f"pinned host->device copy peak: {document['h2d_peak_gbps']:.1f} GB/s ({size / MiB:.0f} MiB copies)")

    order = document["settings"]["order"]
    peak = document["h2d_peak_gbps"]
    rows: list[Row] = []
    out_of_memory: dict[str, int] = {}  # method -> the length at which it ran out of device memory
    document["ratios"], by_seq = {}, {}
    for step_setup in setups:
        length_rows = run_methods(methods, step_setup, args, model_bytes, peak, order, out_of_memory)
        if seq_lens:
            for row in length_rows:
                row.seq = step_setup.seq
                if row.status == "oom":
                    out_of_memory.setdefault(row.method, step_setup.seq)
        suffix = f" at seq {step_setup.seq}" if seq_lens else ""
        document["ratios"].update((key + suffix, value) for key, value in ratios(length_rows).items())
        by_seq[step_setup.seq] = performance_model(step_setup, length_rows, document["h2d_peak_gbps"])
        rows += length_rows
    if order == "interleaved" and any(METHODS[m].interleavable for m in methods):
        document["process_peak_host_rss_bytes"] = current_peak_rss()
    document["rows"] = [row_dict(r) for r in rows]
    document["performance_model"] = by_seq[setups[-1].seq]
    if seq_lens:
        document["performance_model_by_seq"] = by_seq

    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print()
        print(table(rows))
        print()
        print(footer(document, rows))
    return 1 if any(r.status == "error" for r in rows) else 0


def run_methods(
    methods: list[str],
    setup: Setup,
    args,
    model_bytes: int,
    h2d_peak: float | None,
    order: str,
    out_of_memory: dict[str, int],
) -> list[Row]:
    """Every method at `setup`'s batch and length, in `methods` order; a method in `out_of_memory` (it ran out of
    device memory at a shorter length of the sweep) is skipped."""
    rows: dict[str, Row] = {}
    for name, length in out_of_memory.items():
        if name in methods:
            reason = f"out of device memory at seq {length:,} already"
            rows[name] = Row(method=name, status="skipped", reason=reason)
    where = f" at seq {setup.seq:,}" if args.seq_lens or args.long_context else ""
    together = [m for m in methods if METHODS[m].interleavable and m not in rows] if order == "interleaved" else []
    if together:
        print(f"[bench] interleaved{where}: {', '.join(together)} ...", file=sys.stderr, flush=True)
        rows.update((r.method, r) for r in run_interleaved(together, setup, args, model_bytes, h2d_peak))
    for name in methods:
        if name not in rows:
            print(f"[bench] {name}{where} ...", file=sys.stderr, flush=True)
            rows[name] = run_sequential(name, setup, args, model_bytes, h2d_peak)
    for name in methods:
        row = rows[name]
        print(f"[bench] {name}{where}: {row.status}" + (f" ({row.reason})" if row.reason else ""), file=sys.stderr)
    return [rows[m] for m in methods]


def _sweep_lengths(args, on_cpu: bool) -> list[int] | None:
    """The sequence lengths of a sweep (--seq_lens, --long_context), or None for one run at --seq."""
    if args.long_context:
        if on_cpu:
            raise SystemExit(
                "hf-offload bench: --long_context measures training steps of 32k to 512k tokens on a model of real "
                "width (Llama-3.1-8B by default), which needs a GPU: on a CPU one such step takes hours and far more "
                "memory than the model. For a scaled-down sweep on the CPU pass --seq_lens with short lengths, e.g. "
                "--preset small --seq_lens 512,1k,2k --methods resident-checkpointed,hf_offload,hf_offload-activations"
            )
        if args.seq is not None or args.seq_lens is not None:
            raise SystemExit(
                "hf-offload bench: --long_context sets the sequence lengths itself; drop --seq/--seq_lens, or pass "
                "--seq_lens alone for other lengths."
            )
        return parse_lengths(LONG_CONTEXT_SEQ_LENS)
    if args.seq_lens is None:
        return None
    if args.seq is not None:
        raise SystemExit("hf-offload bench: --seq and --seq_lens both give the sequence length; pass one of them.")
    try:
        return parse_lengths(args.seq_lens)
    except ValueError as err:
        raise SystemExit(f"hf-offload bench: {err}") from None


def parse_lengths(text: str) -> list[int]:
    """`"512,1k,32k"` -> [512, 1024, 32768] (k = 1024).

    Raises:
        ValueError: an empty list, a length that is not a positive integer, or the same length twice.
    """
    lengths = []
    for item in (part.strip().lower() for part in text.split(",")):
        scale = 1024 if item.endswith("k") else 1
        try:
            length = int(item.removesuffix("k")) * scale
        except ValueError:
            length = 0
        if length < 1:
            raise ValueError(
                f"--seq_lens should be positive sequence lengths separated by commas (512,1k,32k), but the value "
                f"passed is {text!r}"
            )
        lengths.append(length)
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"--seq_lens should name each length once, but the value passed is {text!r}")
    return lengths


def run_sequential(name: str, setup: Setup, args, model_bytes: int, h2d_peak: float | None) -> Row:
    """One method alone: build, warm up, time, profile, clean up; its peak memory is its own."""
    method = METHODS[name]
    reason = method.unavailable(setup) or _does_not_fit(name, setup, model_bytes)
    if reason:
        return Row(method=name, status="skipped", reason=reason)
    clock = _clock(setup, args)
    row = Row(method=name, status="ok")
    outcome = None
    with memory_peaks(setup.device) as peaks:
        try:
            outcome = method.run(setup, clock)
        except Exception as err:  # one failing baseline must not lose the other rows
            _failed(row, err)
        finally:
            _release_memory(setup.device)
    row.peak_gpu_bytes, row.peak_host_rss_bytes, row.host_rss_scope = (
        peaks.device_bytes,
        peaks.host_rss_bytes,
        peaks.host_rss_scope,
    )
    return _finish(row, clock, outcome, setup, h2d_peak)


def run_interleaved(names: list[str], setup: Setup, args, model_bytes: int, h2d_peak: float | None) -> list[Row]:
    """All methods set up at once, their steps alternating: step k of every method runs before step k+1 of any.

    On a machine shared with other work, load changes then hit every method alike, so the ratios stay meaningful.
    Peak memory cannot be told apart per method in this mode; the process peak is reported in the footer.
    """
    rows, sessions, clocks, outcomes = {}, {}, {}, {}
    for name in names:
        rows[name] = Row(method=name, status="ok")
        reason = METHODS[name].unavailable(setup) or _does_not_fit(name, setup, model_bytes)
        if reason:
            rows[name].status, rows[name].reason = "skipped", reason
            continue
        clocks[name] = _clock(setup, args)
        try:
            sessions[name] = METHODS[name].prepare(setup, clocks[name])
        except Exception as err:
            _failed(rows[name], err)
    total = max((c.total_steps for c in clocks.values()), default=0)
    for _ in range(total):
        for name in list(sessions):
            clock = clocks[name]
            try:
                clock.begin()
                loss = sessions[name].step()
                clock.end(loss)
            except Exception as err:
                _failed(rows[name], err)
                outcomes[name] = None
                with contextlib.suppress(Exception):
                    sessions.pop(name).close()
    for name, session in sessions.items():
        try:
            outcomes[name] = session.close()
        except Exception as err:
            _failed(rows[name], err)
    _release_memory(setup.device)
    for name in names:
        rows[name].host_rss_scope = "process (interleaved: not per method)"
        _finish(rows[name], clocks.get(name), outcomes.get(name), setup, h2d_peak)
    return [rows[name] for name in names]


def _clock(setup: Setup, args) -> StepClock:
    profile = setup.device.type == "cuda" and not args.no_profile
    return StepClock(setup.device, args.warmup, args.steps, profile=profile)


def _failed(row: Row, err: Exception) -> None:
    if isinstance(err, torch.OutOfMemoryError):
        row.status, row.reason = "oom", f"out of device memory ({str(err).splitlines()[0][:160]})"
        return
    traceback.print_exc()
    message = str(err).splitlines()[0][:200] if str(err) else ""
    row.status, row.reason = "error", f"{type(err).__name__}: {message}"


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _finish(row: Row, clock: StepClock | None, outcome, setup: Setup, h2d_peak: float | None) -> Row:
    if clock is not None:
        row.step_times_s, row.losses = clock.times, clock.losses
    if row.status != "ok" or outcome is None:
        return row
    on_cuda = setup.device.type == "cuda"
    h2d_bytes = outcome.h2d_bytes_per_step
    if clock.trace is not None:
        overlap = overlap_from_trace(clock.trace)
        if overlap is None:
            row.notes.append("the profiled step recorded no GPU activity (CUPTI unavailable?): no overlap columns")
        else:
            row.copy_overlap_share = overlap.copy_overlap_share
            row.copy_hidden_share = overlap.copy_hidden_share
            row.gpu_busy_share = overlap.gpu_busy_share
            row.extra["profiled_step"] = vars(overlap)
            if h2d_bytes is None:
                h2d_bytes = overlap.h2d_bytes  # methods that do not count their copies: from the profile
    elif clock.profile_error:
        row.notes.append(clock.profile_error)
    row.finish(setup.tokens, round(setup.facts.compute_params), h2d_bytes if on_cuda else None, h2d_peak)
    if not on_cuda and h2d_bytes is not None:
        row.extra["weight_bytes_per_step"] = h2d_bytes  # on the CPU a "load" is a memory copy, not a link transfer
    row.notes += outcome.notes
    row.extra.update(outcome.extra)
    return row


def _does_not_fit(name: str, setup: Setup, model_bytes: int) -> str | None:
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        available = None
    on_host = setup.device.type == "cpu" or name != "resident" and name != "resident-checkpointed"
    if on_host and available is not None and model_bytes > 0.95 * available:
        return (
            f"the model needs {model_bytes / 1e9:.1f} GB of host memory, {available / 1e9:.1f} GB available "
            "(use --layers to build a shallower model)"
        )
    activations = offloaded_activation_bytes(name, setup)
    if activations and available is not None and model_bytes + activations > 0.95 * available:
        return (
            f"the model and its offloaded activations need {(model_bytes + activations) / 1e9:.1f} GB of host memory "
            f"({activations / 1e9:.1f} GB of page-locked buffers for the hidden states saved at seq {setup.seq:,}), "
            f"{available / 1e9:.1f} GB available"
        )
    if setup.device.type == "cuda" and name.startswith("resident"):
        free, _ = torch.cuda.mem_get_info(setup.device)
        if model_bytes > free:
            return f"the model ({model_bytes / 1e9:.1f} GB) does not fit in device memory ({free / 1e9:.1f} GB free)"
    return None


def offloaded_activation_bytes(name: str, setup: Setup) -> int:
    """Host bytes the method's offloaded activations take (every layer's saved hidden state), 0 if it keeps them."""
    method = METHODS[name]
    offloads = getattr(method, "offload_activations", False) or (
        setup.offload_activations and name.startswith("hf_offload")
    )
    if not offloads:
        return 0
    return len(setup.facts.layer_bytes) * setup.tokens * setup.facts.hidden * setup.dtype.itemsize


def performance_model(setup: Setup, rows: list[Row], h2d_peak_gbps: float | None) -> dict:
    """The performance model (docs/how-it-works.md) on this run: what the link and the compute each allow.

    Bytes per step: every layer twice but the `prefetch + 1` still in their slots at each end of the step.
    Streaming cannot beat either the time the link needs for those bytes (at the pinned-copy peak) or the time the
    same recompute takes with the model resident (the resident-checkpointed row). Compute covers the transfer from
    `break_even_tokens` tokens/step on.
    """
    model = {"bytes_per_step": bytes_per_train_step(setup.facts.layer_bytes, setup.prefetch)}
    if not h2d_peak_gbps:
        return model
    model["transfer_s"] = model["bytes_per_step"] / (h2d_peak_gbps * 1e9)
    compute = next((r for r in rows if r.method == "resident-checkpointed" and r.step_time_s), None)
    if compute is not None:
        model["compute_s"] = compute.step_time_s
        model["best_step_s"] = max(compute.step_time_s, model["transfer_s"])
        model["break_even_tokens"] = round(setup.tokens * model["transfer_s"] / compute.step_time_s)
    return model


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import psutil

        info["host_memory_bytes"] = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover
        pass
    try:
        import peft
        import transformers

        info["transformers"], info["peft"] = transformers.__version__, peft.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    return info


def _trained(doc: dict) -> str:
    """What the rows train: LoRA adapters, every weight (the full fine-tuning rows), or some of each."""
    methods = doc["settings"].get("methods", [])
    full = [name for name in methods if name.endswith("-full")]
    lora = f"LoRA r={doc['settings']['lora_r']} on all linear layers"
    if not full:
        return lora
    if len(full) == len(methods):
        return "every weight trained (full fine-tuning)"
    return f"{lora} ({', '.join(full)}: every weight trained)"


def header(doc: dict) -> str:
    m, s, hw = doc["model"], doc["settings"], doc["machine"]
    name = m["preset"] or m["config"]
    where = hw.get("gpu", f"CPU only, {hw['cpu_count']} cores, {hw['torch_threads']} torch threads")
    return (
        f"hf-offload bench: {name} ({m['model_type']}, {m['layers']} layers, {m['parameters'] / 1e9:.3g}B parameters, "
        f"{m['bytes'] / 1e9:.3g} GB; largest layer {m['max_layer_bytes'] / 1e6:.1f} MB)\n"
        f"device {s['device']} [{where}], {s['dtype']}, "
        + (
            f"batch {s['batch']} x seq {', '.join(f'{n:,}' for n in s['seq_lens'])} (a sweep)"
            if s["seq_lens"]
            else f"batch {s['batch']} x seq {s['seq']} = {s['tokens_per_step']} tokens/step"
        )
        + f", {_trained(doc)}, prefetch {s['prefetch']}, "
        f"{s['warmup']} warm-up + {s['steps']} timed steps per method (median reported), methods {s['order']}\n"
        f"{doc['flops_formula']} = {doc['flops_parameters']:,}"
    )


def footer(doc: dict, rows: list[Row]) -> str:
    lines = []
    for key, value in doc["ratios"].items():
        lines.append(f"{key}: {value:.3f}x")
    hw = doc["machine"]
    if doc["settings"]["device"] == "cpu" and (hw.get("load_average_1min") or 0) > (hw["cpu_count"] or 1) / 2:
        lines.append(
            f"note: the machine was busy (load average {hw['load_average_1min']:.1f} on {hw['cpu_count']} cores) "
            "when the run started; with several torch threads, spinning threads then slow every method "
            "erratically. Interleaving keeps the ratios fair; --threads 1 keeps them stable."
        )
    models = doc.get("performance_model_by_seq") or {None: doc["performance_model"]}
    for seq, model in models.items():
        line = "performance model" + (f" at seq {seq:,}" if seq is not None else "")
        line += f": {model['bytes_per_step'] / 1e9:.3g} GB of layer weights per step"
        if "transfer_s" in model:
            line += f" = {model['transfer_s']:.3f} s at the pinned peak"
        if "compute_s" in model:
            line += (
                f"; the same recompute with the model resident takes {model['compute_s']:.3f} s, so hf_offload's "
                f"best step is {model['best_step_s']:.3f} s; compute hides the transfer from "
                f"~{model['break_even_tokens']:,} tokens/step"
            )
        lines.append(line)
    for row in rows:
        for note in row.notes:
            lines.append(f"{row.method}" + (f" at seq {row.seq:,}" if row.seq is not None else "") + f": {note}")
    if doc.get("process_peak_host_rss_bytes"):
        lines.append(
            f"peak host RSS of the process (methods interleaved, so not per method): "
            f"{doc['process_peak_host_rss_bytes'] / 1e9:.2f} GB"
        )
    lines.append(
        "columns: step s = median step time (forward+backward+optimizer); H2D GB/s = weight bytes moved "
        "host->device per step / step time (CUDA); % of peak = against the pinned copy above; copy||compute = "
        "share of the profiled step in which a host->device copy ran while a kernel ran; copy hidden = share of "
        "copy time overlapped by compute; GPU busy = share of the step with a kernel running; peak RSS = peak host "
        "resident memory while the method ran, model build included"
    )
    return "\n".join(lines)
