"""SECURITY.md names the tests behind its guarantees: every one it names exists."""

from __future__ import annotations

import re

from tests.support import REPO_ROOT


def test_every_test_security_md_names_exists() -> None:
    text = (REPO_ROOT / "SECURITY.md").read_text()
    files = set(re.findall(r"tests/(test_\w+\.py)", text))
    functions = set(re.findall(r"`(?:tests/test_\w+\.py::)?(test_\w+)`", text))
    sources = {name: (REPO_ROOT / "tests" / name).read_text() for name in files}
    defined = {name for source in sources.values() for name in re.findall(r"def (test_\w+)\(", source)}

    assert {"test_reliability_cardinality.py", "test_reliability_protocol.py", "test_reliability_faults.py",
            "test_reliability_decorators.py", "test_reliability_load.py",
            "test_reliability_metrics_protection.py"} <= files
    assert functions and functions <= defined, functions - defined
    assert "[SECURITY.md](SECURITY.md)" in (REPO_ROOT / "README.md").read_text()
