"""Fast host-side encoding of frozen weights: nf4 and int8 bytes identical to bitsandbytes', on every core.

Packing a host store encodes every linear weight once. bitsandbytes' CPU `quantize_4bit` is a chain of full-size
passes (float copy, abs, max, scale, clamp, a binary search per value, strided packing) on one thread; this module
computes the same bytes with fewer, cheaper passes, in chunks spread over a thread pool (torch kernels release the
GIL). `encode_nf4` returns exactly what `bitsandbytes.functional.quantize_4bit(flat, blocksize=64,
compress_statistics=True, quant_type="nf4")` returns (packed codes, quantized absmax, nested absmax, offset), so the
decode side is unchanged; tests/engine/test_nf4_encode.py checks that bit for bit.

Note: [nf4 codes from a table]
bitsandbytes scales each block of 64 values by the reciprocal of its absmax, in float32: `s = x * (1 / max(absmax,
1e-38))`, and gives the value the code `bucketize(clamp(s, -1, 1), bounds)`: the count of the 15 midpoints between
consecutive nf4 levels that are strictly below `s`. Here `s` is computed with the same float32 operations (the same
bits), and the count is read from two tables indexed by the top 16 bits of `s`. Those bits fix an interval of
float32 values; for each interval, `_LOW` holds the count of bounds below all of it and `_INSIDE` the one bound
inside it (+inf when none; no interval holds two, which `_tables` checks). So the count is
`_LOW[top] + (s > _INSIDE[top])`, exact for every finite `s`: a bound below the interval is below `s`, a bound above
it is above `s`, and the one inside is compared with `s` itself. Clamping changes no count (every bound lies
in (-1, 1)), so it is skipped. A chunk holding a non-finite value (its `s` may be NaN) is encoded with bitsandbytes'
own formula instead, NaN handling included. The nested quantization of the absmax (1/64 of the values) is left to
bitsandbytes itself, on the same absmax tensor.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import compat

BLOCKSIZE = 64  # values per absmax (QLoRA's choice)
NESTED_BLOCKSIZE = 256  # absmax values per float32 scale (bitsandbytes' fixed choice for double quantization)
CHUNK = 1 << 20  # values per task: large enough that per-op overhead is small, small enough to stay in cache


@functools.cache
def _tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(_LOW, _INSIDE, bounds): see Note: [nf4 codes from a table]."""
    import bitsandbytes.functional as F

    code = F.get_4bit_type("nf4", device="cpu").float()
    if not bool((code[1:] > code[:-1]).all()):
        raise RuntimeError(f"hf_offload: bitsandbytes' nf4 code map is not sorted (bitsandbytes {_bnb_version()})")
    bounds = (code[:-1] + code[1:]) / 2  # as bitsandbytes computes them (its nf4 order is the identity)
    top = torch.arange(1 << 16, dtype=torch.int64)
    first = (top << 16).to(torch.int32).view(torch.float32)  # the interval's two end bit patterns
    last = ((top << 16) | 0xFFFF).to(torch.int32).view(torch.float32)
    low_end, high_end = torch.minimum(first, last), torch.maximum(first, last)  # negative floats run backwards
    finite = low_end.isfinite() & high_end.isfinite()
    inside = (bounds >= low_end[:, None]) & (bounds <= high_end[:, None]) & finite[:, None]
    if int(inside.sum(dim=1).max()) > 1:
        raise RuntimeError(f"hf_offload: two nf4 bounds share a 16-bit prefix (bitsandbytes {_bnb_version()})")
    inside_bound = torch.where(inside.any(dim=1), (inside * bounds).sum(dim=1), torch.tensor(float("inf")))
    below = torch.where(finite, torch.bucketize(low_end, bounds), 0).to(torch.uint8)
    return below, inside_bound.float(), bounds


def _nf4_codes(x: torch.Tensor, absmax_out: torch.Tensor) -> torch.Tensor:
    """4-bit codes (one uint8 each) of the contiguous values `x` (a multiple of 64), writing each block's absmax."""
    below, inside, bounds = _tables()
    blocks = x.view(-1, BLOCKSIZE)
    absmax_out.copy_(blocks.abs().amax(dim=1))  # max is exact: the same values as bitsandbytes' float32 max
    scale = (1.0 / absmax_out.clamp(min=1e-38)).view(-1, 1)  # bitsandbytes' expression: same reciprocal bits
    scaled = torch.mul(blocks, scale).view(-1)  # float32 whatever x's dtype (exact promotion), as x.float() * scale
    if not bool(absmax_out.isfinite().all()):  # NaN/inf in the chunk: bitsandbytes' own formula
        return torch.bucketize(scaled.clamp(-1, 1), bounds, out_int32=True).to(torch.uint8)
    top = torch.bitwise_right_shift(scaled.view(torch.int32), 16).bitwise_and_(0xFFFF)
    codes = below.index_select(0, top)
    codes += (scaled > inside.index_select(0, top)).view(torch.uint8)
    return codes


def _pack_pairs(codes: torch.Tensor, out: torch.Tensor) -> None:
    """Two codes per byte, the first in the high nibble (bitsandbytes' order)."""
    if sys.byteorder == "little":  # one int16 holds a pair: low byte = first code, high byte = second
        pairs = codes.view(torch.int16)
        out.copy_((pairs << 4) | (pairs >> 8))  # keeps the low byte: first << 4 | second
    else:  # pragma: no cover - no big-endian machine in CI
        torch.bitwise_or(codes[::2] << 4, codes[1::2], out=out)


