"""Host store build rate, old encoders against new, side by side in one run, on one decoder layer.

Packs one Llama decoder layer (Llama-3.1-8B widths by default: hidden 4096, intermediate 14336, 32 heads, 8 kv
heads, bf16) into a host store buffer with each codec, once with the encoders of hf_offload 0.1.0 (bitsandbytes'
own CPU functions on the calling thread) and once with the current ones (`engine/nf4_encode.py`), alternating, and
prints the rate in MB of bf16 checkpoint bytes per second (wall clock and per CPU second) and whether both produced
the same buffer bytes.

    python tools/store_build_rate.py                      # nf4, int8 and dense, 3 rounds
    python tools/store_build_rate.py --codecs nf4 --rounds 5 --hidden 1024 --intermediate 3584   # smaller
    python tools/store_build_rate.py --codecs nf4 --cache-layers 2    # also: restart from a store cache vs packing

With --cache-layers N, it then builds an N-layer store three times with the current encoders: without a cache,
with an empty `store_cache` directory (pack, then write the cache), and again (a restart: map the cache), and
prints the three times. The cache directory is a temporary one, deleted at the end.

Memory: about three copies of one layer (~1.3 GB at 8B widths).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's hf_offload
from hf_offload.engine.quant import Int8RowwiseCodec, NF4Codec, make_codec
from hf_offload.engine.store import pack_layer


class NF4Codec010(NF4Codec):
    """hf_offload 0.1.0's nf4 encoder: bitsandbytes' quantize_4bit."""

    def encode(self, weight):
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(
            weight.detach().reshape(-1), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        return [packed.reshape(-1), state.absmax, state.state2.absmax], {"offset": float(state.offset)}


class Int8Codec010(Int8RowwiseCodec):
    """hf_offload 0.1.0's int8 encoder: bitsandbytes' int8_vectorwise_quant."""

    def encode(self, weight):
        import bitsandbytes.functional as F

        codes, row_absmax, _ = F.int8_vectorwise_quant(weight.detach().contiguous(), threshold=0.0)
        return [codes, row_absmax / 127.0], {}


def make_layer(args) -> torch.nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=1,
    )
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=0)
    layer.to_empty(device="cpu").to(torch.bfloat16)
    torch.manual_seed(0)
    for param in layer.parameters():
        param.data.normal_(0, 0.02)
        param.requires_grad_(False)
    return layer


def fresh_copy(layer: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`layer` with its weights restored (packing rebinds and frees them)."""
    for name, param in layer.named_parameters():
        param.data = weights[name].clone()
    return layer


def time_pack(layer, codec) -> tuple[float, float, torch.Tensor]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    pack = pack_layer(0, layer, pin=lambda _: False, codec=codec)
    return time.perf_counter() - wall0, time.process_time() - cpu0, pack.host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", nargs="+", default=["nf4", "int8", "dense"], choices=["nf4", "int8", "dense"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--cache-layers", type=int, default=0, help="also time a store cache restart (N layers)")
    parser.add_argument("--cache-dir", default=None, help="where to put the temporary cache (default: the system's)")
    args = parser.parse_args()

    layer = make_layer(args)
    weights = {name: p.data.clone() for name, p in layer.named_parameters()}
    nbytes = sum(w.nbytes for w in weights.values())
    import hf_offload

    print(f"hf_offload from {os.path.dirname(hf_offload.__file__)}; torch threads {torch.get_num_threads()}")
    print(f"one layer: {nbytes / 1e6:.0f} MB of bf16 weights")
    old_codecs = {"nf4": NF4Codec010, "int8": Int8Codec010, "dense": lambda: None}
    for name in args.codecs:
        new_codec = make_codec(None if name == "dense" else name)
        rates: dict[str, list[tuple[float, float]]] = {"0.1.0": [], "new": []}
        same = True
        for _ in range(args.rounds):  # alternate, so load from other processes hits both alike
            buffers = []
            for label, codec in (("0.1.0", old_codecs[name]()), ("new", new_codec)):
                wall, cpu, host = time_pack(fresh_copy(layer, weights), codec)
                rates[label].append((nbytes / wall / 1e6, nbytes / max(cpu, 1e-9) / 1e6))
                buffers.append(host)
            same &= torch.equal(buffers[0], buffers[1])
        old, new = (statistics.median(r[0] for r in rates[k]) for k in ("0.1.0", "new"))
        old_cpu, new_cpu = (statistics.median(r[1] for r in rates[k]) for k in ("0.1.0", "new"))
        print(
            f"{name:>5}: 0.1.0 {old:7.0f} MB/s ({old_cpu:.0f} MB/cpu-s)   new {new:7.0f} MB/s ({new_cpu:.0f} MB/cpu-s)"
            f"   x{new / old:.1f} wall   same bytes: {same}   (median of {args.rounds})"
        )
    del layer
    for name in args.codecs if args.cache_layers else ():
        time_cache_restart(args, weights, name)


def time_cache_restart(args, weights: dict[str, torch.Tensor], codec_name: str) -> None:
    """Build an N-layer store without a cache, with an empty cache (pack + write), and from the cache (map)."""
    import shutil
    import tempfile

    from hf_offload.engine import store_cache
    from hf_offload.engine.store import HostStore, StoreCache

    layers = torch.nn.ModuleList(make_layer(args) for _ in range(args.cache_layers))
    nbytes = sum(w.nbytes for w in weights.values()) * len(layers)
    directory = tempfile.mkdtemp(prefix="store-cache-", dir=args.cache_dir)
    codec = None if codec_name == "dense" else codec_name
    try:
        for label, cache in (
            ("pack, no cache", None),
            ("pack + write cache", StoreCache(directory, {"name_or_path": "tools/store_build_rate"})),
            ("restart: map cache", StoreCache(directory, {"name_or_path": "tools/store_build_rate"})),
        ):
            for layer in layers:
                fresh_copy(layer, weights)
            wall0 = time.perf_counter()
            built = HostStore.build(
                layers, pin=lambda _: False, show_progress=False, codec=make_codec(codec), cache=cache
            )
            wall = time.perf_counter() - wall0
            print(f"{codec_name:>5} {len(layers)} layers ({nbytes / 1e9:.2f} GB bf16): {label:<20} {wall:7.2f} s")
            del built
        files = sum(
            os.path.getsize(os.path.join(directory, store_cache.STORE, f))
            for f in os.listdir(os.path.join(directory, store_cache.STORE))
        )
        print(f"      cache on disk: {files / 1e9:.2f} GB")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
