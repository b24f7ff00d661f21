"""Quantized storage of frozen linear weights: nf4 (QLoRA's double quantization) and int8 row-wise.

A `Codec` turns one dense weight into a few small tensors ("parts") when the host store is packed, and turns those
parts back into the dense weight on the compute device, inside the layer window, writing into a scratch view. The
host store and the copy only ever see the parts, so host memory and bytes over the link shrink with them.

    nf4   bitsandbytes `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`, as QLoRA:
          packed 4-bit codes (n/2 bytes), one uint8 absmax per 64 values, one fp32 scale per 256 absmax blocks.
          ~0.516 bytes per weight. Encoded by `nf4_encode.encode_nf4`: the same bytes, faster, on every core.
    int8  bitsandbytes `int8_vectorwise_quant` (LLM.int8 row-wise absmax, no outlier columns): one int8 per weight
          and one fp32 scale per row. ~1 byte per weight.

Note: [nf4 on flattened weights]
Weights are quantized as one flat vector. The blocks are then the same 64 consecutive values as for the 2D weight
(bitsandbytes blocks run over the flattened tensor), and the CPU dequantize kernel of bitsandbytes 0.50.2, which
gives wrong values for 2D shapes whose rows are not a multiple of the block size (blocks crossing rows), sees a
single row. Weights whose size is not a multiple of 64 stay dense.

Which weights are quantized: the 2D weight of every `nn.Linear` and transformers `Conv1D` in a decoder layer
(the base layer of a peft LoRA layer included, its adapters excluded), when it is frozen and floating point; and
the stacked expert tensors ([num_experts, out, in]) of Mixture-of-Experts layers, expert by expert (see Note:
[Experts encoded one by one]). Norms, biases and embeddings stay as they are.

Note: [Experts encoded one by one]
A stacked expert tensor is encoded as `num_experts` separate weights: expert e's [out, in] slice goes through the
same `encode` as a linear weight, and part p of all experts is stored as one [num_experts, ...] array (each row
padded to the store's alignment), so the parts of expert e are fixed byte ranges. Routed expert fetch can then copy
the encoded bytes of only the routed experts and decode just those (streamer.py); an expert's values do not depend
on which other experts are loaded. The metadata (nf4's absmax offset) is per expert too. With nf4, a stack whose
expert slices are not a multiple of 64 values stays dense (Note: [nf4 on flattened weights]). Decoding several
experts (`decode_experts`) gives exactly each expert's own `decode`: int8 in one elementwise kernel, nf4 in three
kernels when an expert's size is a multiple of 16384 values (its absmax blocks then fill whole nested blocks), else
one expert at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import compat

BASE_WEIGHT_DTYPES = ("nf4", "int8")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Part:
    """The dtype and shape of one tensor of an encoded weight."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Codec:
    """Encodes a dense weight into parts at pack time and decodes them into a dense view inside the window."""

    name: str = ""

    def accepts(self, weight: torch.Tensor) -> bool:
        return weight.dim() == 2 and weight.dtype in _FLOATS

    def accepts_experts(self, stack: torch.Tensor) -> bool:
        """Whether each [out, in] slice of a stacked expert tensor [num_experts, out, in] can be encoded."""
        return stack.dim() == 3 and stack.shape[0] > 0 and self.accepts(stack[0])

    def parts(self, shape: torch.Size, dtype: torch.dtype) -> list[Part]:
        """The layout of the encoded weight; needs only the shape, so it works on the meta device (plans)."""
        raise NotImplementedError

    def encode(self, weight: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        """Host tensors matching `parts()`, and small Python-side metadata `decode` needs."""
        raise NotImplementedError

    def decode(self, parts: list[torch.Tensor], meta: dict, out: torch.Tensor) -> None:
        """Write the dense weight into `out` (same device as `parts`, original shape and dtype)."""
        raise NotImplementedError

    def decode_experts(self, parts: list[torch.Tensor], metas: list[dict], out: torch.Tensor) -> None:
        """Decode several experts at once: `parts` are [count, ...part] views, `metas` one dict per expert, `out` is
        [count, out, in]. Expert i's result is exactly `decode` of its own parts."""
        for i, meta in enumerate(metas):
            self.decode([part[i] for part in parts], meta, out[i])


class NF4Codec(Codec):
    name = "nf4"
    blocksize = 64  # values per absmax, as QLoRA
    nested_blocksize = 256  # absmax values per fp32 scale (double quantization; bitsandbytes' fixed choice)

    def __init__(self) -> None:
        self._nested_code: dict[torch.device, torch.Tensor] = {}  # 8-bit dynamic map of the absmax, per device

    def accepts(self, weight: torch.Tensor) -> bool:
        return super().accepts(weight) and weight.numel() % self.blocksize == 0  # Note: [nf4 on flattened weights]

    def parts(self, shape, dtype):
        n = math.prod(shape)
        blocks = math.ceil(n / self.blocksize)
        return [
            Part(torch.uint8, (math.ceil(n / 2),)),  # two 4-bit codes per byte
            Part(torch.uint8, (blocks,)),  # absmax of each block, itself 8-bit quantized
            Part(torch.float32, (math.ceil(blocks / self.nested_blocksize),)),  # scale of each absmax block
        ]

    def encode(self, weight):
        from .nf4_encode import encode_nf4

        # bit for bit bitsandbytes' quantize_4bit(flat, 64, compress_statistics=True, "nf4"), on every core
        packed, absmax, nested_absmax, offset = encode_nf4(weight)
        return [packed, absmax, nested_absmax], {"offset": offset}

    def decode(self, parts, meta, out):
        import bitsandbytes.functional as F

        packed, absmax_q, nested_absmax = parts
        absmax = F.dequantize_blockwise(
            absmax_q, absmax=nested_absmax, code=self._code(out.device), blocksize=self.nested_blocksize
        )
        absmax += meta["offset"]
        self._dequantize(packed.view(1, -1), absmax.view(1, -1), out.view(1, -1))

    def decode_experts(self, parts, metas, out):
        """All experts with three kernels instead of three per expert, when that is exactly the per-expert decode.

        An expert's absmax blocks start a new nested block when their count is a multiple of the nested block size
        (true of real expert shapes: 16384 values); then the stacked absmax codes dequantize as one vector with the
        same scale for every value as alone, and every step is elementwise. Otherwise, one expert at a time."""
        packed, absmax_q, nested_absmax = parts
        count, blocks = absmax_q.shape
        if blocks % self.nested_blocksize:
            super().decode_experts(parts, metas, out)
            return
        import bitsandbytes.functional as F

        # bitsandbytes reads raw memory: padded rows (strided views) are made contiguous first (small parts)
        absmax = F.dequantize_blockwise(
            absmax_q.contiguous().view(-1),
            absmax=nested_absmax.contiguous().view(-1),
            code=self._code(out.device),
            blocksize=self.nested_blocksize,
        )
        offsets = torch.tensor([meta["offset"] for meta in metas], dtype=torch.float32)
        if out.device.type != "cpu":  # staged through page-locked memory: the host does not wait
            offsets = offsets.pin_memory().to(out.device, non_blocking=True)
        absmax.view(count, blocks).add_(offsets[:, None])  # float32, as `absmax += offset` in decode
        self._dequantize(packed.contiguous(), absmax.view(count, blocks), out.view(count, -1))

    def _dequantize(self, packed: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor) -> None:
        """The 4-bit codes `packed` ([rows, n/2], contiguous) times their block's `absmax` ([rows, n/64]) into `out`
        ([rows, n]): one kernel on an accelerator."""
        import bitsandbytes.functional as F

        if out.device.type == "cpu":  # bitsandbytes 0.50.2 has no CPU kernel writing into `out`
            for row in range(out.shape[0]):  # a row at a time: its temporary stays in cache
                dense = torch.ops.bitsandbytes.dequantize_4bit.default(
                    packed[row], absmax[row], self.blocksize, "nf4", [out.shape[1]], out.dtype
                )
                out[row].copy_(dense.view(-1))
        else:
            flat = out.view(-1)
            F.dequantize_4bit(
                packed.view(-1), absmax=absmax.view(-1), out=flat, blocksize=self.blocksize, quant_type="nf4"
            )

    def _code(self, device: torch.device) -> torch.Tensor:
        code = self._nested_code.get(device)
        if code is None:
            import bitsandbytes.functional as F

            with torch.inference_mode(False):  # kept for later calls, which may train (not inference tensors)
                code = self._nested_code[device] = F.create_dynamic_map(signed=True).to(device)
        return code


class Int8RowwiseCodec(Codec):
    name = "int8"

    def parts(self, shape, dtype):
        rows, cols = shape
        return [Part(torch.int8, (rows, cols)), Part(torch.float32, (rows,))]

    def encode(self, weight):
        from .nf4_encode import encode_int8

        codes, row_absmax = encode_int8(weight)  # bitsandbytes' int8_vectorwise_quant, rows over every core
        return [codes, row_absmax / 127.0], {}

    def decode(self, parts, meta, out):
        codes, scale = parts
        torch.mul(codes, scale[..., None], out=out)  # computed in fp32, rounded once into out's dtype

    def decode_experts(self, parts, metas, out):
        self.decode(parts, {}, out)  # elementwise: one kernel for [count, rows, cols] gives each expert's decode


def encode_experts(codec: Codec, stack: torch.Tensor, parts: list[torch.Tensor]) -> list[dict]:
    """Encode each expert of `stack` ([num_experts, out, in]) alone, into row e of each of `parts`.

    See Note: [Experts encoded one by one]. One expert at a time, so the transient memory is one expert's.

    Args:
        codec: the codec (`accepts_experts(stack)` must hold).
        stack: the dense stacked expert tensor.
        parts: per part of `codec.parts(stack.shape[1:], ...)`, a writable [num_experts, ...part shape] view.

    Returns:
        The metadata `decode` needs, one dict per expert.
    """
    metas = []
    for expert in range(stack.shape[0]):
        tensors, meta = codec.encode(stack[expert])
        for part, tensor in zip(parts, tensors, strict=True):
            part[expert].copy_(tensor.reshape(part.shape[1:]))
        metas.append(meta)
    return metas


def make_codec(base_weight_dtype: str | None) -> Codec | None:
    if base_weight_dtype is None:
        return None
    codecs = {"nf4": NF4Codec, "int8": Int8RowwiseCodec}
    if base_weight_dtype not in codecs:
        raise ValueError(
            f"`base_weight_dtype` should be one of {', '.join(map(repr, BASE_WEIGHT_DTYPES))} or None, but the value "
            f"passed is {base_weight_dtype!r}"
        )
    return codecs[base_weight_dtype]()


def linear_weights(layer: nn.Module) -> Iterator[tuple[nn.Parameter, nn.Module | None]]:
    """Each base linear weight of `layer` (nn.Linear, transformers Conv1D), with the peft layer wrapping it if any.

    A peft tuner layer contributes only its base layer: adapter weights (lora_A, lora_B, ...) are never base weights.
    bitsandbytes linear layers (nn.Linear subclasses) are included; their weights are already quantized, which the
    callers check (`compat.is_quantized_parameter`).
    """

    def walk(module: nn.Module, tuner: nn.Module | None):
        if compat.is_peft_tuner_layer(module):
            yield from walk(module.get_base_layer(), module)
            return
        weight = getattr(module, "weight", None)
        if compat.is_linear(module) and isinstance(weight, nn.Parameter):
            yield weight, tuner
            return
        for child in module.children():
            yield from walk(child, None)

    yield from walk(layer, None)
