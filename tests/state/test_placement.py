"""Placement: capacity, spread across locations first, stability, and explanations."""

from __future__ import annotations

import functools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelfleet.state.placement import PlacementRequest, place
from modelfleet.state.pool import Host
from tests.state.helpers import desired_of, environment, examples, fixture_pool, host, tree

GiB = 2**30

PARIS = [host("par-1", location="paris-1"), host("par-2", location="paris-1"), host("par-3", location="paris-1")]
FRANKFURT = [host("fra-1", location="frankfurt-1", country="DE"), host("fra-2", location="frankfurt-1", country="DE")]
AMSTERDAM = [host("ams-1", location="amsterdam-1", country="NL")]


def request(name: str, replicas: int, eligible: list[Host] | tuple[str, ...], cpus: float = 1,
            memory: int = GiB, env: str = "production") -> PlacementRequest:
    names = tuple(h.name for h in eligible) if isinstance(eligible, list) else eligible
    return PlacementRequest((name, env), replicas, cpus, memory, names)


# --- capacity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("cpus", "memory", "per_replica_cpus", "per_replica_memory", "placed"), [
    (2, "32Gi", 0.5, GiB, 4),        # CPU-bound: 4 × 0.5 = 2
    (16, "3Gi", 0.5, GiB, 3),        # memory-bound: 3 × 1Gi = 3Gi
    (0.3, "1Gi", 0.1, 2**20, 3),     # 0.1 + 0.1 + 0.1 fits in 0.3 despite float rounding
    (1, "1Gi", 2, 2**20, 0),         # too big for the host at all
])
def test_capacity_is_respected(cpus: float, memory: str, per_replica_cpus: float,
                               per_replica_memory: int, placed: int) -> None:
    h = host("h-1", cpus=cpus, memory=memory)
    result = place([request("m", 5, [h], per_replica_cpus, per_replica_memory)], [h])
    assert len(result.assignments[("m", "production")]) == placed
    assert "not enough capacity for" in result.unschedulable[("m", "production")]
    assert "h-1 has" in result.unschedulable[("m", "production")]


def test_capacity_is_shared_between_deployments_in_key_order() -> None:
    h = host("h-1", cpus=3)
    result = place([request("b", 2, [h]), request("a", 2, [h])], [h])
    assert len(result.assignments[("a", "production")]) == 2
    assert len(result.assignments[("b", "production")]) == 1
    assert ("b", "production") in result.unschedulable and ("a", "production") not in result.unschedulable
    assert result.free["h-1"][0] == pytest.approx(0)


def test_no_eligible_host_is_unschedulable_with_a_pointer_to_the_exclusions() -> None:
    result = place([request("m", 2, ())], PARIS)
    assert result.assignments[("m", "production")] == {}
    assert "no eligible host for 2 replica(s)" in result.unschedulable[("m", "production")]


# --- spread -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("replicas", "per_location"), [
    (2, [1, 1, 0]),      # two replicas never share a location while another is free
    (3, [1, 1, 1]),
    (4, [2, 1, 1]),
    (6, [2, 2, 2]),
])
def test_spread_across_locations_first(replicas: int, per_location: list[int]) -> None:
    hosts = PARIS + FRANKFURT + AMSTERDAM
    result = place([request("m", replicas, hosts)], hosts)
    placed = result.assignments[("m", "production")]
    assert sorted(range(replicas)) == sorted(placed)
    by_name = {h.name: h for h in hosts}
    counts = Counter(by_name[h].location.name for h in placed.values())
    assert sorted(counts.values(), reverse=True) == [c for c in per_location if c]
    # Within a location, every host gets one before any gets two.
    per_host = Counter(placed.values())
    for loc in counts:
        in_loc = [per_host[h.name] for h in hosts if h.location.name == loc]
        assert max(in_loc) - min(in_loc) <= 1


def test_spread_then_hosts_within_a_location() -> None:
    result = place([request("m", 3, PARIS)], PARIS)
    assert sorted(result.assignments[("m", "production")].values()) == ["par-1", "par-2", "par-3"]


