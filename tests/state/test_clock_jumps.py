"""docker.downAfter when the wall clock jumps: a since-time in the future counts from now."""

from __future__ import annotations

import pytest

from modelfleet.state.inventory import InventoryRow
from modelfleet.state.loader import load_tree
from modelfleet.state.planning import Plan, PlanInputs, plan
from tests.state.helpers import custom_model, environment, host, tree

NOW = 1_000_000.0
DOWN_AFTER = 30.0
CATALOG = load_tree(tree(**{
    "environments.yaml": environment("production"),
    "models/m.yaml": custom_model("m", "environment: production\nreplicas: 1\nruntime: {type: custom, "
                                  "image: x:1, port: 8080}")}))
HOSTS = [host("h0"), host("h1")]


def _pass(since: float) -> Plan:
    """h0 runs the replica (so says the inventory; it shows nothing: unreachable since ``since``); h1 is fine."""
    base = plan(PlanInputs(catalog=CATALOG, hosts=HOSTS[:1], revision="r", inventory=[]))
    want = base.desired.replicas[0]
    name = f"mf-production-m-0-{want.spec_hash[:8]}"
    row = InventoryRow("h0", name, "id0", "m", "production", 0, want.spec_hash, "r", "active", True,
                       "http://h0:32768", "http://h0:32768/")
    return plan(PlanInputs(catalog=CATALOG, hosts=HOSTS, revision="r", observed=[], inventory=[row],
                           unreachable={"h0": since}, now=NOW, down_after=DOWN_AFTER))


def test_a_host_unreachable_for_longer_than_down_after_is_down_and_its_replica_moves() -> None:
    result = _pass(since=NOW - 2 * DOWN_AFTER)
    assert result.down_hosts == {"h0"}
    assert [(a.op, a.host) for a in result.actions if a.op == "create"] == [("create", "h1")]


@pytest.mark.parametrize("ahead", [1.0, DOWN_AFTER, 86_400.0 * 365])
def test_a_since_time_in_the_future_is_now_the_host_is_suspect_nothing_moves(ahead: float) -> None:
    """The wall clock was set back after the since-time was stored (or it was stored by a host
    whose clock ran ahead): h0 is unreachable from now on, with its whole grace ahead of it."""
    result = _pass(since=NOW + ahead)
    assert result.down_hosts == frozenset() and result.suspect_hosts == {"h0"}
    assert [a for a in result.actions if a.op in ("create", "remove", "stop")] == []
    assert result.unreachable_since == {"h0": NOW}  # what the store remembers for the next pass
    later = plan(PlanInputs(catalog=CATALOG, hosts=HOSTS, revision="r", observed=[],
                            inventory=result.inventory_rows or [], unreachable=result.unreachable_since,
                            now=NOW + DOWN_AFTER + 1, down_after=DOWN_AFTER))
    assert later.down_hosts == {"h0"}  # and the grace ends downAfter after now, not after the future time
