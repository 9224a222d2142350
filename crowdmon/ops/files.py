"""``crowdmon export``: dashboards, Grafana provisioning, alert rules and a Prometheus config,
written to one directory."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import yaml
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("crowdmon export needs PyYAML: pip install 'crowdmon[ops]'") from error

from crowdmon.ops.alerts import check_handlers, check_job, duration_seconds, resolve, rule_groups
from crowdmon.ops.dashboards import DASHBOARDS, dashboard_json
from crowdmon.ops.queries import PROBE_HANDLERS

RULES_FILE = "crowdmon-alerts.yml"


@dataclass(frozen=True)
class ExportOptions:
    """What ``crowdmon export`` writes; every field has a default that works with ``crowdmon demo``."""

    #: Prometheus job name of the scraped application; alert rules select ``job="<job>"``.
    job: str = "crowdmon"
    #: Targets (``host:port``) the generated ``prometheus.yml`` scrapes.
    targets: tuple[str, ...] = ("127.0.0.1:8000",)
    metrics_path: str = "/metrics"
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    #: Name of the Grafana data source the dashboards use by default and provisioning creates.
    datasource: str = "Prometheus"
    #: URL Grafana reaches Prometheus at.
    prometheus_url: str = "http://localhost:9090"
    #: Where Grafana finds the dashboard files (the provider's ``options.path``).
    dashboards_path: str = "/var/lib/grafana/dashboards/crowdmon"
    #: Alert thresholds by key (see ``crowdmon.ops.THRESHOLD_DOCS``).
    thresholds: Mapping[str, float] = field(default_factory=dict)
    #: ``for:`` durations by alert key (see ``crowdmon.ops.DEFAULT_DURATIONS``).
    durations: Mapping[str, str] = field(default_factory=dict)
    #: Handlers whose requests are probes or scrapes, not users' traffic (``ChatMessagesStopped``).
    probe_handlers: tuple[str, ...] = PROBE_HANDLERS
    #: Handlers slow by design (an LLM answer), left out of ``HighRequestLatency``.
    slow_handlers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_job(self.job)
        resolve(self.thresholds, self.durations)
        for name in ("scrape_interval", "evaluation_interval"):
            if not duration_seconds(getattr(self, name)):
                raise ValueError(
                    f"{name} must be a Prometheus duration above 0 such as 15s, 1m or 1m30s "
                    f"(units in the order y w d h m s ms), got {getattr(self, name)!r}"
                )
        check_handlers("probe_handlers", self.probe_handlers)
        check_handlers("slow_handlers", self.slow_handlers)
        if not self.targets or any(not re.fullmatch(r"[\w.\-\[\]:]+:\d+", target) for target in self.targets):
            raise ValueError(f"targets must be host:port, e.g. 127.0.0.1:8000, got {list(self.targets)!r}")
        if not self.datasource.strip():
            raise ValueError("datasource must name the Grafana data source, e.g. Prometheus")
        if not self.metrics_path.startswith("/"):
            raise ValueError(f"metrics_path must start with '/', got {self.metrics_path!r}")


def export(out: str | Path, options: ExportOptions | None = None) -> list[Path]:
    """Write the operations pack under ``out``; returns the files written.

    Layout: ``grafana/dashboards/*.json``, ``grafana/provisioning/{datasources,dashboards}/crowdmon.yml``,
    ``prometheus/prometheus.yml``, ``prometheus/crowdmon-alerts.yml``, and :data:`MANIFEST`
    listing them.  A file the last export's manifest lists that this one does not write (a
    dashboard a newer crowdmon renamed) is removed, or Grafana would provision it next to its
    successor; other files are left alone.
    """
    options = options or ExportOptions()
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"--out must be a directory to write the pack into, and {str(root)!r} is a file")
    files: dict[str, str] = {}
    for spec in DASHBOARDS:
        files[f"grafana/dashboards/{spec.uid}.json"] = dashboard_json(spec, options.datasource)
    files["grafana/provisioning/datasources/crowdmon.yml"] = _yaml(datasource_provisioning(options))
    files["grafana/provisioning/dashboards/crowdmon.yml"] = _yaml(dashboard_provisioning(options))
    rules = rule_groups(
        options.job, options.thresholds, options.durations,
        scrape_interval=options.scrape_interval, probe_handlers=options.probe_handlers,
        slow_handlers=options.slow_handlers,
    )
    files[f"prometheus/{RULES_FILE}"] = _yaml(rules)
    files["prometheus/prometheus.yml"] = _yaml(prometheus_config(options))
    earlier = exported_files(root)
    files[MANIFEST] = "".join(f"{relative}\n" for relative in sorted(files))
    written = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    for stale in set(earlier) - set(written):
        stale.unlink(missing_ok=True)
    return written


#: The list of the files an export wrote, at the top of the pack: the next export removes those
#: it no longer writes (a dashboard a newer crowdmon renamed), and nothing else.
MANIFEST = ".crowdmon-export"


def exported_files(out: str | Path) -> list[Path]:
    """The files the last export into ``out`` wrote, as its manifest lists them."""
    root = Path(out)
    try:
        listed = (root / MANIFEST).read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError):
        return []
    # Only paths inside the pack: the manifest is a file anyone could edit.
    return [root / line for line in listed if line and not Path(line).is_absolute() and ".." not in Path(line).parts]


def datasource_uid(name: str) -> str:
    return "crowdmon-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "prometheus")


def datasource_provisioning(options: ExportOptions) -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": options.datasource,
                "uid": datasource_uid(options.datasource),
                "type": "prometheus",
                "access": "proxy",
                "url": options.prometheus_url,
                "jsonData": {"timeInterval": options.scrape_interval, "httpMethod": "POST"},
                "editable": True,
            }
        ],
    }


def dashboard_provisioning(options: ExportOptions) -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "crowdmon",
                "folder": "crowdmon",
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": True,
                "updateIntervalSeconds": 30,
                "options": {"path": options.dashboards_path, "foldersFromFilesStructure": False},
            }
        ],
    }


def prometheus_config(options: ExportOptions, rule_files: Sequence[str] = (RULES_FILE,)) -> dict[str, Any]:
    """A ``prometheus.yml`` scraping the application and loading the alert rules beside it."""
    return {
        "global": {"scrape_interval": options.scrape_interval, "evaluation_interval": options.evaluation_interval},
        "rule_files": list(rule_files),
        "scrape_configs": [
            {
                "job_name": options.job,
                "metrics_path": options.metrics_path,
                "scrape_interval": options.scrape_interval,
                "scrape_timeout": options.scrape_interval,
                "static_configs": [{"targets": list(options.targets)}],
            }
        ],
    }


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=1_000_000, allow_unicode=True)