def _encode_chunk(flat: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, start: int, stop: int) -> None:
    codes = _nf4_codes(flat[start:stop], absmax[start // BLOCKSIZE : stop // BLOCKSIZE])
    _pack_pairs(codes, packed[start // 2 : stop // 2])


def encode_nf4(
    weight: torch.Tensor, workers: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """nf4 double-quantized encoding of `weight`, flattened, on `workers` threads.

    Args:
        weight: a float32/bfloat16/float16 tensor whose number of elements is a multiple of 64.
        workers: threads to use; default `default_workers()`.

    Returns:
        (packed codes uint8 [n/2], quantized absmax uint8 [n/64], nested absmax float32 [ceil(n/64/256)], offset):
        bit for bit what bitsandbytes' `quantize_4bit(flat, blocksize=64, compress_statistics=True,
        quant_type="nf4")` returns as the packed tensor, `state.absmax`, `state.state2.absmax` and `state.offset`.

    Raises:
        ValueError: the dtype is not a float of 16 or 32 bits, or the size is not a multiple of 64.
        RuntimeError: bitsandbytes changed its nested quantization (then decoding would not match).
    """
    import bitsandbytes.functional as F

    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"`weight` should be float32, bfloat16 or float16, but the value passed is {weight.dtype}")
    flat = weight.detach().reshape(-1).contiguous()
    n = flat.numel()
    if n % BLOCKSIZE:
        raise ValueError(f"`weight` should have a multiple of {BLOCKSIZE} elements, but the value passed has {n}")
    if flat.device.type != "cpu":  # a weight still on an accelerator: bitsandbytes' own kernel there is fast
        packed, state = F.quantize_4bit(flat, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")
        return packed.reshape(-1), state.absmax, state.state2.absmax, float(state.offset)
    packed = torch.empty(n // 2, dtype=torch.uint8)
    absmax = torch.empty(n // BLOCKSIZE, dtype=torch.float32)
    bounds = [(start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]
    run_parallel([functools.partial(_encode_chunk, flat, packed, absmax, *b) for b in bounds], workers)
    offset = absmax.mean()  # the same reduction over the same tensor as bitsandbytes: the same bits
    quantized, nested = F.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    if nested.blocksize != NESTED_BLOCKSIZE or not torch.equal(nested.code, _nested_code()):
        raise RuntimeError(
            "hf_offload: bitsandbytes quantized the nf4 absmax with an unexpected nested block size or code map "
            f"(bitsandbytes {_bnb_version()}); please report this together with your bitsandbytes version."
        )
    return packed, quantized, nested.absmax, float(offset)


@functools.cache
def _nested_code() -> torch.Tensor:
    import bitsandbytes.functional as F

    with torch.inference_mode(False):
        return F.create_dynamic_map(signed=True)


def _int8_rows(weight: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, start: int, stop: int) -> None:
    import bitsandbytes.functional as F

    rows, row_absmax, _ = F.int8_vectorwise_quant(weight[start:stop], threshold=0.0)
    codes[start:stop].copy_(rows)
    absmax[start:stop].copy_(row_absmax)


def encode_int8(weight: torch.Tensor, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' `int8_vectorwise_quant(weight, threshold=0.0)` (codes, row absmax), rows split over threads.

    The quantization is row by row, so splitting the rows changes no byte of a row with a nonzero absmax; a row of
    zeros decodes to zeros whatever its codes are (its scale is 0).

    Args:
        weight: a 2D float tensor.
        workers: threads to use; default `default_workers()`.

    Returns:
        (int8 codes of weight's shape, float32 absmax per row).
    """
    weight = weight.detach().contiguous()
    if weight.device.type != "cpu":  # a weight still on an accelerator: bitsandbytes' own kernel there
        import bitsandbytes.functional as F

        codes, row_absmax, _ = F.int8_vectorwise_quant(weight, threshold=0.0)
        return codes, row_absmax
    rows, cols = weight.shape
    codes = torch.empty((rows, cols), dtype=torch.int8)
    absmax = torch.empty(rows, dtype=torch.float32)
    step = max(1, CHUNK // max(cols, 1))
    tasks = [functools.partial(_int8_rows, weight, codes, absmax, s, min(s + step, rows)) for s in range(0, rows, step)]
    run_parallel(tasks, workers)
    return codes, absmax


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_building_for_node = False  # see `building_for_node`


def default_workers() -> int:
    """Encoding threads: torch's thread count, or every core this process may run on while it builds its node's
    shared store (`building_for_node`)."""
    threads = torch.get_num_threads()
    if _building_for_node:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(threads, cores)
    return threads


def building_for_node(on: bool) -> None:
    """Local rank 0 builds the node's shared store while the node's other ranks wait for it (shared_store.py):
    encode on every core it may use, not on its share of them (torchrun sets OMP_NUM_THREADS=1 per rank)."""
    global _building_for_node
    _building_for_node = on


def run_parallel(tasks: Sequence[Callable[[], None]], workers: int | None = None) -> None:
    """Run `tasks` on a pool of `workers` threads whose torch kernels are single-threaded (one task per core).

    One task, or one worker, runs inline. The first error raised by a task is raised here, after all finished.
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    futures = [_pool(workers).submit(task) for task in tasks]
    for future in futures:
        future.result()


def _pool(workers: int) -> ThreadPoolExecutor:
    # Kept for the life of the process: a store build encodes hundreds of weights, threads are cheap when idle.
    with _pools_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = compat.single_threaded_pool(workers, "hf_offload-encode")
        return pool


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__
