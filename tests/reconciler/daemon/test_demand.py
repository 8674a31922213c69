"""DemandBook.traffic: every deployment's request and error rates from the gateways' reports, in the status."""

from __future__ import annotations

from modelfleet.reconciler.daemon.demand import DemandBook
from modelfleet.reconciler.daemon.reconcile import DaemonStatus
from modelfleet.state.demand import DemandReport, DeploymentTraffic
from modelfleet.state.status import DeploymentStatus

KEY = "m/production"


def report(gateway: str, requests: int, errors: int = 0) -> DemandReport:
    return DemandReport(gateway=gateway, interval=2, traffic={KEY: DeploymentTraffic(requests=requests, errors=errors)})


def deployment_json(book: DemandBook) -> dict[str, object]:
    status = DaemonStatus(demand=book)
    status.deployments = {("m", "production"): DeploymentStatus("m", "production", "success", "Ready", "ok", [], 1,
                                                                1, "abc")}
    return dict(status.to_json()["deployments"][0])


def test_the_status_shows_each_deployments_rates_summed_over_live_gateways() -> None:
    now = [100.0]
    book = DemandBook(clock=lambda: now[0])
    book.record(report("gw-1", 10))
    book.record(report("gw-2", 0))
    assert "traffic" not in deployment_json(book)  # one report per gateway: no rate yet
    now[0] += 2
    book.record(report("gw-1", 30, 4))
    book.record(report("gw-2", 6))
    assert deployment_json(book)["traffic"] == {"rps": 13.0, "errorsPerSecond": 2.0, "window": 2.0}
    # gw-2 falls silent: after REPORT_STALE_AFTER it no longer counts.
    for _ in range(6):
        now[0] += 2
        book.record(report("gw-1", 30, 4))
    assert deployment_json(book)["traffic"] == {"rps": 0.0, "errorsPerSecond": 0.0, "window": 10.0}
