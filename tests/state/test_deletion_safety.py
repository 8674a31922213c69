"""Deletion safety: a commit that would remove too many of the deployments that run is held (state/safety.py)."""

from __future__ import annotations

import pytest

from modelfleet.state.actual import ObservedReplica
from modelfleet.state.inventory import InventoryRow
from modelfleet.state.loader import load_tree
from modelfleet.state.outcome import deployment_statuses
from modelfleet.state.planning import Plan, PlanInputs, plan
from modelfleet.state.routes import route_key
from modelfleet.state.safety import confirms_deletions, is_confirmed
from modelfleet.state.status import AGGREGATE_CONTEXT, DELETION_HELD, commit_statuses
from tests.state.helpers import custom_model, echo_deployment, environment, host, mirror, tree

REVISION = "0123456789abcdef0123456789abcdef01234567"
HOSTS = [host("h0"), host("h1")]


def _files(models: list[str], *, image: str = "example/echo:1", disabled: tuple[str, ...] = ()) -> dict[str, bytes]:
    files = {"environments.yaml": environment("production")}
    for name in models:
        extra = "enabled: false\n" if name in disabled else ""
        files[f"models/{name}.yaml"] = custom_model(name, echo_deployment("production", image=image, extra=extra))
    return tree(**files)


def _running(n: int) -> list[ObservedReplica]:
    """What runs after a commit with n deployments m0..m{n-1} converged."""
    before = plan(PlanInputs(catalog=load_tree(_files([f"m{i}" for i in range(n)])), hosts=HOSTS, revision="old"))
    return mirror(before.desired)


def _rows(observed: list[ObservedReplica]) -> list[InventoryRow]:
    return [InventoryRow(r.host, r.name, r.container_id, r.model, r.environment, r.index, r.spec_hash, r.revision,
                         "active", True, f"http://{r.host}/{r.name}", None) for r in observed]


def _plan_after(running: int, kept: list[str], *, confirmed: bool = False, max_percent: float = 50.0,
                disabled: tuple[str, ...] = (), added: tuple[str, ...] = (), image: str = "example/echo:1",
                inventory: bool = False) -> Plan:
    observed = _running(running)
    return plan(PlanInputs(catalog=load_tree(_files([*kept, *added], image=image, disabled=disabled)), hosts=HOSTS,
                           revision=REVISION, observed=observed, inventory=_rows(observed) if inventory else None,
                           max_deletion_percent=max_percent, deletion_confirmed=confirmed))


def _ops(result: Plan) -> list[tuple[str, str]]:
    return sorted((a.op, a.model) for a in result.actions)


@pytest.mark.parametrize(("running", "kept", "confirmed", "max_percent", "held", "message"), [
    # 7 of 9 removed: over 50 %.
    (9, ["m0", "m1"], False, 50.0, 7, "held: would remove 7 of 9 deployments"),
    # 4 of 9 removed: under 50 %, applied.
    (9, ["m0", "m1", "m2", "m3", "m4"], False, 50.0, 0, None),
    # The only deployment removed: all of them, held whatever the share.
    (1, [], False, 50.0, 1, "held: would remove 1 of 1 deployments"),
    # All of 3 removed, even with a permissive percentage: "all of them" is held.
    (3, [], False, 99.0, 3, "held: would remove 3 of 3 deployments"),
    # Confirmed (trailer or `modelfleet confirm`): removed.
    (9, ["m0", "m1"], True, 50.0, 0, None),
    (1, [], True, 50.0, 0, None),
    # maxDeletionPercent 100 turns the check off entirely, "all of them" included.
    (3, [], False, 100.0, 0, None),
    # 0: any removal is held.
    (9, [f"m{i}" for i in range(8)], False, 0.0, 1, "held: would remove 1 of 9 deployments"),
    # Exactly the percentage (5 of 10 = 50 %) is not more than it: applied.
    (10, [f"m{i}" for i in range(5)], False, 50.0, 0, None),
])
def test_removals_over_the_share_or_of_all_are_held_unless_confirmed(
        running: int, kept: list[str], confirmed: bool, max_percent: float, held: int, message: str | None) -> None:
    result = _plan_after(running, kept, confirmed=confirmed, max_percent=max_percent)
    removes = [a for a in result.actions if a.op == "remove"]
    held_removes = [h for h in result.held if h.action.op == "remove"]
    assert len(held_removes) == held
    assert len(removes) == (running - len(kept)) - held
    if message is None:
        assert result.deletion_hold is None and result.deletion_held == frozenset()
    else:
        assert result.deletion_hold is not None and result.deletion_hold.startswith(message)
        assert f"`modelfleet confirm {REVISION[:12]}`" in result.deletion_hold
        assert "`Modelfleet-Confirm: deletions`" in result.deletion_hold
        assert all(h.why == result.deletion_hold for h in held_removes)
        assert result.deletion_held == {(f"m{i}", "production") for i in range(running) if f"m{i}" not in kept}


