"""`OffloadConfig`: every option of layer streaming, documented once and validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .engine.quant import BASE_WEIGHT_DTYPES

EXPERT_FETCH_MODES = ("routed", "all")


@dataclass
class OffloadConfig:
    """How `enable_layer_streaming` keeps a model's decoder layers in host memory and streams them.

    Example:
        >>> from hf_offload import OffloadConfig, enable_layer_streaming
        >>> model = enable_layer_streaming(model, OffloadConfig(prefetch=2))
    """

    device: str | torch.device | None = field(
        default=None,
        metadata={"help": "Where layers compute. None: the accelerator if one is present, else the CPU."},
    )
    prefetch: int = field(
        default=1,
        metadata={
            "help": "Decoder layers loaded ahead of the one computing. 1 (the default) is double buffering; "
            "0 loads each layer only when it is needed. Device memory holds prefetch + 1 layers."
        },
    )
    offload_activations: bool = field(
        default=False,
        metadata={
            "help": "Keep the layer-boundary hidden states saved for backward in host memory instead of on "
            "the device (for long contexts; costs one extra round trip of activations per step)."
        },
    )
    pin_memory: bool | None = field(
        default=None,
        metadata={
            "help": "Page-lock the host store so copies run asynchronously at full link speed. "
            "None: on when the device is CUDA. Needs as much lockable host memory as the frozen layers."
        },
    )
    preserve_rng_state: bool = field(
        default=True,
        metadata={
            "help": "Replay the random state when a layer is recomputed in backward, so dropout masks match "
            "the forward. Turn off only for layers that draw no random numbers."
        },
    )
    show_progress: bool | None = field(
        default=None,
        metadata={"help": "Progress bar while the host store is built. None: only on a terminal."},
    )
    base_weight_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Keep the frozen linear weights of the decoder layers quantized in host memory and over the "
            "link: 'nf4' (4-bit NormalFloat with double quantization, as QLoRA; about 3.9x fewer bytes than bf16) "
            "or 'int8' (row-wise absmax; about 2x fewer). They are dequantized on the device inside the layer's "
            "window. Norms, biases and embeddings stay as they are. None (the default) keeps weights as loaded."
        },
    )
    check_host_memory: bool = field(
        default=True,
        metadata={
            "help": "Before building the host store, compare the host memory it needs with what is available and "
            "stop with a clear message (and the base_weight_dtype that would fit) instead of being OOM-killed."
        },
    )
    expert_fetch: str = field(
        default="routed",
        metadata={
            "help": "Mixture-of-Experts layers: 'routed' (the default) moves a layer's attention, router and "
            "shared weights, computes the routing, then moves only the experts that received at least one token; "
            "the backward reuses that set. 'all' moves every expert with its layer. Dense models and dense layers "
            "have no experts to route: both values stream them whole."
        },
    )
    chunked_loss: bool = field(
        default=True,
        metadata={
            "help": "In training forwards with labels, compute the output head and the cross-entropy in chunks of "
            "tokens (each chunk recomputed in backward), so the logits of the whole sequence never exist: for long "
            "sequences they are the largest tensors of a step. Exact; the model's `outputs.logits` is then an empty "
            "tensor of shape (batch, sequence, 0) (the loss is what training needs). Eval, predict, generate() and "
            "forwards without labels return full logits."
        },
    )
    loss_chunk_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of `chunked_loss`. None: as many as keep one chunk's float32 logits under "
            "256 MiB (2,097 tokens with a 32k vocabulary, 441 with 152k)."
        },
    )
    mlp_tile_tokens: int | None = field(
        default=8192,
        metadata={
            "help": "When a streamed decoder layer's input holds more tokens than this, its MLP computes in "
            "sequence tiles of about this many tokens (in the forward and in the backward recompute, each tile "
            "recomputed for its own backward), so the MLP's intermediate activations exist for one tile at a time. "
            "Exact. Dense MLPs only (a `mlp`, `feed_forward` or `ffn` child of linear layers and activations); an "
            "MLP that draws random numbers (dropout, LoRA dropout) computes whole. None turns tiling off."
        },
    )

    def __post_init__(self) -> None:
        if self.device is not None:
            try:
                self.device = torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"`device` should be a torch device such as 'cuda', 'cuda:1' or 'cpu', but the value passed "
                    f"is {self.device!r}"
                ) from err
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(
                f"`prefetch` should be a non-negative integer (layers loaded ahead), but the value passed is "
                f"{self.prefetch!r}"
            )
        if self.base_weight_dtype is not None and self.base_weight_dtype not in BASE_WEIGHT_DTYPES:
            raise ValueError(
                f"`base_weight_dtype` should be one of {', '.join(map(repr, BASE_WEIGHT_DTYPES))} or None, but the "
                f"value passed is {self.base_weight_dtype!r}"
            )
        for name in ("loss_chunk_tokens", "mlp_tile_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"`{name}` should be a positive number of tokens or None, but the value passed is {value!r}"
                )
        for name in ("offload_activations", "preserve_rng_state", "check_host_memory", "chunked_loss"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"`{name}` should be True or False, but the value passed is {value!r}")
        if self.expert_fetch not in EXPERT_FETCH_MODES:
            raise ValueError(
                f"`expert_fetch` should be one of {', '.join(repr(m) for m in EXPERT_FETCH_MODES)}, but the value "
                f"passed is {self.expert_fetch!r}"
            )
        for name in ("pin_memory", "show_progress"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"`{name}` should be True, False or None, but the value passed is {value!r}")

    @property
    def slots(self) -> int:
        """Device slots: the layer computing plus the ones loading ahead."""
        return self.prefetch + 1
