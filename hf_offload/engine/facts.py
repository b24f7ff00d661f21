"""What streaming a model costs, computed in one place: bytes per training step and the typed `summary()`.

`bytes_per_train_step` is the performance model's transfer term; the runtime's summary, `hf-offload plan` and
`hf-offload bench` all call it, so their figures agree with each other and with what `stats()` counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..records import Record
from ..units import format_bytes


def bytes_per_train_step(layer_bytes: Sequence[int], prefetch: int) -> int:
    """Host->device bytes of one training step once training runs (every step after the first).

    The device holds `prefetch + 1` slots. The backward ends on the first layers, which stay in their slots, so the
    next forward finds them loaded; the forward ends on the last layers, which the backward finds loaded (the
    turnaround). So each pass loads all but `prefetch + 1` layers: the forward skips the first ones, the backward
    the last ones. Slots stay valid while the host bytes do not change (an optimizer step on host weights does).
    """
    window = min(len(layer_bytes), prefetch + 1)
    return sum(layer_bytes[window:]) + sum(layer_bytes[: len(layer_bytes) - window])


@dataclass(frozen=True)
class StreamingSummary(Record):
    """Static facts of a streamed model (`hf_offload.summary(model)`). `as_dict()` gives a plain dict;
    `summary["layers"]` still works for code written against the dict this used to be."""

    device: str
    layers: int
    layer_path: str
    prefetch: int
    host_store_bytes: int
    max_layer_bytes: int
    device_slot_bytes: int
    bytes_per_train_step: int  # with expert_fetch="routed": the bound reached when every expert is routed to
    pinned: bool
    base_weight_dtype: str | None
    quantized_weights: int  # weights the store keeps encoded: linear weights, and stacked expert tensors (one each)
    device_scratch_bytes: int  # dense form of the computing layer's encoded weights (0 without base_weight_dtype)
    expert_fetch: str
    moe_layers: int  # layers whose experts the streamer can fetch by routing
    expert_bytes: int  # their experts' bytes
    unpinned_layers: list[int]  # layers not page-locked, copied through bounce buffers (none on the plain CPU)
    simulated_async_seed: int | None  # CPU only: the seed of the simulated asynchronous device, None when off
    chunked_loss: bool  # training losses computed in token chunks (the model's output head was found)
    loss_chunk_tokens: int | None  # tokens per chunk (None: planned from the vocabulary)
    mlp_tile_tokens: int | None  # MLPs of longer inputs compute in tiles of about this many tokens (None: never)
    tiled_mlp_layers: int  # layers whose MLP can be tiled (dense MLPs)
    layers_loaded_into_store: int = 0  # layers whose buffer was filled straight from the checkpoint (HostStoreConfig)
    offload_activations: bool = False  # inputs saved for backward wait in page-locked host memory
    # host buffers made for them so far (exact sizes, page-locked, reused across steps; 0 without offloading)
    activation_host_bytes: int = 0
    activation_unpinned_buffers: int = 0  # of those, buffers whose page-locking failed (their copies are synchronous)

    def describe(self) -> str:
        """One paragraph for the log: what streams, where it lives, what a step moves."""
        store = format_bytes(self.host_store_bytes) + (" (pinned)" if self.pinned else "")
        if self.layers_loaded_into_store:
            store += f", {self.layers_loaded_into_store} layers loaded straight from the checkpoint"
        if self.quantized_weights:
            store += f", {self.quantized_weights} weights in {self.base_weight_dtype}"
        scratch = self.device_scratch_bytes
        scratch = f" + {format_bytes(scratch)} of dequantization scratch" if scratch else ""
        text = (
            f"hf_offload: streaming {self.layers} decoder layers ({self.layer_path}) from host memory to "
            f"{self.device}: {store} in host memory, {format_bytes(self.bytes_per_train_step)} per training step, "
            f"{format_bytes(self.device_slot_bytes)} of device slots (prefetch={self.prefetch}){scratch}."
        )
        if self.moe_layers:
            routed = self.expert_fetch == "routed"
            text += (
                f" {self.moe_layers} Mixture-of-Experts layers hold {format_bytes(self.expert_bytes)} of experts; "
                f"expert_fetch={self.expert_fetch!r}"
                + (" (only routed experts move; the bytes per step are the bound)." if routed else ".")
            )
        return text