def test_a_full_location_does_not_block_the_others() -> None:
    small = host("ams-1", location="amsterdam-1", cpus=1)
    hosts = [*PARIS, small]
    result = place([request("m", 3, hosts, cpus=2)], hosts)
    assert set(result.assignments[("m", "production")].values()) <= {"par-1", "par-2", "par-3"}
    assert len(result.assignments[("m", "production")]) == 3


def test_placement_is_deterministic_and_independent_of_input_order() -> None:
    hosts = PARIS + FRANKFURT + AMSTERDAM
    reqs = [request(f"m{i}", 1 + i % 3, hosts) for i in range(10)]
    a = place(reqs, hosts)
    b = place(list(reversed(reqs)), list(reversed(hosts)))
    assert a.assignments == b.assignments


# --- stability ----------------------------------------------------------------------------------


def test_previous_replicas_stay_even_where_spread_would_put_them_elsewhere() -> None:
    hosts = PARIS + FRANKFURT
    previous = {("m", "production"): {0: "par-1", 1: "par-2"}}
    result = place([request("m", 3, hosts)], hosts, previous)
    placed = result.assignments[("m", "production")]
    assert placed[0] == "par-1" and placed[1] == "par-2"
    assert placed[2] in {"fra-1", "fra-2"}  # the new one goes where the deployment is thin


@pytest.mark.parametrize(("previous", "eligible", "replicas", "kept"), [
    ({0: "par-1", 1: "fra-1"}, ("par-1", "par-2", "par-3"), 2, {0: "par-1"}),   # fra-1 no longer eligible
    ({0: "par-1", 1: "par-2", 2: "par-3"}, ("par-1", "par-2", "par-3"), 2, {0: "par-1", 1: "par-2"}),  # scaled
    ({0: "gone-1"}, ("par-1",), 1, {}),                                          # host left the pool
])
def test_previous_replicas_move_only_when_they_must(previous: dict[int, str], eligible: tuple[str, ...],
                                                    replicas: int, kept: dict[int, str]) -> None:
    hosts = PARIS + FRANKFURT
    result = place([request("m", replicas, eligible)], hosts, {("m", "production"): previous})
    placed = result.assignments[("m", "production")]
    assert {i: h for i, h in placed.items() if previous.get(i) == h} == kept
    assert sorted(placed) == list(range(replicas))


def test_previous_replica_on_a_host_now_too_full_moves() -> None:
    h1, h2 = host("h-1", cpus=2), host("h-2", location="lyon-1", cpus=8)
    # Another deployment (sorted first) already holds h-1 entirely.
    previous = {("a", "production"): {0: "h-1"}, ("b", "production"): {0: "h-1"}}
    result = place([request("a", 1, [h1, h2], cpus=2), request("b", 1, [h1, h2], cpus=1)], [h1, h2], previous)
    assert result.assignments[("a", "production")] == {0: "h-1"}
    assert result.assignments[("b", "production")] == {0: "h-2"}


LOCATIONS = ["paris-1", "frankfurt-1", "amsterdam-1", "virginia-1"]


@functools.cache
def cached_host(name: str, location: str, cpus: float = 8, memory: str = "32Gi") -> Host:
    return host(name, location=location, cpus=cpus, memory=memory)


@st.composite
def pools(draw: st.DrawFn, min_size: int = 1) -> list[Host]:
    n = draw(st.integers(min_size, 8))
    return [cached_host(f"h-{i}", draw(st.sampled_from(LOCATIONS)),
                        draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from(["2Gi", "8Gi", "32Gi"])))
            for i in range(n)]


@st.composite
def requests_for(draw: st.DrawFn, hosts: list[Host], prefix: str = "m") -> list[PlacementRequest]:
    n = draw(st.integers(0, 6))
    names = [h.name for h in hosts]
    return [request(f"{prefix}{i}", draw(st.integers(0, 4)),
                    tuple(draw(st.lists(st.sampled_from(names), unique=True))) if names else (),
                    cpus=draw(st.sampled_from([0.1, 0.25, 0.5, 1, 2])),
                    memory=draw(st.sampled_from([2**27, 2**29, GiB, 4 * GiB])))
            for i in range(n)]


