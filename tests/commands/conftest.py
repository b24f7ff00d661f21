"""Fixtures of the command tests: the config of a Llama-3.1-70B-shaped model, as a config.json file."""

from __future__ import annotations

import json

import pytest
from families import LLAMA_70B


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-70b") / "config.json"
    path.write_text(json.dumps(LLAMA_70B))
    return path
