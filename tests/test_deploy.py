"""The deployment files users run without tally's tests: docker-compose (checked by reading:
Docker does not run here), the Prometheus configuration and alert rules (checked by promtool
when it is installed; CI installs it and sets TALLY_REQUIRE_PROMTOOL), Grafana provisioning."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("TALLY_REQUIRE_PROMTOOL"),
    reason="needs promtool (Debian's prometheus package; .ci/run installs it)",
)


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_postgres_and_rabbitmq_are_not_published_by_default() -> None:
    services = compose()["services"]
    assert "ports" not in services["postgres"] and "ports" not in services["rabbitmq"]
    assert services["api"]["ports"] == ["8080:8080"]
    override = compose("docker-compose.ports.yml")["services"]
    assert override["postgres"]["ports"] == ["5432:5432"]
    assert set(override["rabbitmq"]["ports"]) == {"5672:5672", "15672:15672"}


def test_the_observability_profile_runs_prometheus_and_grafana_on_the_shipped_files() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            assert (ROOT / source).exists(), volume
    # Everything else starts without a profile.
    assert all("profiles" not in s for n, s in services.items() if n not in ("prometheus", "grafana"))


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tally.yml").read_text())
    mounted = next(v for v in compose()["services"]["grafana"]["volumes"] if "grafana-dashboard.json" in v)
    assert providers["providers"][0]["options"]["path"] == str(Path(mounted.split(":")[1]).parent)
    dashboard = orjson.loads((DEPLOY / "grafana-dashboard.json").read_bytes())
    assert dashboard["panels"]


def test_the_consumers_health_port_is_the_one_compose_probes() -> None:
    probe = " ".join(compose()["services"]["consumer"]["healthcheck"]["test"])
    assert "8081/readyz" in probe  # TALLY_CONSUMER_HTTP_PORT's default


@needs_promtool
@pytest.mark.parametrize(
    "args",
    [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]],
)
def test_promtool(args: list[str]) -> None:
    assert PROMTOOL is not None, "TALLY_REQUIRE_PROMTOOL is set but promtool is not installed"
    result = subprocess.run([PROMTOOL, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check above can fail: a rule with a syntax error is refused."""
    assert PROMTOOL is not None
    broken = tmp_path / "alerts.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(\n")
    result = subprocess.run([PROMTOOL, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_the_alert_rules_cover_what_an_operator_is_paged_for() -> None:
    rules = {r["alert"] for g in yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert {"TallyDeadLettersRising", "TallyIngestLagging", "TallyNoConsumers", "TallyDown"} <= rules
    assert {"TallyWebhookBacklog", "TallyWebhookEndpointDisabled"} <= rules


def test_the_image_installs_the_runtime_dependencies_from_the_lock_file() -> None:
    """The Dockerfile installs what uv.lock pins (never a fresh resolution), without the dev
    or docs extras, with the uv version the Makefile uses."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    [uv_version] = re.findall(r"^UV_VERSION := (\S+)$", makefile, re.MULTILINE)
    assert f"uv=={uv_version}" in dockerfile
    assert "COPY pyproject.toml uv.lock" in dockerfile
    syncs = re.findall(r"uv sync [^&\n]*", dockerfile)
    assert syncs and all("--frozen" in s and "--extra" not in s and "--all-extras" not in s for s in syncs), syncs
    assert "pip install ." not in dockerfile and "pip install -e" not in dockerfile
