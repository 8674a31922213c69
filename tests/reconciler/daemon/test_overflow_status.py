"""The daemon's view of overflow: the gateways' reports summed, the status saying where traffic goes."""

from __future__ import annotations

from modelfleet.reconciler.daemon.demand import DemandBook
from modelfleet.reconciler.daemon.reconcile import DaemonStatus
from modelfleet.state.demand import DemandReport, DeploymentLoad, OverflowLoad
from modelfleet.state.status import DeploymentStatus

KEY = "m/production"


def report(gateway: str, healthy: bool, to_endpoint: int, to_pool: int) -> DemandReport:
    load = DeploymentLoad(requests=to_pool, overflow=OverflowLoad(endpoint_healthy=healthy, to_endpoint=to_endpoint,
                                                                  to_pool=to_pool))
    return DemandReport(gateway=gateway, interval=2, deployments={KEY: load})


def test_the_status_says_where_traffic_goes_summed_over_gateways() -> None:
    now = [100.0]
    book = DemandBook(clock=lambda: now[0])
    book.record(report("gw-1", True, 7, 1))
    book.record(report("gw-2", True, 3, 0))
    data = status_of_deployment(book)
    assert data["overflow"] == {"endpointHealthy": True, "toEndpoint": 10, "toPool": 1}
    assert data["message"] == ("0 replicas running (idle); traffic goes to the overflow endpoint (10 answered by "
                               "the endpoint, 1 sent to the pool lately)")

    now[0] += 2  # the next tick: one gateway sees the endpoint down
    book.record(report("gw-1", False, 0, 9))
    book.record(report("gw-2", True, 4, 0))
    data = status_of_deployment(book)
    assert data["overflow"] == {"endpointHealthy": False, "toEndpoint": 4, "toPool": 9}
    assert "the overflow endpoint is unhealthy (or ejected) at a gateway" in str(data["message"])


def test_no_overflow_no_change() -> None:
    book = DemandBook(clock=lambda: 100.0)
    book.record(DemandReport(gateway="gw", interval=2, deployments={KEY: DeploymentLoad(requests=3)}))
    data = status_of_deployment(book)
    assert "overflow" not in data and data["message"] == "0 replicas running (idle)"


def status_of_deployment(book: DemandBook) -> dict[str, object]:
    status = DaemonStatus(demand=book)
    deployment = DeploymentStatus("m", "production", "success", "ScaledToZero", "0 replicas running (idle)", [], 0,
                                  0, "abc")
    status.deployments = {("m", "production"): deployment}
    return dict(status.to_json()["deployments"][0])
