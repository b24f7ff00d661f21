"""Options declared once, shown on every face: the declaration format and what derives the faces from it.

An option is a dataclass field declared with `option(...)`: its name, type, default, help, validation and the
faces that show it. Two classes declare options: `OffloadConfig` (how the engine streams) and
`LayerStreamingPlugin` (what the integrations add: LoRA for a plain model, the optimizer, merged exports). The
other faces are derived from them, never written by hand:

| face      | where                                   | how an option is spelled        |
| --------- | --------------------------------------- | ------------------------------- |
| `config`  | `OffloadConfig(...)`                    | `prefetch`                      |
| `plugin`  | `LayerStreamingPlugin(...)`             | `prefetch`                      |
| `trainer` | `OffloadTrainingArguments`, `--offload_*` flags | `--offload_prefetch`    |
| `launch`  | `hf-offload launch`                     | `--prefetch`                    |
| `plan`    | `hf-offload plan`                       | `--prefetch`                    |
| `bench`   | `hf-offload bench`                      | `--prefetch`                    |

The Trainer's flags carry an `offload_` prefix because they share one namespace with `TrainingArguments` and
TRL's configs (TRL has its own `--lora_r`). Command lines take the Python name with underscores, as
`TrainingArguments` does, and the same name with dashes. A validation error names the option as the face spells
it, whatever face it came through.

Example:
    >>> @dataclass
    ... class Knobs:
    ...     depth: int = option(1, "How deep.", faces=TRAINING_FACES, check=non_negative_int)
    ...     def __post_init__(self):
    ...         validate(self, "config")
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

FACES = ("config", "plugin", "trainer", "launch", "plan", "bench")
TRAINING_FACES = frozenset({"config", "plugin", "trainer", "launch"})  # plan and bench show what they model


class OptionError(ValueError):
    """Raised by a check with the rule the value breaks ("a non-negative integer"); faces add the option's name."""


Check = Callable[[Any], Any]  # returns the value to keep (possibly normalised) or raises OptionError(rule)