def _check_valid(result_assignments: dict, reqs: list[PlacementRequest], hosts: list[Host]) -> None:
    by_key = {r.key: r for r in reqs}
    used: dict[str, list[float]] = {h.name: [0.0, 0] for h in hosts}
    for key, placed in result_assignments.items():
        req = by_key[key]
        assert set(placed) <= set(range(req.replicas))
        for h in placed.values():
            assert h in req.eligible
            used[h][0] += req.cpus
            used[h][1] += req.memory
    for h in hosts:
        assert used[h.name][0] <= h.capacity.cpus + 1e-6
        assert used[h.name][1] <= h.capacity.memory


@settings(max_examples=examples(100), deadline=None)
@given(st.data())
def test_property_capacity_eligibility_and_completeness(data: st.DataObject) -> None:
    hosts = data.draw(pools())
    reqs = data.draw(requests_for(hosts))
    result = place(reqs, hosts)
    _check_valid(result.assignments, reqs, hosts)
    for req in reqs:
        placed = len(result.assignments[req.key])
        # Either every replica is placed, or the deployment says why not.
        assert placed == req.replicas or req.key in result.unschedulable


@settings(max_examples=examples(100), deadline=None)
@given(st.data())
def test_property_adding_an_unrelated_deployment_or_host_moves_nothing(data: st.DataObject) -> None:
    hosts = data.draw(pools())
    reqs = data.draw(requests_for(hosts))
    first = place(reqs, hosts)

    extra_hosts = data.draw(st.lists(st.sampled_from(LOCATIONS), max_size=2))
    new_hosts = hosts + [cached_host(f"new-{i}", loc) for i, loc in enumerate(extra_hosts)]
    # The new deployments may use any host, old or new ("z" sorts them after, "0" before the old ones).
    prefix = data.draw(st.sampled_from(["0new", "znew"]))
    new_reqs = data.draw(requests_for(new_hosts, prefix=prefix))
    second = place(reqs + new_reqs, new_hosts, previous=first.assignments)

    for key, placed in first.assignments.items():
        assert {i: second.assignments[key][i] for i in placed} == placed
    _check_valid(second.assignments, reqs + new_reqs, new_hosts)


@settings(max_examples=examples(100), deadline=None)
@given(st.data())
def test_property_replanning_with_the_previous_placement_is_a_fixed_point(data: st.DataObject) -> None:
    hosts = data.draw(pools())
    reqs = data.draw(requests_for(hosts))
    first = place(reqs, hosts)
    assert place(reqs, hosts, previous=first.assignments).assignments == first.assignments


# --- explanations (through compute_desired) -----------------------------------------------------


def test_every_excluded_host_has_an_explanation() -> None:
    api = "apiVersion: modelfleet.dev/v1alpha1"
    files = tree(**{
        "env.yaml": environment("production", "eu"),
        "policy.yaml": f"{api}\nkind: Policy\nmetadata: {{name: eu}}\n"
                       "spec: {type: location, locations: [{type: continent, name: EU}]}\n",
        "m.yaml": f"""
            {api}
            kind: Model
            metadata: {{name: m}}
            spec:
              deployments:
                - environment: production
                  flavors: [amd-genoa]
                  replicas: 2
                  runtime: {{type: custom, image: x, resources: {{cpus: 12, memory: 1Gi}}}}
            """})
    hosts = fixture_pool()
    _, desired = desired_of(files, hosts, down_hosts=frozenset({"fra-1"}))
    state = desired.deployments[("m", "production")]
    assert state.eligible_hosts == ["par-2", "gpu-1"]  # in pool order
    assert state.excluded == {
        "nyc-1": 'location new-york-1 (US, NA) not allowed by policy eu of environment "production"',
        "sfo-1": 'location san-francisco-1 (US, NA) not allowed by policy eu of environment "production"',
        "yul-1": 'location montreal-1 (CA, NA) not allowed by policy eu of environment "production"',
        "tyo-1": 'location tokyo-1 (JP, AS) not allowed by policy eu of environment "production"',
        "par-1": "does not offer requested flavor amd-genoa",
        "fra-1": "host is down",
    }
    assert sorted(state.hosts) == ["gpu-1", "par-2"]


