"""`Overrides`: replace attributes of objects or classes, and later restore each exactly as it was.

Every place in hf_offload that swaps a method for a while goes through this one mechanism: the streamed forward
of each decoder layer, the refused `merge` of LoRA layers over quantized weights, the routed forward of experts
modules, and the in-place patch of `transformers.Trainer`. Restoring puts back the object's own attribute when it
had one and deletes ours when it had none (so the class attribute shows through again), in reverse order, so
overriding twice and restoring once per override leaves the object as it started.

Example:
    >>> overrides = Overrides()
    >>> overrides.replace(layer, "forward", streamed_forward)
    >>> overrides.restore()  # layer.forward is the class's forward again
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ABSENT = object()  # the object had no attribute of its own under that name


class Overrides:
    """A record of replaced attributes, restorable in one call."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def replace(self, target: Any, name: str, value: Any) -> None:
        """Set `target.name = value`, remembering what `target` itself held under `name` (its `__dict__` entry)."""
        self._saved.append((target, name, vars(target).get(name, _ABSENT)))
        setattr(target, name, value)

    def restore(self) -> None:
        """Put every replaced attribute back, newest first."""
        while self._saved:
            target, name, previous = self._saved.pop()
            if previous is _ABSENT:
                delattr(target, name)
            else:
                setattr(target, name, previous)

    def __len__(self) -> int:
        return len(self._saved)


def deepcopy_refusal(module: str | None = None) -> RuntimeError:
    """The error for copy.deepcopy of a streamed model, or of `module`, one hf_offload gave its own forward.

    See Note: [Copying a streamed model] in runtime.py. A model's copy may meet either first, so one message fits
    both.
    """
    what = "a model whose decoder layers stream" + (
        f", or of a module hf_offload runs for it ({module})," * bool(module)
    )
    return RuntimeError(
        f"copy.deepcopy of {what} is not supported: the copy would keep computing with the original's host store "
        "and modules. Copy the model before hf_offload.enable_layer_streaming (and stream each copy separately), or "
        "call hf_offload.disable_layer_streaming(model), copy it, and enable streaming again. For a frozen reference "
        "model, load it a second time (from_pretrained) instead of copying."
    )


class InstalledForward:
    """A `forward` hf_offload sets on one module instance (routed experts, a tiled MLP, the chunked-loss head).

    A callable object rather than a closure: copy.deepcopy shares functions, so a copied module would keep calling
    the original's forward, bound to the original module and its streamer; a copy is refused instead.
    """

    def __init__(self, function: Callable, wrapped: Callable, what: str):
        self.function, self.__wrapped__, self.what = function, wrapped, what

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo):
        raise deepcopy_refusal(self.what)
