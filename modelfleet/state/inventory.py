"""The owned inventory (what the daemon created), reconciled against what the hosts show (pure).

The store keeps one row per container the daemon created or is about to create (write-ahead), so a
kill at any point converges and only what we own is ever removed. Each pass brings the rows in line
with the observation; the changes are data the shell writes back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from modelfleet.state.actual import ObservedReplica

HostName = str
Name = str
Slot = tuple[str, str, int]  # model, environment, replica index


@dataclass(frozen=True)
class InventoryRow:
    host: str
    name: str
    container_id: str | None
    model: str
    environment: str
    replica: int
    spec_hash: str
    revision: str
    phase: str  # creating | active | removing
    ready: bool
    url: str | None
    probe_url: str | None

    @property
    def slot(self) -> Slot:
        return (self.model, self.environment, self.replica)

    def as_observed(self, running: bool = True) -> ObservedReplica:
        """The replica this row says exists (for hosts we cannot see right now)."""
        return ObservedReplica(self.host, self.container_id or "", self.name, self.model, self.environment,
                               self.replica, self.spec_hash, self.revision, running)


@dataclass(frozen=True)
class ReadyUpdate:
    host: str
    name: str
    container_id: str
    url: str
    probe_url: str
    fill_urls: bool  # the row had no URLs (adopted, or created by a daemon killed before it wrote them)


@dataclass(frozen=True)
class InventoryChanges:
    """Writes that bring the store in line with a pass's facts, in this order."""

    forget: tuple[tuple[HostName, Name], ...] = ()  # gone from a reachable host
    container_ids: tuple[tuple[HostName, Name, str], ...] = ()  # write-ahead row found on its host
    unready: tuple[tuple[HostName, Name], ...] = ()  # was ready, no longer runs
    adopt: tuple[ObservedReplica, ...] = ()  # managed, not in the inventory, exactly a desired replica
    ready: tuple[ReadyUpdate, ...] = ()  # answered its readiness probe

    def __bool__(self) -> bool:
        return bool(self.forget or self.container_ids or self.unready or self.adopt or self.ready)

    def to_json(self) -> dict[str, object]:
        return {
            "forget": [f"{h}/{n}" for h, n in self.forget],
            "adopt": [f"{r.host}/{r.name}" for r in self.adopt],
            "ready": [f"{u.host}/{u.name}" for u in self.ready],
        }


@dataclass
class ReconciledInventory:
    rows: list[InventoryRow]  # as the store will hold them once the changes are written
    owned: set[str]  # container ids we own
    forget: list[tuple[str, str]] = field(default_factory=list)
    container_ids: list[tuple[str, str, str]] = field(default_factory=list)
    unready: list[tuple[str, str]] = field(default_factory=list)


def reconcile_inventory(rows: Sequence[InventoryRow], observed: Iterable[ObservedReplica],
                        unreachable: Iterable[str]) -> ReconciledInventory:
    """Rows on unreachable hosts stay as they are (we cannot tell); a row whose container is gone
    from a reachable host is forgotten (removed by hand, or a create that never happened: if it is
    still wanted the plan creates it again); a write-ahead row learns its container id."""
    blind = frozenset(unreachable)
    by_name = {(r.host, r.name): r for r in observed}
    result = ReconciledInventory(rows=[], owned=set())
    for row in rows:
        if row.host in blind:
            if row.container_id:
                result.owned.add(row.container_id)
            result.rows.append(row)
            continue
        seen = by_name.get((row.host, row.name))
        if seen is None:
            result.forget.append((row.host, row.name))
            continue
        if row.container_id != seen.container_id:
            result.container_ids.append((row.host, row.name, seen.container_id))
            row = replace(row, container_id=seen.container_id,
                          phase="active" if row.phase == "creating" else row.phase)
        if row.ready and not seen.running:
            result.unready.append((row.host, row.name))
            row = replace(row, ready=False)
        result.owned.add(seen.container_id)
        result.rows.append(row)
    return result


def adoptable(observed: Iterable[ObservedReplica], owned: set[str],
              wanted: Mapping[tuple[str, str, str, int, str], object]) -> list[ObservedReplica]:
    """Managed containers missing from the inventory (its state directory was lost or reset) that
    are exactly a desired replica (same slot, host and spec hash): adopted, not duplicated. Anything
    else not in the inventory is never touched."""
    found = []
    for replica in observed:
        key = (replica.host, replica.model, replica.environment, replica.index, replica.spec_hash)
        if replica.container_id not in owned and key in wanted:
            found.append(replica)
    return found


def adopted_row(replica: ObservedReplica) -> InventoryRow:
    return InventoryRow(replica.host, replica.name, replica.container_id, replica.model, replica.environment,
                        replica.index, replica.spec_hash, replica.revision, "active", False, None, None)
