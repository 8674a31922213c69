"""The demand reporter: reports at once on activation and on every tick, failures never affect serving."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from modelfleet.reconciler.config import ConfigError, parse_config
from modelfleet.reconciler.gateway.demand_client import default_gateway_id
from modelfleet.reconciler.gateway.routes import Activation
from modelfleet.reconciler.gateway.server import GatewayError, create_gateway
from modelfleet.state.demand import DeploymentTraffic
from tests.http_server import bound_socket
from tests.reconciler.gateway.harness import InBackground, route, wait_for, who

pytestmark = pytest.mark.timeout(30)

KEY = "m/production"
TOKEN = "tok-s3cret-value"


def test_reports_at_once_when_a_deployment_starts_holding_requests(backends: Any, make_gateway: Any,
                                                                   demand_server: Any) -> None:
    _, a = backends("a")
    daemon, api = demand_server(token=TOKEN)
    activation = {KEY: Activation(queue=5, timeout=20)}
    # Ticks 30 s apart: any report during the test is the one sent at once.
    gw = make_gateway({KEY: (), "other/production": ()}, activation=activation, control_plane=api.url + "/",
                      control_plane_token=TOKEN, gateway_id="gw-par-1", location="paris-1", report_interval=30)
    version = gw.app.table.version
    assert daemon.reports == []
    request = InBackground(gw.url, "POST", "/models/m/predict", content=b'{"x": 1}')
    wait_for(lambda: daemon.reports, "a demand report")
    assert daemon.invalid == [] and daemon.refused == 0
    assert daemon.authorizations == [f"Bearer {TOKEN}"]
    (report,) = daemon.reports
    assert report.gateway == "gw-par-1" and report.location == "paris-1" and report.table_version == version
    assert set(report.deployments) == {KEY}  # only serverless deployments, only active ones
    load = report.deployments[KEY]
    assert load.queued == 1 and load.in_flight == 1 and load.requests == 1 and load.idle_seconds is not None

    # A second held request for the same deployment sends nothing more before the tick.
    second = InBackground(gw.url, "POST", "/models/m/predict", content=b'{"x": 2}')
    wait_for(lambda: gw.app.activator.held(KEY) == 2, "2 held requests")
    assert len(daemon.reports) == 1
    newer = gw.publish({KEY: (route(a),)}, activation)
    assert who(request.result()) == "a" and who(second.result()) == "a"
    # The new table is acknowledged at once: one more report, with the version now served.
    wait_for(lambda: len(daemon.reports) == 2, "the acknowledgement of the new table")
    assert daemon.reports[1].table_version == newer
    assert gw.client.get("/routes").json()["demand"] == {"url": api.url + "/api/v1/demand", "gateway": "gw-par-1",
                                                         "sent": 2, "failing": 0}


def test_a_heartbeat_on_every_tick(make_gateway: Any, demand_server: Any) -> None:
    daemon, api = demand_server()
    gw = make_gateway({KEY: ()}, control_plane=api.url, report_interval=0.05)
    wait_for(lambda: len(daemon.reports) >= 3, "3 reports")
    assert all(r.deployments == {} for r in daemon.reports)  # nothing serverless: empty reports
    assert set(daemon.authorizations) == {None}  # no token configured, none sent
    assert 'modelfleet_gateway_demand_reports_total{result="ok"}' in gw.client.get("/metrics").text


def test_reports_carry_the_requests_and_errors_of_every_deployment(backends: Any, make_gateway: Any,
                                                                   demand_server: Any) -> None:
    """Not only serverless ones: every deployment of the table that was requested, as counters since
    the gateway started (5xx answers, the gateway's own 503 included, are errors; unknown paths are not
    a deployment's)."""
    _, a = backends("a")
    daemon, api = demand_server()
    gw = make_gateway({KEY: (route(a),), "down/production": ()}, control_plane=api.url, report_interval=0.05)
    for _ in range(3):
        assert who(gw.client.get("/models/m/x")) == "a"
    for _ in range(2):
        assert gw.client.get("/models/down/x").status_code == 503  # no ready replica
    assert gw.client.get("/models/unknown/x").status_code == 404
    want = {KEY: DeploymentTraffic(requests=3, errors=0), "down/production": DeploymentTraffic(requests=2, errors=2)}
    wait_for(lambda: daemon.reports and daemon.reports[-1].traffic == want, "a report with the traffic")
    assert daemon.reports[-1].deployments == {}  # nothing serverless: no load figures
    count = len(daemon.reports)
    wait_for(lambda: len(daemon.reports) >= count + 2, "two more reports")
    assert daemon.reports[-1].traffic == want  # cumulative: the same counts until new requests


def test_a_control_plane_that_is_down_does_not_affect_serving(backends: Any, make_gateway: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    _, a = backends("a")
    dead = bound_socket()  # bound, never listening: connections are refused
    try:
        caplog.set_level(logging.INFO, logger="modelfleet.gateway")
        gw = make_gateway({KEY: (route(a),)}, activation={KEY: Activation()},
                          control_plane=f"http://127.0.0.1:{dead.getsockname()[1]}", report_interval=0.02)
        wait_for(lambda: gw.app.reporter.failures >= 5, "5 failed reports")
        for _ in range(5):
            assert who(gw.client.get("/models/m/x")) == "a"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "demand report" in r.message]
        assert len(warnings) == 1, [r.message for r in warnings]  # rate-limited
        assert "serving is not affected" in warnings[0].message
        assert 'modelfleet_gateway_demand_reports_total{result="failed"}' in gw.client.get("/metrics").text
    finally:
        dead.close()


def test_a_refused_token_is_explained_never_logged_and_recovers(make_gateway: Any, demand_server: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modelfleet.gateway")
    daemon, api = demand_server(token="the-daemon-token")
    gw = make_gateway({KEY: ()}, control_plane=api.url, control_plane_token=TOKEN, report_interval=0.02)
    # The gateway counts a failure once the answer is back: wait for both sides, not one then the other.
    wait_for(lambda: daemon.refused >= 3 and gw.app.reporter.failures >= 3, "refused reports")
    assert "controlPlaneTokenFile" in caplog.text and "401" in caplog.text
    daemon.token = TOKEN  # the operator fixes the token file on the daemon's side
    wait_for(lambda: gw.app.reporter.failures == 0, "reports accepted again")
    assert "reach" in caplog.text and "again" in caplog.text
    assert TOKEN not in caplog.text


def test_the_gateway_built_from_the_config_reports_to_the_daemon_api(tmp_path: Path) -> None:
    (tmp_path / "api-token").write_text(f"{TOKEN}\n")
    config = parse_config(f"stateDir: {tmp_path}/state\napi: {{listen: '0.0.0.0:9181', tokenFile: api-token}}\n",
                          base_dir=tmp_path)
    app = create_gateway(config)
    assert app.reporter is not None
    assert app.reporter.url == "http://127.0.0.1:9181/api/v1/demand"  # the local daemon by default
    assert app.reporter._headers["authorization"] == f"Bearer {TOKEN}"  # api.tokenFile by default
    assert app.reporter.gateway_id == default_gateway_id() == f"{socket.gethostname()}:{os.getpid()}"
    assert app.reporter.location is None

    (tmp_path / "cp-token").write_text("other\n")
    config = parse_config(
        f"stateDir: {tmp_path}/state\napi: {{tokenFile: api-token}}\n"
        "gateway: {mode: external, controlPlane: 'https://fleet.example:8443/', controlPlaneTokenFile: cp-token,\n"
        "          id: gw-par-1, location: paris-1}\n", base_dir=tmp_path)
    app = create_gateway(config)
    assert app.reporter is not None
    assert app.reporter.url == "https://fleet.example:8443/api/v1/demand"
    assert app.reporter._headers["authorization"] == "Bearer other"
    assert (app.reporter.gateway_id, app.reporter.location) == ("gw-par-1", "paris-1")

    with pytest.raises(ConfigError, match="controlPlane"):
        parse_config("gateway: {controlPlane: 'fleet.example:8081'}\n")
    missing = parse_config(f"stateDir: {tmp_path}/state\ngateway: {{controlPlaneTokenFile: nope}}\n",
                           base_dir=tmp_path)
    with pytest.raises(GatewayError, match=r"gateway\.controlPlaneTokenFile: cannot read"):
        create_gateway(missing)
    default_missing = parse_config(f"stateDir: {tmp_path}/state\napi: {{tokenFile: nope}}\n", base_dir=tmp_path)
    with pytest.raises(GatewayError, match=r"default: api\.tokenFile"):
        create_gateway(default_missing)
