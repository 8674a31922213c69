"""Policy algebra (README.md, "Manifests"), table-driven over fixture repos named after the outcome.

Every fixture is planned against tests/state/fixtures/pool.yaml:
nyc-1, sfo-1 (US/NA) · yul-1 (CA/NA) · par-1, par-2 (FR/EU, paris-1) · fra-1, gpu-1 (DE/EU,
frankfurt-1) · tyo-1 (JP/AS). Flavors: nyc-1, yul-1, tyo-1 intel-icelake; par-1
intel-sapphire-rapids; sfo-1, par-2, fra-1 amd-genoa; gpu-1 nvidia-a100 (gpu) + amd-genoa.
"""

from __future__ import annotations

import pytest

from modelfleet.state.manifests import Policy
from modelfleet.state.policy import PolicyLayer, allowed_flavors, allowed_locations, exclusion_reason
from tests.state.helpers import desired_of, fixture_pool, fixture_tree, host

ALL = {"nyc-1", "sfo-1", "yul-1", "par-1", "par-2", "fra-1", "gpu-1", "tyo-1"}

ELIGIBLE = [
    # fixture (named after the outcome), model, eligible hosts
    ("env-us-dep-na-eu-only-us", "m", {"nyc-1", "sfo-1"}),
    ("two-location-policies-union", "m", {"par-1", "par-2", "tyo-1"}),
    ("location-and-flavor-intersect", "m", {"par-2", "fra-1", "gpu-1"}),
    ("dep-cannot-widen-env-narrowed-to-env", "wider", {"par-1", "par-2"}),
    ("dep-cannot-widen-env-narrowed-to-env", "disjoint", set()),
    ("two-flavor-policies-union", "m", {"nyc-1", "yul-1", "par-1", "tyo-1"}),
    ("dep-flavor-policy-narrows-env", "m", {"sfo-1", "par-2", "fra-1", "gpu-1"}),
    ("no-policies-every-host", "m", ALL),
    ("requested-flavor-only-hosts-offering-it", "m", {"gpu-1"}),
    ("location-type-matches-location-name", "m", {"par-1", "par-2"}),
    ("lowercase-country-matches", "m", {"nyc-1", "sfo-1"}),
    ("max-token-policy-does-not-restrict-hosts", "m", ALL),
    ("dep-location-narrows-env-location-and-flavor", "m", {"par-2"}),
    ("flavor-type-must-match", "m", set()),  # a100 is a gpu flavor; the policy names a cpu one
]


@pytest.mark.parametrize(("fixture", "model", "eligible"), ELIGIBLE,
                         ids=[f"{f}:{m}" for f, m, _ in ELIGIBLE])
def test_policy_algebra_selects_hosts(fixture: str, model: str, eligible: set[str]) -> None:
    catalog, desired = desired_of(fixture_tree(fixture), fixture_pool())
    assert catalog.all_errors() == []
    state = desired.deployments[(model, "production")]
    assert set(state.eligible_hosts) == eligible
    # Every host is either eligible or excluded with a reason, never both.
    assert set(state.excluded) == ALL - eligible
    assert all(reason for reason in state.excluded.values())
    # Placement only ever uses eligible hosts; no eligible host means unschedulable, not an error.
    assert set(state.hosts) <= eligible
    if eligible:
        assert state.hosts and state.unschedulable is None
    else:
        assert state.hosts == [] and "no eligible host" in (state.unschedulable or "")


EXCLUSION_REASONS = [
    # fixture, model, host, words the reason must contain
    ("env-us-dep-na-eu-only-us", "m", "yul-1",
     ['location montreal-1 (CA, NA)', 'policy us of environment "production"']),
    ("env-us-dep-na-eu-only-us", "m", "par-1", ['policy us of environment "production"']),
    ("env-us-dep-na-eu-only-us", "m", "tyo-1", ['policy us of environment "production"']),
    ("two-location-policies-union", "m", "fra-1", ["policies france, japan of environment"]),
    ("dep-cannot-widen-env-narrowed-to-env", "wider", "fra-1", ['policy france of environment "production"']),
    ("dep-cannot-widen-env-narrowed-to-env", "disjoint", "par-1", ["policy us of the deployment"]),
    ("dep-flavor-policy-narrows-env", "m", "par-1",
     ["flavor intel-sapphire-rapids", "policy genoa-only of the deployment"]),
    ("location-and-flavor-intersect", "m", "par-1", ['flavor intel-sapphire-rapids', "policy amd"]),
    ("requested-flavor-only-hosts-offering-it", "m", "fra-1", ["does not offer requested flavor nvidia-a100"]),
]


@pytest.mark.parametrize(("fixture", "model", "host_name", "words"), EXCLUSION_REASONS,
                         ids=[f"{f}:{m}:{h}" for f, m, h, _ in EXCLUSION_REASONS])
def test_exclusion_reason_names_the_policy_and_its_owner(
        fixture: str, model: str, host_name: str, words: list[str]) -> None:
    _, desired = desired_of(fixture_tree(fixture), fixture_pool())
    reason = desired.deployments[(model, "production")].excluded[host_name]
    for word in words:
        assert word in reason


