"""Keep access tokens out of what hf_offload writes: the training arguments pickled into every save.

`Trainer` saves `torch.save(self.args)` as training_args.bin in every checkpoint and in the output directory, which
`push_to_hub` uploads. `TrainingArguments.to_dict()` masks fields ending in `_token` for JSON (as "<HUB_TOKEN>"),
but the pickle keeps them. While hf_offload's save hook runs the Trainer's save, those fields hold the same masks,
so the pickle never sees the token; they are restored right after, before anything that needs the token (a push).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator


def token_fields(args) -> list[str]:
    """Names of the fields of `args` that hold an access token (`*_token` with a string value)."""
    if not dataclasses.is_dataclass(args):
        return []
    names = [f.name for f in dataclasses.fields(args) if f.name.endswith("_token")]
    return [name for name in names if isinstance(getattr(args, name), str)]


def mask(name: str) -> str:
    """The placeholder `TrainingArguments.to_dict()` writes for token field `name`."""
    return f"<{name.upper()}>"


@contextlib.contextmanager
def tokens_masked(args) -> Iterator[None]:
    """Inside the block, every token field of `args` holds its mask instead of the token."""
    saved = {name: getattr(args, name) for name in token_fields(args)}
    try:
        for name in saved:
            setattr(args, name, mask(name))
        yield
    finally:
        for name, value in saved.items():
            setattr(args, name, value)
