"""The documents stay true to the code: the configuration reference is generated, the README is a guide."""

import re
from pathlib import Path

from searchllm.configdoc import reference

ROOT = Path(__file__).resolve().parent.parent


def test_the_configuration_reference_is_regenerated_when_the_config_changes():
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == reference(), (
        "docs/configuration.md is stale: python -m searchllm.configdoc > docs/configuration.md"
    )


def test_every_config_key_is_in_the_reference_with_a_meaning():
    rows = [
        line.split("|") for line in reference().splitlines() if line.startswith("| `") and "." in line.split("|")[1]
    ]
    assert len(rows) > 100
    assert [r[1] for r in rows if not r[3].strip()] == []


def test_the_readme_is_a_guide_of_at_most_15000_characters():
    assert len((ROOT / "README.md").read_text()) <= 15000


def test_no_document_speaks_of_sessions_except_rays_own_terms():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    hits = [
        f"{p.name}: {line.strip()}"
        for p in docs
        for line in p.read_text().splitlines()
        if re.search(r"\bsessions?\b", line, re.I) and not re.search(r"ray|session_latest", line, re.I)
    ]
    assert hits == []