def test_creates_and_updates_of_a_held_commit_still_apply() -> None:
    # 7 of 9 removed, one added, and the two kept updated: only the removals wait.
    result = _plan_after(9, ["m0", "m1"], added=("new",), image="example/echo:2")
    assert _ops(result) == [("create", "new"), ("replace", "m0"), ("replace", "m1")]
    assert sorted(h.action.model for h in result.held) == [f"m{i}" for i in range(2, 9)]
    assert result.deletion_hold is not None


def test_disabling_counts_as_removing() -> None:
    names = [f"m{i}" for i in range(3)]
    result = _plan_after(3, names, disabled=tuple(names))
    assert result.actions == [] and len(result.held) == 3
    assert result.deletion_hold is not None and "3 of 3" in result.deletion_hold
    assert result.outcomes[("m0", "production")].reason == DELETION_HELD


def test_held_deployments_stay_routed_and_the_commit_status_says_why() -> None:
    result = _plan_after(3, ["m0"], inventory=True, disabled=("m0",))
    # m0 disabled, m1 and m2 removed from Git: 3 of 3, held, and their endpoints keep answering.
    assert result.deletion_held == {("m0", "production"), ("m1", "production"), ("m2", "production")}
    assert {route_key(f"m{i}", "production") for i in range(3)} <= result.route_keys
    inventory = result.inventory_rows or []
    statuses = deployment_statuses(result, inventory, [], {}, {}, 0.0)
    assert statuses[("m0", "production")].state == "failure"
    assert statuses[("m0", "production")].reason == DELETION_HELD
    aggregate = commit_statuses(list(statuses.values()), [], result.deletion_hold)[-1]
    assert aggregate.context == AGGREGATE_CONTEXT and aggregate.state == "failure"
    assert aggregate.description == result.deletion_hold
    assert aggregate.description.startswith("held: would remove 3 of 3 deployments; confirm with `modelfleet "
                                            f"confirm {REVISION[:12]}` or a commit trailer")
    assert len(aggregate.description) <= 140  # forges cut longer descriptions


def test_without_a_hold_the_aggregate_is_as_before() -> None:
    result = _plan_after(9, [f"m{i}" for i in range(9)])
    assert result.deletion_hold is None
    assert commit_statuses([], [], result.deletion_hold)[-1].state == "success"


def test_containers_that_are_not_ours_do_not_count() -> None:
    # With an inventory, only our containers run "deployments": one of 2 ours removed is 50 %, applied.
    observed = _running(2)
    stranger = ObservedReplica("h0", "other", "mf-production-x-0", "x", "production", 0, "h", "r", True)
    result = plan(PlanInputs(catalog=load_tree(_files(["m0"])), hosts=HOSTS, revision=REVISION,
                             observed=[*observed, stranger], inventory=_rows(observed)))
    assert result.deletion_hold is None
    assert [(a.op, a.model) for a in result.actions] == [("remove", "m1")]


@pytest.mark.parametrize(("message", "confirmed"), [
    ("remove old models\n\nModelfleet-Confirm: deletions\n", True),
    ("remove old models\n\nSigned-off-by: a <a@b>\nmodelfleet-confirm:  Deletions\n", True),
    ("remove old models\nModelfleet-Confirm: deletions", True),
    ("Modelfleet-Confirm: deletions", False),  # the subject is not a trailer
    ("remove old models\n\nModelfleet-Confirm: deletions\n\nmore text", False),  # not in the last paragraph
    ("remove old models\n\nModelfleet-Confirm: nothing\n", False),
    ("", False),
    (None, False),
])
def test_the_commit_trailer(message: str | None, confirmed: bool) -> None:
    assert confirms_deletions(message) is confirmed


def test_confirmed_shas_match_the_commit_or_a_prefix() -> None:
    assert is_confirmed(REVISION, [REVISION[:12]])
    assert is_confirmed(REVISION, [REVISION])
    assert not is_confirmed(REVISION, ["fedcba9876"])
    assert not is_confirmed(REVISION, ["0123"])  # too short to name a commit
    assert not is_confirmed(REVISION, [])
    assert is_confirmed(REVISION, [], "x\n\nModelfleet-Confirm: deletions")
