"""contrib/: the Prometheus alert rules pass `promtool check rules` and their unit tests (`promtool test rules`),
and the rules and the Grafana dashboard name only metrics that gatewayd exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.conftest import require_tools
from tests.harness import Harness, gw  # noqa: F401 (fixture)
from tests.runtime.test_operability import metrics_page, scrape

CONTRIB = Path(__file__).resolve().parents[1] / "contrib"
RULES = CONTRIB / "prometheus" / "gatewayd-alerts.yml"
FLEET_ONLY = {"gatewayd_fleet_ledger_watching", "gatewayd_fleet_unavailable_refusals", "gatewayd_fleet_local_decisions"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    require_tools("promtool", package="prometheus")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, check=False,
                          cwd=RULES.parent)


def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", "gatewayd-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # Every rule has a test that fires it.
    tests = (RULES.parent / "gatewayd-alerts.test.yml").read_text()
    for name in re.findall(r"- alert: (\w+)", RULES.read_text()):
        assert f"alertname: {name}" in tests, name


def names_in(text: str) -> set[str]:
    found = set(re.findall(r"\bgatewayd_[a-z_]+", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in found}


async def exported_names(gw: Harness) -> set[str]:  # noqa: F811
    """Every metric family the endpoint describes (a labelled counter has no sample before its first use)."""
    text = await metrics_page(gw)
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind == "counter":
            names.add(f"{name}_total")
    return names


async def test_rules_and_dashboard_name_only_exported_metrics(gw: Harness) -> None:  # noqa: F811
    exported = await exported_names(gw)
    assert {re.sub(r"_(bucket|sum|count)$", "", n.split("{")[0]) for n in await scrape(gw)} <= exported
    daemon = (Path(__file__).resolve().parents[1] / "gatewayd" / "daemon.py").read_text()
    assert FLEET_ONLY <= set(re.findall(r'"(gatewayd_fleet_[a-z_]+)"', daemon))  # exported with a [fleet]
    dashboard = json.loads((CONTRIB / "grafana" / "gatewayd.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for source, names in (("alert rules", names_in(RULES.read_text())), ("dashboard", names_in(exprs))):
        unknown = names - exported - FLEET_ONLY
        assert not unknown, f"the {source} name metrics gatewayd does not export: {sorted(unknown)}"
    assert {p["title"] for p in dashboard["panels"]} >= {"Enforcement healthy", "Sessions by state", "Event outbox"}