def option(
    default: Any,
    help: str,
    *,
    faces: Iterable[str],
    check: Check | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """Declare an option as a dataclass field.

    Args:
        default: the value when the option is not given (the same on every face).
        help: one or two sentences, shown by `--help`, in the docs' reference and in `HfArgumentParser`.
        faces: the faces that show the option (see the module docstring).
        check: validates a value, returns the value to keep, raises `OptionError(rule)` otherwise.
        choices: the allowed strings, when the option is a choice (shown in help and enforced).
        aliases: other names the command lines accept (names an option had before; kept working).

    Returns:
        A `dataclasses.Field` to assign in a dataclass body.
    """
    unknown = set(faces) - set(FACES)
    if unknown:
        raise ValueError(f"unknown faces {sorted(unknown)}; the faces are {', '.join(FACES)}")
    metadata = {"help": help, "faces": frozenset(faces), "check": check, "choices": choices, "aliases": aliases}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One declared option, as the faces see it."""

    name: str
    type: Any
    default: Any
    help: str
    faces: frozenset[str]
    check: Check | None
    choices: tuple[str, ...] | None
    aliases: tuple[str, ...] = ()

    def on(self, face: str) -> bool:
        return face in self.faces

    @classmethod
    def of(cls, f: dataclasses.Field, annotation: Any) -> Option:
        meta = f.metadata
        return cls(
            f.name, annotation, f.default, meta["help"], meta["faces"], meta["check"], meta["choices"], meta["aliases"]
        )


def declared(cls: type) -> list[Option]:
    """The options a dataclass shows (its own `option` fields and those added by `with_options`), in field order."""
    return list(option_fields(cls).values())


def option_fields(cls: type) -> dict[str, Option]:
    """Field name -> option, for every option field of a dataclass."""
    hints = typing.get_type_hints(cls)
    derived = cls.__dict__.get("__derived_options__", {})
    fields = {}
    for f in dataclasses.fields(cls):
        if "faces" in f.metadata:
            fields[f.name] = Option.of(f, hints[f.name])
        elif f.name in derived:
            fields[f.name] = derived[f.name]
    return fields


def trainer_flag(name: str) -> str:
    """The `OffloadTrainingArguments` field of an option: `offload_` + its name (once)."""
    return name if name.startswith("offload_") else f"offload_{name}"


def spelled(name: str, face: str) -> str:
    """An option's name as a user of `face` writes it, for messages."""
    if face == "trainer":
        return f"--{trainer_flag(name)}"
    if face in ("launch", "plan", "bench"):
        return f"--{name}"
    return f"`{name}`"


def checked(opt: Option, value: Any, face: str) -> Any:
    """`value` as the option keeps it, or a ValueError naming the option as `face` spells it."""
    try:
        allowed_none = value is None and opt.default is None
        if opt.choices is not None and not allowed_none and value not in opt.choices:
            none = " or None" if opt.default is None else ""
            raise OptionError(f"one of {', '.join(map(repr, opt.choices))}{none}")
        return opt.check(value) if opt.check is not None else value
    except OptionError as err:
        raise ValueError(f"{spelled(opt.name, face)} should be {err}, but the value passed is {value!r}") from None


def validate(obj: Any, face: str) -> None:
    """Check (and normalise in place) every option field of a dataclass instance; call from `__post_init__`."""
    for name, opt in option_fields(type(obj)).items():
        object.__setattr__(obj, name, checked(opt, getattr(obj, name), face))


def with_options(source: type, face: str, rename: Callable[[str], str] = str) -> Callable[[type], type]:
    """Class decorator, applied under `@dataclass`: add `source`'s options that show on `face` as fields.

    Each added field keeps the declaration's default and help; its check and choices are looked up from the
    declaration (the class's `__derived_options__`), so the derived class validates, documents and parses the
    option exactly as the source does. The field's metadata holds only "help": `HfArgumentParser` hands every
    metadata key to argparse. `rename` gives the field its face's name.
    """

    def decorate(cls: type) -> type:
        annotations = cls.__dict__.get("__annotations__")
        if annotations is None:
            annotations = {}
            cls.__annotations__ = annotations
        derived = dict(cls.__dict__.get("__derived_options__", {}))
        for opt in declared(source):
            if not opt.on(face):
                continue
            name = rename(opt.name)
            annotations[name] = opt.type
            setattr(cls, name, dataclasses.field(default=opt.default, metadata={"help": opt.help}))
            derived[name] = opt
        cls.__derived_options__ = derived
        return cls

    return decorate


def all_options() -> list[Option]:
    """Every declared option once: the engine's (`OffloadConfig`), then the integrations' (`LayerStreamingPlugin`)."""
    from .config import OffloadConfig
    from .integrations.plugin import LayerStreamingPlugin

    engine = declared(OffloadConfig)
    names = {opt.name for opt in engine}
    return engine + [opt for opt in declared(LayerStreamingPlugin) if opt.name not in names]  # LoRA, optimizer, ...


# --- command lines ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, options: Iterable[Option], face: str) -> None:
    """Add the options that show on `face` to an argparse parser (dest = the option's name).

    `--name` is the spelling shown in help; the dashed spelling and older names work too, hidden from help.
    """
    for opt in options:
        if not opt.on(face):
            continue
        kwargs: dict[str, Any] = {}
        base = base_type(opt.type)
        if base is bool and opt.default is False:
            kwargs["action"] = "store_true"
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if opt.choices:
                kwargs["choices"] = opt.choices
        help_text = f"{opt.help} (default: {opt.default})".replace("%", "%%")
        add_flag(parser, opt.name, *opt.aliases, default=opt.default, help=help_text, **kwargs)


def add_flag(parser: argparse.ArgumentParser, name: str, *aliases: str, **kwargs: Any) -> None:
    """`parser.add_argument(f"--{name}", ...)`, also accepting the dashed spelling and `aliases`, hidden from help.

    Every command-line option of hf_offload is spelled this way: `--gpu_mem` shown, `--gpu-mem` accepted.
    """
    kwargs.setdefault("dest", name)
    parser.add_argument(f"--{name}", **kwargs)
    spellings = (spelling for alias in [name, *aliases] for spelling in (alias, alias.replace("_", "-")))
    hidden = [f"--{spelling}" for spelling in dict.fromkeys(spellings) if spelling != name]
    if hidden:
        kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        kwargs.pop("metavar", None)
        parser.add_argument(*hidden, **kwargs)


def values_from(namespace: argparse.Namespace, options: Iterable[Option], face: str) -> dict[str, Any]:
    """The values of `face`'s options parsed into `namespace`, checked, by option name.

    Raises:
        ValueError: a value breaks its option's rule; the message spells the option as `face` does.
    """
    return {opt.name: checked(opt, getattr(namespace, opt.name), face) for opt in options if opt.on(face)}


def base_type(annotation: Any) -> type:
    """The type a command line parses: `int` of `int`, `bool` of `bool | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


# --- checks -------------------------------------------------------------------------------------------------------
def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError("a non-negative integer")
    return value


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OptionError("a positive integer")
    return value


def optional_positive_int(value: Any) -> int | None:
    if value is not None:
        try:
            positive_int(value)
        except OptionError:
            raise OptionError("a positive integer or None") from None
    return value


def zero_is_none(check: Check) -> Check:
    """`check`, with 0 standing for None: a command line cannot spell None, so `--option 0` means "not set"."""

    def zero_or(value: Any) -> Any:
        return None if value == 0 and not isinstance(value, bool) else check(value)

    return zero_or


def positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise OptionError("a positive number")
    return value


def probability(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise OptionError("in [0, 1)")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionError("True or False")
    return value


def optional_boolean(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise OptionError("True, False or None")
    return value


# --- the reference page -------------------------------------------------------------------------------------------
def reference_markdown() -> str:
    """docs/options.md: every option, its default, its spelling on each face, and its help."""
    from .config import OffloadConfig

    engine = {opt.name for opt in declared(OffloadConfig)}
    sections = [
        ("Streaming: `OffloadConfig`", [opt for opt in all_options() if opt.name in engine]),
        ("Integrations: `LayerStreamingPlugin`", [opt for opt in all_options() if opt.name not in engine]),
    ]
    lines = [
        "# Options reference",
        "",
        "<!-- Generated from the option declarations by `python -m hf_offload.options`; do not edit. -->",
        "",
        "Every option is declared once and shown on the faces listed for it. Python faces (`OffloadConfig`,",
        "`LayerStreamingPlugin`) take the name as a keyword; the Trainer takes `--offload_<name>`; the commands",
        "(`hf-offload launch`, `plan`, `bench`) take `--<name>`, with underscores or dashes.",
        "",
    ]
    for title, section in sections:
        lines += [f"## {title}", ""]
        for opt in section:
            faces = ", ".join(f"{face} `{_face_spelling(opt.name, face)}`" for face in FACES if opt.on(face))
            default = f"`{opt.default!r}`"
            lines += [f"### `{opt.name}`", "", f"Default {default}. Faces: {faces}.", "", opt.help, ""]
    return "\n".join(lines).rstrip() + "\n"


def _face_spelling(name: str, face: str) -> str:
    return spelled(name, face).strip("`")


def main() -> None:
    """Print docs/options.md: `python -m hf_offload.options > docs/options.md`."""
    print(reference_markdown(), end="")


if __name__ == "__main__":
    main()
