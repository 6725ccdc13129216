"""The Python examples of README.md and docs/usage.md run as written (at small sizes) on this
machine.

Convention for README code (follow it when adding a section):

* every ```python block in README.md and docs/usage.md is a test case; it runs on its own (a fresh namespace, in a
  fresh temporary working directory, so relative paths like "runs/gt" are fine), top to bottom,
  on a CPU-only machine when no GPU is there;
* the test sets the environment variable ``BESPOKE_FAST_README_SMALL=1``: a block that would take
  more than a few seconds reads it and shrinks its sizes, written plainly in the block, e.g.
  ``small = os.environ.get("BESPOKE_FAST_README_SMALL") == "1"`` then
  ``num = 48 if small else 2048`` (a reader sees both the real size and the test size);
* a block that cannot run in CI (it needs a GPU, a download or credentials) starts with the line
  ``# readme-test: skip (reason)``; keep such blocks rare and say the reason.
"""
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = [(page, code) for page in ("README.md", "docs/usage.md")
          for code in re.findall(r"^```python\n(.*?)^```", (ROOT / page).read_text(encoding="utf-8"),
                                 re.S | re.M)]


def test_the_readme_has_python_examples():
    assert sum(page == "README.md" for page, _ in BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    page, code = BLOCKS[index]
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if first.startswith("# readme-test: skip"):
        pytest.skip(first[len("# readme-test: skip"):].strip(" ()") or "marked skip in README")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BESPOKE_FAST_README_SMALL", "1")
    threads = torch.get_num_threads()
    try:
        exec(compile(code, f"{page} python block {index}", "exec"), {"__name__": "__readme__"})
    finally:
        torch.set_num_threads(threads)
    assert os.getcwd() == str(tmp_path)
