"""Actual state: the replicas observed on the hosts, read back from container labels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

LABEL_PREFIX = "modelfleet."
LABEL_MANAGED = "modelfleet.managed"
LABEL_MODEL = "modelfleet.model"
LABEL_ENVIRONMENT = "modelfleet.environment"
LABEL_REVISION = "modelfleet.revision"
LABEL_SPEC_HASH = "modelfleet.spec-hash"
LABEL_REPLICA = "modelfleet.replica"  # extension of the contract: replica index within the deployment


@dataclass(frozen=True)
class ObservedReplica:
    host: str
    container_id: str
    name: str
    model: str
    environment: str
    index: int
    spec_hash: str
    revision: str
    running: bool  # the process runs (a paused container does not: it is frozen)
    paused: bool = False  # frozen with docker pause (a paused standby, serverless.standby: paused)

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.environment)


def from_labels(
    host: str, container_id: str, name: str, labels: Mapping[str, str], running: bool, paused: bool = False
) -> ObservedReplica | None:
    """None for containers that are not ours or whose labels are damaged (never touched)."""
    if labels.get(LABEL_MANAGED) != "true":
        return None
    try:
        index = int(labels.get(LABEL_REPLICA, "0"))
        return ObservedReplica(
            host=host,
            container_id=container_id,
            name=name,
            model=labels[LABEL_MODEL],
            environment=labels[LABEL_ENVIRONMENT],
            index=index,
            spec_hash=labels[LABEL_SPEC_HASH],
            revision=labels.get(LABEL_REVISION, ""),
            running=running,
            paused=paused,
        )
    except (KeyError, ValueError):
        return None


def labels_for(model: str, environment: str, index: int, spec_hash: str, revision: str) -> dict[str, str]:
    return {
        LABEL_MANAGED: "true",
        LABEL_MODEL: model,
        LABEL_ENVIRONMENT: environment,
        LABEL_REPLICA: str(index),
        LABEL_SPEC_HASH: spec_hash,
        LABEL_REVISION: revision,
    }


def container_name(model: str, environment: str, index: int, spec_hash: str) -> str:
    return f"mf-{environment}-{model}-{index}-{spec_hash[:8]}"
