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
