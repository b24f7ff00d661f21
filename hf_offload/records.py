"""`Record`: the base of hf_offload's typed results (`summary()`, the plan, the optimizer-state report).

A result is a frozen dataclass: attributes that type checkers and editors know, `as_dict()` where a plain dict is
wanted (JSON, logging), and `result["name"]` for code written when these results were dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class Record:
    """Mixin for frozen dataclasses: `as_dict()` and read-only `[...]` access by field name."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:  # type: ignore[attr-defined]
            raise KeyError(key)
        return getattr(self, key)

    def keys(self) -> list[str]:
        return list(self.__dataclass_fields__)  # type: ignore[attr-defined]