def test_a_host_too_small_for_one_replica_is_excluded_with_sizes() -> None:
    files = tree(**{"env.yaml": environment("production"), "m.yaml": """
        apiVersion: modelfleet.dev/v1alpha1
        kind: Model
        metadata: {name: big}
        spec:
          deployments:
            - environment: production
              runtime: {type: custom, image: x, resources: {cpus: 20, memory: 1Gi}}
        """})
    _, desired = desired_of(files, fixture_pool())
    state = desired.deployments[("big", "production")]
    assert state.eligible_hosts == ["gpu-1"]
    assert state.excluded["par-2"] == "too small: needs 20 cpus / 1Gi, host has 16 cpus / 64Gi"
    assert set(state.excluded) | set(state.eligible_hosts) == {h.name for h in fixture_pool()}


# --- locality: hosts that hold the model's artifact ---------------------------------------------


def _warm(name: str, replicas: int, eligible: list[Host], warm: set[str], serverless: bool,
          cpus: float = 1) -> PlacementRequest:
    return PlacementRequest((name, "production"), replicas, cpus, GiB, tuple(h.name for h in eligible),
                            warm=frozenset(warm), prefer_warm=serverless)


def test_a_serverless_replica_goes_to_a_host_that_holds_its_artifact_before_spread() -> None:
    hosts = PARIS + FRANKFURT
    previous = {("m", "production"): {0: "par-1"}}
    # Spread alone would put the second replica in frankfurt-1; par-3 has the model already.
    result = place([_warm("m", 2, hosts, {"par-3"}, serverless=True)], hosts, previous)
    assert result.assignments[("m", "production")] == {0: "par-1", 1: "par-3"}
    cold = place([_warm("m", 2, hosts, set(), serverless=True)], hosts, previous)
    assert cold.assignments[("m", "production")][1] in {"fra-1", "fra-2"}


def test_an_always_on_replica_keeps_spread_first_and_uses_the_artifact_to_break_the_tie() -> None:
    hosts = PARIS + FRANKFURT
    previous = {("m", "production"): {0: "par-1"}}
    result = place([_warm("m", 2, hosts, {"par-3", "fra-2"}, serverless=False)], hosts, previous)
    assert result.assignments[("m", "production")][1] == "fra-2"  # frankfurt-1 (spread), then the warm one
    # Whichever frankfurt host holds it: the artifact decided, not the rendezvous hash.
    assert place([_warm("m", 2, hosts, {"fra-1"}, serverless=False)], hosts,
                 previous).assignments[("m", "production")][1] == "fra-1"


def test_a_warm_host_without_room_is_passed_over_for_one_with_room() -> None:
    small, roomy = host("small", cpus=1), host("roomy", location="lyon-1", cpus=8)
    previous = {("a", "production"): {0: "small"}}
    result = place([request("a", 1, [small, roomy], cpus=1), _warm("m", 1, [small, roomy], {"small"}, True)],
                   [small, roomy], previous)
    assert result.assignments[("m", "production")] == {0: "roomy"}
    assert ("m", "production") not in result.unschedulable


def test_a_replica_that_runs_stays_where_it_is_even_when_another_host_holds_the_artifact() -> None:
    hosts = PARIS + FRANKFURT
    previous = {("m", "production"): {0: "fra-1"}}
    result = place([_warm("m", 1, hosts, {"par-1"}, serverless=True)], hosts, previous)
    assert result.assignments[("m", "production")] == {0: "fra-1"}
