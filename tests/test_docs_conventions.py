"""docs/conventions.md is what the code cites: every cited section exists, and nothing cites notes outside the repository."""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
CONVENTIONS = ROOT / "docs" / "conventions.md"
SOURCES = [p for folder in ("src", "scripts", "tests", "docs") for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md")]


def test_conventions_page_exists_with_sections():
    headings = re.findall(r"^## (.+)$", CONVENTIONS.read_text(), flags=re.M)
    assert {"Value ranges", "Noise level", "Kernels and blur", "Guidance", "M-step (kernel update)"} <= set(headings)


def test_every_cited_section_exists():
    headings = set(re.findall(r"^## (.+)$", CONVENTIONS.read_text(), flags=re.M))
    cited = {
        (path.relative_to(ROOT), section)
        for path in SOURCES
        for section in re.findall(r'docs/conventions\.md, "([^"]+)"', path.read_text(encoding="utf-8"))
    }
    assert cited, "no citation of docs/conventions.md found"
    missing = sorted((str(path), section) for path, section in cited if section not in headings)
    assert not missing, f"citations of sections that docs/conventions.md does not have: {missing}"


@pytest.mark.parametrize("name", ["algorithms" + ".md", "ecosystem" + ".md"])
def test_no_citation_of_notes_outside_the_repository(name):
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if name in p.read_text(encoding="utf-8")]
    assert not offenders, f"{name} is not part of the repository but is cited in {offenders}"
