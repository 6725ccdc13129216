"""Docstrings cite the maths as "docs/method.md section N" (or "sections N-M"): every cited
section must exist in the repository's docs/method.md, so ``help(...)`` never points at nothing."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"method\.md,?\s+sections?\s+(\d+)(?:\s*(?:-|\.\.|and|,)\s*(\d+))?")


def _sections() -> set:
    text = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    return {int(m) for m in re.findall(r"^## (\d+)\. ", text, flags=re.M)}


def _citations():
    for folder in ("bespoke_fast", "kernels", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for m in CITATION.finditer(" ".join(text.split())):
                first = int(m.group(1))
                last = int(m.group(2)) if m.group(2) else first
                yield path.relative_to(ROOT), range(first, last + 1)


def test_method_md_exists_with_numbered_sections():
    assert _sections() >= set(range(1, 9))


def test_every_cited_section_exists():
    sections = _sections()
    cited = list(_citations())
    assert cited, "no citation found: the pattern no longer matches the docstrings"
    missing = [(str(p), list(r)) for p, r in cited if not set(r) <= sections]
    assert not missing, f"citations of sections that docs/method.md lacks: {missing}"


def test_citation_pattern_reads_ranges():
    text = "see docs/method.md sections 3-5 and method.md section 7"
    found = [(int(m.group(1)), m.group(2)) for m in CITATION.finditer(text)]
    assert found == [(3, "5"), (7, None)]


def test_every_relative_link_in_the_docs_exists():
    """README.md and docs/*.md link results and code by relative paths: each must exist."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
