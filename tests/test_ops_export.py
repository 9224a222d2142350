"""``crowdmon export --out DIR``: the files an operator installs, and the options that shape them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crowdmon.ops import ALERTS, DASHBOARDS, ExportOptions
from tests.support import REPO_ROOT, subprocess_env


def crowdmon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crowdmon", *args],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60,
    )


def test_export_writes_dashboards_provisioning_rules_and_scrape_config(tmp_path: Path) -> None:
    out = tmp_path / "pack"
    result = crowdmon(
        "export", "--out", str(out), "--job", "shop-api", "--target", "127.0.0.1:8001", "--target", "127.0.0.1:8002",
        "--datasource", "Shop Prometheus", "--prometheus-url", "http://prometheus:9090",
        "--threshold", "http_latency_p95_seconds=2.5", "--for", "component_unhealthy=2m",
    )
    assert result.returncode == 0, result.stderr
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert written == sorted(
        [f"grafana/dashboards/{spec.uid}.json" for spec in DASHBOARDS]
        + [
            ".crowdmon-export",
            "grafana/provisioning/dashboards/crowdmon.yml",
            "grafana/provisioning/datasources/crowdmon.yml",
            "prometheus/crowdmon-alerts.yml",
            "prometheus/prometheus.yml",
        ]
    )
    assert sorted(result.stdout.split()) == sorted(str(out / path) for path in written)

    config = yaml.safe_load((out / "prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["crowdmon-alerts.yml"]
    assert config["scrape_configs"][0]["job_name"] == "shop-api"
    assert config["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:8001", "127.0.0.1:8002"]}]
    checked = subprocess.run(["promtool", "check", "config", str(out / "prometheus/prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout

    rules = {rule["alert"]: rule for group in yaml.safe_load((out / "prometheus/crowdmon-alerts.yml").read_text())["groups"] for rule in group["rules"]}
    assert rules["HighRequestLatency"]["expr"].endswith(" > 2.5")
    assert rules["ComponentUnhealthy"]["for"] == "2m"
    assert rules["ComponentUnhealthy"]["expr"] == 'max by (component) (component_health_status{job="shop-api", status="unhealthy"}) == 1'

    datasources = yaml.safe_load((out / "grafana/provisioning/datasources/crowdmon.yml").read_text())
    assert datasources == {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Shop Prometheus", "uid": "crowdmon-shop-prometheus", "type": "prometheus", "access": "proxy",
                "url": "http://prometheus:9090", "jsonData": {"timeInterval": "15s", "httpMethod": "POST"}, "editable": True,
            }
        ],
    }
    providers = yaml.safe_load((out / "grafana/provisioning/dashboards/crowdmon.yml").read_text())["providers"]
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards/crowdmon"
    health = json.loads((out / "grafana/dashboards/crowdmon-system-health.json").read_text())
    assert health["templating"]["list"][0]["current"]["text"] == "Shop Prometheus"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "http_error_rate=0.1"], "unknown alert threshold 'http_error_rate'"),
        (["--threshold", "http_error_ratio=lots"], "--threshold http_error_ratio= needs a number, got 'lots'"),
        (["--threshold", "http_error_ratio"], "--threshold takes KEY=VALUE, got 'http_error_ratio'"),
        (["--for", "component_unhealthy=soon"], "'for:' duration of 'component_unhealthy' must be a Prometheus duration"),
        (["--target", "localhost"], "targets must be host:port, e.g. 127.0.0.1:8000"),
        (["--scrape-interval", "15"], "scrape_interval must be a Prometheus duration above 0 such as 15s, 1m or 1m30s (units in the order y w d h m s ms), got '15'"),
        # Prometheus refuses units out of order or repeated: the whole file would not load.
        (["--scrape-interval", "30s1m"], "scrape_interval must be a Prometheus duration above 0 such as 15s, 1m or 1m30s (units in the order y w d h m s ms), got '30s1m'"),
        (["--evaluation-interval", "0s"], "evaluation_interval must be a Prometheus duration above 0"),
        (["--for", "component_unhealthy=1m1m"], "'for:' duration of 'component_unhealthy' must be a Prometheus duration such as 30s, 5m or 1h30m (units in the order y w d h m s ms), got '1m1m'"),
        # Shares are fractions: 5 meaning 5% would never fire.
        (["--threshold", "http_error_ratio=5"], "threshold 'http_error_ratio' is a share, a fraction from 0 to 1 (0.05 is 5%), got 5.0"),
        (["--threshold", "cache_hit_ratio_min=-1"], "threshold 'cache_hit_ratio_min' is a share, a fraction from 0 to 1 (0.05 is 5%), got -1.0"),
        (["--threshold", "sessions_drop_ratio=1"], "threshold 'sessions_drop_ratio' must lie strictly between 0 and 1 (0.5 alerts on losing half), got 1.0"),
        (["--threshold", "http_latency_p95_seconds=-2"], "threshold 'http_latency_p95_seconds' must not be negative, got -2.0"),
        (["--job", 'my"job'], "job must be a non-empty Prometheus job name"),
    ],
)
def test_export_refuses_bad_options_with_a_message_saying_how_to_fix_them(tmp_path: Path, args: list[str], message: str) -> None:
    result = crowdmon("export", "--out", str(tmp_path / "pack"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "pack").exists()


def test_export_again_replaces_the_pack_and_leaves_the_operators_own_files(tmp_path: Path) -> None:
    # A dashboard an earlier export wrote and this one does not (renamed by a newer crowdmon)
    # would still be provisioned next to its successor.
    dashboards = tmp_path / "grafana" / "dashboards"
    dashboards.mkdir(parents=True)
    (tmp_path / "prometheus").mkdir()
    (tmp_path / "prometheus" / "other-rules.yml").write_text("groups: []")
    assert crowdmon("export", "--out", str(tmp_path)).returncode == 0
    # As if an earlier crowdmon had written this one too, under a name the current one dropped.
    (dashboards / "crowdmon-api-performance.json").rename(dashboards / "crowdmon-retired.json")
    manifest = tmp_path / ".crowdmon-export"
    manifest.write_text(manifest.read_text().replace("crowdmon-api-performance.json", "crowdmon-retired.json"))
    (dashboards / "team-own.json").write_text("{}")
    # The operator's own, named and tagged like crowdmon's (a copy of one): no export wrote it.
    copy = json.loads((dashboards / "crowdmon-chat.json").read_text()) | {"uid": "crowdmon-team-variant"}
    (dashboards / "crowdmon-team-variant.json").write_text(json.dumps(copy))
    (dashboards / "crowdmon-broken.json").write_text('{"tags": 5}')

    result = crowdmon("export", "--out", str(tmp_path))

    assert result.returncode == 0, result.stderr
    kept = ["team-own.json", "crowdmon-team-variant.json", "crowdmon-broken.json"]
    assert sorted(path.name for path in dashboards.iterdir()) == sorted([f"{spec.uid}.json" for spec in DASHBOARDS] + kept)
    assert (tmp_path / "prometheus" / "other-rules.yml").read_text() == "groups: []"
    assert f"removed {dashboards / 'crowdmon-retired.json'}" in result.stdout


def test_export_into_an_empty_path_is_a_usage_error(tmp_path: Path) -> None:
    """``--out "$UNSET"`` must not write the pack into the current directory."""
    result = subprocess.run([sys.executable, "-m", "crowdmon", "export", "--out", ""], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--out needs a directory to write the pack into, got an empty path" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_into_a_file_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("keep me")
    result = crowdmon("export", "--out", str(target))
    assert result.returncode == 2
    assert f"cannot write the pack into {str(target)!r}: --out must be a directory to write the pack into, and {str(target)!r} is a file" in result.stderr
    assert "Traceback" not in result.stderr
    assert target.read_text() == "keep me"


def test_export_options_check_themselves_when_built() -> None:
    with pytest.raises(ValueError, match="datasource must name the Grafana data source"):
        ExportOptions(datasource=" ")
    with pytest.raises(ValueError, match="metrics_path must start with '/'"):
        ExportOptions(metrics_path="metrics")
