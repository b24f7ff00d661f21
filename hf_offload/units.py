"""Units and names every face prints or parses the same way: bytes, dtypes."""

from __future__ import annotations

GB = 1e9  # decimal gigabytes, as GPU and host memory are quoted in specifications and by the tools

# Every spelling of a floating dtype a user may pass on a command line -> the torch dtype's name.
DTYPE_NAMES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}


def format_bytes(n: float) -> str:
    """`n` bytes in the largest decimal unit that keeps it at least 1: '4.43 MB', '141.00 GB', '512 bytes'."""
    for unit, scale in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} bytes"


def parse_dtype(name: str):
    """The torch dtype of `name` ('bf16', 'bfloat16', 'fp32', ...), for `--dtype` options.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    import torch

    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"should be one of {', '.join(DTYPE_NAMES)}, but the value passed is {name!r}")
    return getattr(torch, DTYPE_NAMES[key])
