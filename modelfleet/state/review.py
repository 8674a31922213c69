"""Plans of review branches, decided here (pure): what a branch's head would change relative to
what runs now, and the ``modelfleet/plan`` commit status that says so.

The daemon plans a review head with the pass's function and inputs (only the catalog is the
branch's) and never applies it; this module compares the two desired states (the pass's and the
branch's), counts the actions, and shapes the document the plan page shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelfleet.state.desired import DeploymentState, DesiredState
from modelfleet.state.loader import Catalog
from modelfleet.state.plan import Action
from modelfleet.state.status import State
from modelfleet.state.units import format_memory

Key = tuple[str, str]
PLAN_CONTEXT = "modelfleet/plan"
# The fields a change is reported in, in this order (what a reviewer looks at first, first).
FIELDS = ("enabled", "replicas", "serverless", "image", "runtime", "origin", "policies", "resources", "hosts",
          "spec_hash")
COUNTED_OPS = ("create", "replace", "remove")
OTHER_OPS = ("start", "stop", "pause")


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: object
    new: object

    def to_json(self) -> dict[str, object]:
        return {"field": self.field, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class DeploymentChange:
    model: str
    environment: str
    changes: tuple[FieldChange, ...]

    def to_json(self) -> dict[str, object]:
        return {"model": self.model, "environment": self.environment, "changes": [c.to_json() for c in self.changes]}


@dataclass(frozen=True)
class ReviewDiff:
    """Deployments the branch adds, changes and removes relative to the base's desired state."""

    added: tuple[Key, ...] = ()
    changed: tuple[DeploymentChange, ...] = ()
    removed: tuple[Key, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"added": [{"model": m, "environment": e} for m, e in self.added],
                "changed": [c.to_json() for c in self.changed],
                "removed": [{"model": m, "environment": e} for m, e in self.removed]}


def policies_of(catalog: Catalog | None, key: Key) -> list[str]:
    """The policies a deployment obeys: its environment's, then its own (names, as written)."""
    if catalog is None:
        return []
    names: list[str] = []
    environment = catalog.environments.get(key[1])
    if environment is not None:
        names += environment[0].spec.policies
    model = catalog.models.get(key[0])
    for entry in model.deployments if model is not None else ():
        if entry.environment == key[1] and entry.spec is not None:
            names += [p for p in entry.spec.policies if p not in names]
    return names


def summary(state: DeploymentState, policies: Sequence[str] = ()) -> dict[str, object]:
    """What of a deployment a review compares (FIELDS)."""
    runtime = state.runtime
    origin = state.origin
    return {
        "enabled": state.enabled,
        "replicas": state.replicas,
        "serverless": state.serverless,
        "image": runtime.image if runtime is not None else None,
        "runtime": runtime.type if runtime is not None else None,
        "origin": _origin_text(origin),
        "policies": list(policies),
        "resources": f"{runtime.cpus:g} cpu, {format_memory(runtime.memory)}" if runtime is not None else None,
        "hosts": sorted(state.hosts),
        "spec_hash": (state.spec_hash or "")[:12] or None,
    }


def _origin_text(origin: Mapping[str, object] | None) -> str | None:
    """``hf:org/name@<commit>`` or ``sha256:<hex>`` (the commit or digest that would be deployed)."""
    if not origin:
        return None
    hf = origin.get("huggingface")
    if isinstance(hf, Mapping):
        return f"hf:{hf.get('model')}@{hf.get('commit') or hf.get('revision')}"
    file = origin.get("file")
    if isinstance(file, Mapping):
        return str(file.get("sha256") or file.get("path"))
    return str(dict(origin))


def compare(base: DesiredState | None, head: DesiredState, base_catalog: Catalog | None = None,
            head_catalog: Catalog | None = None) -> ReviewDiff:
    """Added, changed (field by field, old -> new) and removed deployments from ``base`` to
    ``head``. ``base`` None: nothing is known to run, everything is added."""
    before = base.deployments if base is not None else {}
    after = head.deployments
    added = tuple(sorted(k for k in after if k not in before))
    removed = tuple(sorted(k for k in before if k not in after))
    changed = []
    for key in sorted(k for k in after if k in before):
        old = summary(before[key], policies_of(base_catalog, key))
        new = summary(after[key], policies_of(head_catalog, key))
        changes = tuple(FieldChange(f, old[f], new[f]) for f in FIELDS if old[f] != new[f])
        if changes:
            changed.append(DeploymentChange(key[0], key[1], changes))
    return ReviewDiff(added, tuple(changed), removed)


def count_actions(actions: Sequence[Action]) -> dict[str, int]:
    counts = dict.fromkeys((*COUNTED_OPS, *OTHER_OPS), 0)
    for action in actions:
        counts[action.op] = counts.get(action.op, 0) + 1
    return counts


def describe_actions(actions: Sequence[Action]) -> str:
    """``3 to create, 1 to replace, 0 to remove`` (and starts/stops, when there are any)."""
    counts = count_actions(actions)
    parts = [f"{counts[op]} to {op}" for op in COUNTED_OPS]
    parts += [f"{counts[op]} to {op}" for op in OTHER_OPS if counts[op]]
    return ", ".join(parts)


def plan_status(head: DesiredState, actions: Sequence[Action]) -> tuple[State, str]:
    """The ``modelfleet/plan`` status of a planned head: ``failure`` with the first error (file:line
    first) when the branch has errors, else ``success`` with what the plan would do."""
    if head.errors:
        more = f" (+{len(head.errors) - 1} more)" if len(head.errors) > 1 else ""
        return "failure", f"{head.errors[0]}{more}"
    return "success", describe_actions(actions)


def review_document(branch: str, head: str, base_revision: str | None, base: DesiredState | None,
                    base_catalog: Catalog | None, head_catalog: Catalog, plan_json: Mapping[str, object],
                    desired: DesiredState, actions: Sequence[Action], planned_at: float) -> dict[str, object]:
    """What the plan page and ``/api/v1/plans/<sha>`` show (``stale`` is added when served)."""
    state, description = plan_status(desired, actions)
    return {
        "branch": branch,
        "revision": head,
        "base": base_revision,
        "plannedAt": planned_at,
        "state": state,
        "description": description,
        "counts": count_actions(actions),
        "diff": compare(base, desired, base_catalog, head_catalog).to_json(),
        "errors": [e.to_json() for e in desired.errors],
        "plan": dict(plan_json),
    }


def failed_document(branch: str, head: str, base_revision: str | None, error: str,
                    planned_at: float) -> dict[str, object]:
    """A head that could not be planned at all (unreadable, too slow): the review's failure."""
    return {"branch": branch, "revision": head, "base": base_revision, "plannedAt": planned_at,
            "state": "failure", "description": error, "counts": count_actions(()),
            "diff": ReviewDiff().to_json(), "errors": [], "plan": None}
