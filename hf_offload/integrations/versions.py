"""The versions of transformers, peft, accelerate and TRL that hf_offload supports, checked before it hooks in.

Note: [Version floors]
The integrations wrap Trainer methods (private ones included) and read peft and accelerate internals through
`hf_offload.engine.compat`. The floors below are the lowest releases the Trainer and launcher tests passed with
(recorded in docs/troubleshooting.md, "Supported versions"), and `.ci/run` runs those tests on them again, so a
floor cannot silently rot. Older releases fail in ways far from their cause (a missing Trainer method, a model
moved to the device), so they are refused up front, naming the package, the version found and the fix.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re

logger = logging.getLogger(__name__)

# package -> (lowest supported, first unsupported or None)
SUPPORTED = {
    "transformers": ("5.0.0", "6"),
    "peft": ("0.18.0", None),
    "accelerate": ("1.10.0", None),
    "trl": ("1.0.0", None),  # optional: checked when installed
}
REQUIRED = ("transformers", "peft", "accelerate")


class UnsupportedVersionError(ImportError):
    """An installed package's version is outside what hf_offload supports."""


def parse(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string ("5.0.0rc1" -> (5, 0, 0)); enough to compare against floors."""
    numbers = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


def problem(package: str, installed: str | None) -> str | None:
    """Why `installed` (a version of `package`, None when absent) is not supported, or None when it is."""
    low, high = SUPPORTED[package]
    spec = f"{package}>={low}" + (f",<{high}" if high else "")
    if installed is None:
        return f"hf_offload needs {spec}, but {package} is not installed. Install it: pip install '{spec}'."
    if parse(installed) < parse(low) or (high is not None and parse(installed) >= parse(high)):
        return (
            f"hf_offload supports {spec}, but the version installed is {package} {installed}. Install a supported "
            f"one: pip install '{spec}'."
        )
    return None


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions() -> None:
    """Refuse unsupported transformers / peft / accelerate; warn about an unsupported TRL (it is optional).

    Raises:
        UnsupportedVersionError: naming each unsupported required package, its version, and the fix.
    """
    problems = [p for p in (problem(name, installed_version(name)) for name in REQUIRED) if p]
    if problems:
        raise UnsupportedVersionError("\n".join(problems))
    trl = installed_version("trl")
    if trl is not None and (message := problem("trl", trl)):
        logger.warning("%s TRL trainers may not stream correctly.", message)
