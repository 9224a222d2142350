"""The README documents what the code does: the metric reference is the catalogue."""

from __future__ import annotations

from crowdmon._docs import metric_reference_table
from tests.support import REPO_ROOT


def test_readme_metric_reference_is_generated_from_the_catalogue() -> None:
    readme = (REPO_ROOT / "README.md").read_text()

    assert metric_reference_table() in readme


def test_readme_starts_with_the_two_setup_commands_ci_runs() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    ci = (REPO_ROOT / ".ci" / "run").read_text()

    assert commands == [
        "python3 -m pip install -e '.[demo]' && python3 -m crowdmon demo",
        "tests/install-deps.sh && python3 -m pytest",
    ]
    assert commands[1] in ci.splitlines()
