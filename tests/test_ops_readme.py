"""The README's "Dashboards and alerts" tables are the generated ones."""

from __future__ import annotations

from crowdmon.ops.alerts import alert_reference_table
from crowdmon.ops.dashboards import dashboard_reference_table
from tests.support import REPO_ROOT


def test_readme_lists_the_generated_dashboards_and_alert_rules() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"<!-- dashboard-reference -->\n{dashboard_reference_table()}\n<!-- /dashboard-reference -->" in readme
    assert f"<!-- alert-reference -->\n{alert_reference_table()}\n<!-- /alert-reference -->" in readme