FLAVOR_ERRORS = [
    # fixture, line, field, message, hint
    ("flavor-not-allowed-error-names-allowed", 8, "spec.deployments[0].flavors[1]",
     'flavor "nvidia-a100" is not allowed by policies of environment "production"',
     "allowed: amd-genoa, intel-sapphire-rapids"),
    ("dep-flavor-policy-disjoint-from-env-error", 9, "spec.deployments[0].flavors[0]",
     'flavor "nvidia-a100" is not allowed by policies of environment "production" and the deployment',
     "no flavor is allowed"),
]


@pytest.mark.parametrize(("fixture", "line", "field", "message", "hint"), FLAVOR_ERRORS,
                         ids=[f[0] for f in FLAVOR_ERRORS])
def test_requested_flavor_not_allowed_is_an_error(
        fixture: str, line: int, field: str, message: str, hint: str) -> None:
    catalog, desired = desired_of(fixture_tree(fixture), fixture_pool())
    assert catalog.all_errors() == []  # the manifests are well-formed: it is a policy error
    state = desired.deployments[("m", "production")]
    assert [(e.file, e.line, e.field, e.message, e.hint) for e in state.errors] == [
        ("model.yaml", line, field, message, hint)]
    assert str(state.errors[0]).startswith(f"model.yaml:{line}: {field}: flavor ")
    # An error, not a silent fallback: no host, no replica, and the deployment is frozen.
    assert state.hosts == [] and state.eligible_hosts == []
    assert ("m", "production") in desired.frozen
    assert [r for r in desired.replicas if r.model == "m"] == []
    assert state.errors[0] in desired.errors


# --- the functions themselves -------------------------------------------------------------------


def _policy(name: str, kind: str, *rules: tuple[str, str]) -> Policy:
    key = {"location": "locations", "flavor": "flavors"}[kind]
    return Policy.model_validate({
        "apiVersion": "modelfleet.dev/v1alpha1", "kind": "Policy", "metadata": {"name": name},
        "spec": {"type": kind, key: [{"type": t, "name": n} for t, n in rules]},
    })


US = _policy("us", "location", ("country", "US"))
EU = _policy("eu", "location", ("continent", "EU"))
NA_EU = _policy("na-eu", "location", ("continent", "NA"), ("continent", "EU"))
MODERN = _policy("modern", "flavor", ("cpu", "intel-sapphire-rapids"), ("cpu", "amd-genoa"))
GENOA = _policy("genoa", "flavor", ("cpu", "amd-genoa"))
ICELAKE = _policy("icelake", "flavor", ("cpu", "intel-icelake"))


@pytest.mark.parametrize(("env", "dep", "expected"), [
    ((), (), None),                                         # unconstrained
    ((MODERN,), (), {"intel-sapphire-rapids", "amd-genoa"}),
    ((MODERN, ICELAKE), (), {"intel-sapphire-rapids", "amd-genoa", "intel-icelake"}),  # union
    ((MODERN,), (GENOA,), {"amd-genoa"}),                   # deployment narrows
    ((GENOA,), (MODERN,), {"amd-genoa"}),                   # deployment cannot widen
    ((MODERN,), (ICELAKE,), set()),                         # disjoint: nothing allowed
    ((), (ICELAKE,), {"intel-icelake"}),                    # only the deployment constrains
    ((US,), (), None),                                      # location policies say nothing of flavors
])
def test_allowed_flavors(env: tuple[Policy, ...], dep: tuple[Policy, ...], expected: set[str] | None) -> None:
    layers = (PolicyLayer("environment", env), PolicyLayer("deployment", dep))
    result = allowed_flavors(layers)
    assert (None if result is None else set(result)) == expected


def test_allowed_locations_intersects_layers() -> None:
    hosts = [host("a", location="paris-1", country="FR", continent="EU"),
             host("b", location="virginia-1", country="US", continent="NA"),
             host("c", location="tokyo-1", country="JP", continent="AS")]
    assert allowed_locations([PolicyLayer("env", (US,)), PolicyLayer("dep", (NA_EU,))], hosts) == ["virginia-1"]
    assert allowed_locations([PolicyLayer("env", (NA_EU,))], hosts) == ["paris-1", "virginia-1"]
    assert allowed_locations([PolicyLayer("env", (EU,)), PolicyLayer("dep", (US,))], hosts) == []


def test_exclusion_reason_checks_location_before_flavor_and_env_before_deployment() -> None:
    h = host("b", location="virginia-1", country="US", continent="NA", flavors=["intel-icelake"])
    env, dep = PolicyLayer('environment "prod"', (EU, MODERN)), PolicyLayer("the deployment", (US,))
    assert exclusion_reason([env, dep], h) == (
        'location virginia-1 (US, NA) not allowed by policy eu of environment "prod"')
    ok = host("p", flavors=["amd-genoa"])
    assert exclusion_reason([env, PolicyLayer("the deployment", (GENOA,))], ok) is None
    assert exclusion_reason([env, PolicyLayer("the deployment", (ICELAKE,))], ok) == (
        "flavor amd-genoa not allowed by policy icelake of the deployment")
