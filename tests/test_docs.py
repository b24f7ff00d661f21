"""The documentation: its Python examples run, its links lead somewhere, and it cites nothing outside the repository.

Convention for the pages (README.md and docs/*.md): every fenced ```python block runs, in page order, in one
namespace per page (a later block may use what an earlier one defined), in a fresh temporary directory, on the CPU.
A block that cannot run here (it downloads a model, needs a GPU, or is a fragment of a larger script) is marked by
an HTML comment on the line just above its fence, which says why:

    <!-- not-run: downloads Qwen/Qwen2.5-7B -->
    ```python
    ...

Examples that run build their model themselves, from a tiny config (as `hf_offload.demo` does), so nothing is
downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*\S.*-->\s*$")  # a line of its own
FENCE = re.compile(r"^```(\w*)\s*$")
# Markdown links and images: [text](target) / ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Things a page must not point at: files outside the repository, and tracker numbers instead of explanations.
FORBIDDEN = [re.compile(p, re.IGNORECASE) for p in (r"DESIGN\.md", r"shared/", r"issue\s*#\s*\d")]


def _blocks(page: Path) -> list[tuple[int, str, str, bool]]:
    """(line number, language, code, runs) for every fenced block of `page`."""
    lines = page.read_text().splitlines()
    blocks, k = [], 0
    while k < len(lines):
        match = FENCE.match(lines[k])
        if not match:
            k += 1
            continue
        start, language = k, match.group(1)
        end = next((j for j in range(k + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.name}:{start + 1}: a code fence is never closed"
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append((start + 1, language, "\n".join(lines[start + 1 : end]), not NOT_RUN.match(previous)))
        k = end + 1
    return blocks


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_pages_exist():
    """The landing page and the guides it promises."""
    names = {p.name for p in PAGES}
    for name in ("index.md", "quickstart.md", "trainer.md", "python-api.md", "moe.md", "quantization.md"):
        assert name in names, f"docs/{name} is missing"
    for name in ("planning.md", "benchmarking.md", "how-it-works.md", "troubleshooting.md", "options.md"):
        assert name in names, f"docs/{name} is missing"


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; the guides belong in docs/"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """Every ```python block not marked `<!-- not-run: why -->` runs, in page order, in one namespace."""
    runnable = [(line, code) for line, language, code, runs in _blocks(page) if language == "python" and runs]
    if not runnable:
        pytest.skip(f"{_page_id(page)} has no runnable Python block")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_OFFLOAD_VERBOSITY", os.environ.get("HF_OFFLOAD_VERBOSITY", "warning"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on shared cores: threads only contend
    namespace: dict = {"__name__": "__docs__"}
    try:
        for line, code in runnable:
            try:
                exec(compile(code, f"{_page_id(page)}:{line}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"the Python block at {_page_id(page)}:{line} failed: {err!r}") from err
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_python_blocks_parse(page):
    """Blocks that do not run still have to be valid Python."""
    for line, language, code, _ in _blocks(page):
        if language == "python":
            compile(code, f"{_page_id(page)}:{line}", "exec")


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_not_run_marks_precede_python_blocks(page):
    """A `not-run` mark that is not just above a ```python fence would silently mark nothing."""
    lines = page.read_text().splitlines()
    for k, text in enumerate(lines):
        if NOT_RUN.match(text):
            following = next((lines[j] for j in range(k + 1, len(lines)) if lines[j].strip()), "")
            assert following.strip() == "```python", f"{_page_id(page)}:{k + 1}: a not-run mark with no block below"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page):
    """Every link that is not a web address points at a file or folder of the repository (anchors ignored)."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a web address, mailto:, or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists() or not path.is_relative_to(ROOT):
            broken.append(target)
    assert not broken, f"{_page_id(page)} links to what the repository does not have: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_cites_nothing_outside_the_repository(page):
    text = page.read_text()
    found = [m.group(0) for pattern in FORBIDDEN for m in pattern.finditer(text)]
    assert not found, f"{_page_id(page)} mentions {found}: explain it in the page itself instead"


def test_every_guide_is_reachable_from_the_index():
    index = (ROOT / "docs" / "index.md").read_text()
    linked = {Path(t.split("#", 1)[0]).name for t in LINK.findall(index)}
    missing = [p.name for p in PAGES if p.parent.name == "docs" and p.name != "index.md" and p.name not in linked]
    assert not missing, f"docs/index.md does not link to {missing}"
