"""The shipped monitoring files: the alerting rules pass promtool, and every
metric the rules and the Grafana dashboard use is one Conveyor exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conveyor import App, Settings
from conveyor.observability.metrics import Metrics
from tests.prometheus import promtool

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "conveyor.json"
_NAME = re.compile(r"\b(conveyor_[a-z_]+)")


def exported(tmp_path: Path) -> set[str]:
    """Every metric name a Metrics registry exposes (histogram series included)."""
    app = App("names", settings=Settings(broker_url=f"sqlite:///{tmp_path / 'x.db'}"))
    metrics = Metrics(app)
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    # Families without samples yet list no series: the text format does not either.
    for family in text_string_to_metric_families(metrics.render().decode()):
        names.add(family.name)
    return names


def test_alerting_rules_pass_promtool() -> None:
    """`promtool check rules` accepts deploy/prometheus/alerts.yml."""
    done = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 6 rules found" in done.stdout


def test_rules_and_dashboard_use_only_exported_metrics(tmp_path: Path) -> None:
    """No alert or panel watches a metric name Conveyor does not export."""
    names = exported(tmp_path)
    used = set(_NAME.findall(ALERTS.read_text()))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs, "the dashboard has no queries"
    for expr in exprs:
        used.update(_NAME.findall(expr))
    unknown = sorted(used - names)
    assert unknown == [], f"not exported: {unknown}"
