"""Endpoint planning for `fleet up` (no Ray): ports claimed, taken ports refused with the flag to change, the
token resolved (flag, env, the fleet's own file), loopback unless told otherwise, and the CLI flags."""

from __future__ import annotations

import socket
import stat

import pytest

from fleet.cli.fleet_cmds import endpoint_changes
from fleet.cli.fleet_table import endpoints_caption
from fleet.cluster.config import FleetConfig
from fleet.cluster.endpoints import EndpointError, plan_endpoints, port_free


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("FLEET_API_TOKEN", raising=False)
    return tmp_path / "state"


def test_free_ports_and_the_fleets_own_token(state_dir):
    plan = plan_endpoints(FleetConfig(http_port=0, openpi_port=0, metrics_port=0), serve_running=False)
    ports = {plan.http_port, plan.openpi_port, plan.metrics_port}
    assert len(ports) == 3 and all(ports)
    token_file = state_dir / "api_token"
    assert plan.token == token_file.read_text().strip() and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    again = plan_endpoints(FleetConfig(http_port=None, openpi_port=0, metrics_port=None), serve_running=False)
    assert again.token == plan.token and again.http_port is None and again.metrics_port is None  # made once
    urls = plan.urls("http://127.0.0.1:8000")
    assert urls["openpi"] == f"ws://127.0.0.1:{plan.openpi_port}" and urls["metrics"].endswith("/metrics")
    second = plan_endpoints(FleetConfig(namespace="b", openpi_port=0, metrics_port=0), serve_running=True)
    assert second.urls("http://127.0.0.1:8000")["http"] == "http://127.0.0.1:8000/b"  # on the shared proxy


def test_a_taken_port_is_refused_naming_its_flag(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not port_free("127.0.0.1", port)
        with pytest.raises(EndpointError, match="--openpi-port N.*--no-openpi"):
            plan_endpoints(FleetConfig(http_port=None, openpi_port=port, metrics_port=0), serve_running=False)
    monkeypatch.setenv("FLEET_API_TOKEN", "from-env")
    assert plan_endpoints(FleetConfig(http_port=None, openpi_port=0, metrics_port=None), False).token == "from-env"
    plan = plan_endpoints(FleetConfig(http_port=None, openpi_port=0, metrics_port=None, api_token="flag"), False)
    assert plan.token == "flag"
    off = FleetConfig(http_port=None, openpi_port=0, metrics_port=None, require_token=False)
    assert plan_endpoints(off, False).token is None


def test_config_checks_endpoints():
    with pytest.raises(ValueError, match="require_token"):
        FleetConfig(endpoint_host="0.0.0.0", require_token=False)  # no token off loopback
    with pytest.raises(ValueError, match="three different ports"):
        FleetConfig(http_port=9000, openpi_port=9000)
    with pytest.raises(ValueError, match="openpi_port"):
        FleetConfig(openpi_port=70000)
    assert FleetConfig(endpoint_host="10.0.0.5").endpoint_host == "10.0.0.5"  # with the token: allowed


def test_cli_flags(tmp_path):
    args = dict(http_port=None, no_http=True, openpi_port=9001, no_openpi=False, metrics_port=0, no_metrics=False)
    changes = endpoint_changes(**args, host="127.0.0.2", token=None, token_file=None, no_token=False)
    assert changes == {"http_port": None, "openpi_port": 9001, "metrics_port": 0, "endpoint_host": "127.0.0.2"}
    (tmp_path / "t").write_text("s3cret\n")
    assert (
        endpoint_changes(**args, host=None, token=None, token_file=tmp_path / "t", no_token=False)["api_token"]
        == "s3cret"
    )
    with pytest.raises(ValueError, match="give one of them"):
        endpoint_changes(**args, host=None, token="a", token_file=tmp_path / "t", no_token=False)
    caption = endpoints_caption(
        {"http": None, "openpi": "ws://127.0.0.1:8001", "metrics": "http://127.0.0.1:8002/metrics"}
    )
    assert caption == "endpoints on 127.0.0.1: openpi :8001  metrics :8002/metrics"
