"""Version floors: an unsupported transformers / peft / accelerate is refused by name when the integrations load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_offload.integrations import versions

ROOT = Path(__file__).resolve().parents[2]


def test_parse():
    assert versions.parse("5.0.0") == (5, 0, 0)
    assert versions.parse("5.10.0rc1") == (5, 10, 0)
    assert versions.parse("0.18.0.dev0") == (0, 18, 0)
    assert versions.parse("5.10") > versions.parse("5.9.1")


def test_supported_and_unsupported_versions():
    assert versions.problem("transformers", "5.0.0") is None and versions.problem("transformers", "5.24.0") is None
    old = versions.problem("transformers", "4.57.6")
    assert "transformers>=5.0.0,<6" in old and "transformers 4.57.6" in old and "pip install" in old
    assert "transformers 6.0.0" in versions.problem("transformers", "6.0.0")
    assert "peft 0.17.1" in versions.problem("peft", "0.17.1")
    assert "not installed" in versions.problem("accelerate", None)


def test_installed_versions_are_supported():
    versions.check_versions()  # the versions this suite runs on


def test_check_names_every_unsupported_package(monkeypatch):
    fake = {"transformers": "4.57.6", "peft": "0.21.2", "accelerate": "1.2.0", "trl": None}
    monkeypatch.setattr(versions, "installed_version", fake.get)
    with pytest.raises(versions.UnsupportedVersionError) as error:
        versions.check_versions()
    assert "transformers 4.57.6" in str(error.value) and "accelerate 1.2.0" in str(error.value)
    assert "peft" not in str(error.value)


def test_an_old_transformers_is_refused_when_the_trainer_integration_loads(tmp_path):
    """What a user with transformers 4.x sees: the package and version named, not a failure deep in the Trainer."""
    info = tmp_path / "transformers-4.57.6.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 4.57.6\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", "import hf_offload; hf_offload.OffloadTrainer"], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "UnsupportedVersionError: hf_offload supports transformers>=5.0.0,<6, but the version installed is" in (
        done.stderr
    )
