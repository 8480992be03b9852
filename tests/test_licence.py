"""The licence and the citation file: Apache-2.0 in LICENSE, setup.py and CITATION.cff alike, and a citation of
the software that also cites the paper it implements."""

from __future__ import annotations

import subprocess

import yaml

from tests.conftest import PYTHON, ROOT


def test_licence_is_apache_2_everywhere_it_is_declared() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    declared = subprocess.run([PYTHON, "setup.py", "--license"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert declared.stdout.strip().splitlines()[-1] == "Apache-2.0", declared.stdout + declared.stderr
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["license"] == "Apache-2.0"


def test_citation_cites_the_software_and_the_paper() -> None:
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software" and citation["title"]
    (paper,) = [r for r in citation["references"] if r["title"] == "Adversarial Mutual Information for Text Generation"]
    assert paper["year"] == 2020 and [a["family-names"] for a in paper["authors"]][:2] == ["Pan", "Yang"]
