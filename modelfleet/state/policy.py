"""Policy algebra (README.md, "Manifests").

* policies of the same type combine by UNION (a host passes if any of them allows it);
* different types combine by INTERSECTION (a host must pass every type that is constrained);
* a deployment's policies are INTERSECTED with its environment's for each type, so a deployment
  can narrow, never widen, what its environment allows.

Everything here returns explanations as well as answers, because "why not this host?" is the
first question a user asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from modelfleet.state.manifests import FlavorRule, LocationRule, Policy
from modelfleet.state.pool import Host

PLACEMENT_TYPES = ("location", "flavor")


@dataclass(frozen=True)
class PolicyLayer:
    """The policies one party (environment or deployment) applies, with a label for messages."""

    owner: str  # e.g. 'environment "production"' or 'deployment'
    policies: tuple[Policy, ...]

    def of_type(self, kind: str) -> tuple[Policy, ...]:
        return tuple(p for p in self.policies if p.spec.type == kind)


def location_matches(rule: LocationRule, host: Host) -> bool:
    loc = host.location
    if rule.type == "country":
        return loc.country == rule.name
    if rule.type == "continent":
        return loc.continent == rule.name
    return loc.name == rule.name


def flavor_matches(rule: FlavorRule, host: Host) -> bool:
    return any(f.name == rule.name and f.type == rule.type for f in host.flavors)


def _layer_allows(layer: PolicyLayer, kind: str, host: Host) -> bool | None:
    """None when the layer does not constrain this type at all."""
    policies = layer.of_type(kind)
    if not policies:
        return None
    if kind == "location":
        return any(location_matches(r, host) for p in policies for r in p.spec.locations or ())
    return any(flavor_matches(r, host) for p in policies for r in p.spec.flavors or ())


def _names(policies: Sequence[Policy]) -> str:
    return ", ".join(p.metadata.name for p in policies)


def exclusion_reason(layers: Sequence[PolicyLayer], host: Host) -> str | None:
    """Why the policies exclude this host, or None if they allow it."""
    for kind in PLACEMENT_TYPES:
        for layer in layers:
            if _layer_allows(layer, kind, host) is False:
                policies = layer.of_type(kind)
                if kind == "location":
                    what = f"location {host.location.describe()}"
                else:
                    what = "flavor " + ", ".join(f.name for f in host.flavors)
                label = "policy" if len(policies) == 1 else "policies"
                return f"{what} not allowed by {label} {_names(policies)} of {layer.owner}"
    return None


def allowed_flavors(layers: Sequence[PolicyLayer]) -> frozenset[str] | None:
    """Flavor names every layer allows (union within a layer, intersection across); None = any."""
    allowed: frozenset[str] | None = None
    for layer in layers:
        policies = layer.of_type("flavor")
        if not policies:
            continue
        names = frozenset(r.name for p in policies for r in p.spec.flavors or ())
        allowed = names if allowed is None else allowed & names
    return allowed


def allowed_locations(layers: Sequence[PolicyLayer], hosts: Sequence[Host]) -> list[str]:
    """Names of the host locations that pass every layer's location policies (for messages)."""
    return sorted({h.location.name for h in hosts
                   if all(_layer_allows(layer, "location", h) is not False for layer in layers)})
