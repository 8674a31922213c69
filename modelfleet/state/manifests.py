"""The manifest kinds of the public contract (DESIGN.md §2), as strict pydantic models.

Field names in YAML are camelCase (``minReplicas``); Python attributes are snake_case.
Unknown keys are errors everywhere, so a typo never silently does nothing.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from modelfleet.state.units import parse_cpus, parse_duration, parse_memory

API_VERSION = "modelfleet.dev/v1alpha1"
KINDS = ("Environment", "Policy", "Model")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_SHA256 = re.compile(r"^(sha256:)?[0-9a-f]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _dns_label(value: object) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lowercase letters, digits and '-', "
            "start and end with a letter or digit, at most 63 characters"
        )
    return value


DnsLabel = Annotated[str, BeforeValidator(_dns_label)]
Memory = Annotated[int, BeforeValidator(parse_memory), PlainSerializer(lambda v: v)]
Cpus = Annotated[float, BeforeValidator(parse_cpus)]
Duration = Annotated[float, BeforeValidator(parse_duration)]


class Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        strict=False,
        str_strip_whitespace=False,
    )


class Metadata(Strict):
    name: DnsLabel
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# --- Policy -------------------------------------------------------------------------------------


class LocationRule(Strict):
    type: Literal["country", "continent", "location"]
    name: Annotated[str, Field(min_length=1)]

    @field_validator("name")
    @classmethod
    def _normalise(cls, value: str, info: Any) -> str:
        # Country and continent codes are compared case-insensitively (``fr`` == ``FR``).
        kind = info.data.get("type")
        return value.upper() if kind in ("country", "continent") else value


class FlavorRule(Strict):
    type: Literal["cpu", "gpu"]
    name: Annotated[str, Field(min_length=1)]


class MaxTokens(Strict):
    granularity: Literal["minute", "hour", "day", "month"] = "minute"
    input: Annotated[int, Field(ge=0)] | None = None
    output: Annotated[int, Field(ge=0)] | None = None
    total: Annotated[int, Field(ge=0)] | None = None


class PolicySpec(Strict):
    type: Literal["location", "flavor", "maxToken"]
    locations: list[LocationRule] | None = None
    flavors: list[FlavorRule] | None = None
    max_tokens: MaxTokens | None = None

    @model_validator(mode="after")
    def _matches_type(self) -> PolicySpec:
        wanted = {"location": "locations", "flavor": "flavors", "maxToken": "maxTokens"}[self.type]
        present = {
            "locations": self.locations is not None,
            "flavors": self.flavors is not None,
            "maxTokens": self.max_tokens is not None,
        }
        if not present[wanted]:
            raise ValueError(f"a policy of type {self.type} needs spec.{wanted}")
        others = [name for name, there in present.items() if there and name != wanted]
        if others:
            raise ValueError(
                f"a policy of type {self.type} takes only spec.{wanted}; remove spec.{others[0]}"
            )
        if self.locations is not None and not self.locations:
            raise ValueError("spec.locations must list at least one location")
        if self.flavors is not None and not self.flavors:
            raise ValueError("spec.flavors must list at least one flavor")
        return self


class Policy(Strict):
    api_version: Literal["modelfleet.dev/v1alpha1"]
    kind: Literal["Policy"]
    metadata: Metadata
    spec: PolicySpec


# --- Environment --------------------------------------------------------------------------------


class EnvironmentSpec(Strict):
    description: str = ""
    policies: list[DnsLabel] = Field(default_factory=list)


class Environment(Strict):
    api_version: Literal["modelfleet.dev/v1alpha1"]
    kind: Literal["Environment"]
    metadata: Metadata
    spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)


# --- Model --------------------------------------------------------------------------------------


class HuggingFaceOrigin(Strict):
    model: str
    revision: str = "main"

    @field_validator("model")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not _HF_REPO.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not a HuggingFace model id (use org/name)")
        return value


class FileOrigin(Strict):
    path: str | None = None
    sha256: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> FileOrigin:
        if (self.path is None) == (self.sha256 is None):
            raise ValueError("origin.file needs exactly one of path or sha256")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits, optionally prefixed sha256:")
        if self.path is not None and (self.path.startswith("/") or ".." in self.path.split("/")):
            raise ValueError("origin.file.path must be relative to the repository root, without '..'")
        return self

    @property
    def digest(self) -> str | None:
        return self.sha256.removeprefix("sha256:") if self.sha256 else None


class Origin(Strict):
    huggingface: HuggingFaceOrigin | None = None
    file: FileOrigin | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Origin:
        if (self.huggingface is None) == (self.file is None):
            raise ValueError("origin needs exactly one of huggingface or file")
        return self


class Resources(Strict):
    cpus: Cpus | None = None
    memory: Memory | None = None


class ReadinessProbe(Strict):
    path: str = "/"
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    initial_delay: Duration = 0.0
    period: Duration = 1.0
    timeout: Duration = 2.0
    failure_threshold: Annotated[int, Field(ge=1)] = 3

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("readinessProbe.path must start with '/'")
        return value


RuntimeType = Literal["torch", "transformers", "tgi", "tei", "custom"]


class Runtime(Strict):
    type: RuntimeType
    image: str | None = None
    args: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    resources: Resources = Field(default_factory=Resources)
    readiness_probe: ReadinessProbe | None = None

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return value

    @model_validator(mode="after")
    def _custom_needs_image(self) -> Runtime:
        if self.type == "custom" and not self.image:
            raise ValueError("runtime.type custom needs runtime.image")
        return self


class Serverless(Strict):
    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 0
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 1
    metric: Literal["concurrency", "rps"] = "concurrency"
    target: Annotated[float, Field(gt=0)] = 10
    scale_down_delay: Duration = 300.0

    @model_validator(mode="after")
    def _bounds(self) -> Serverless:
        if self.min_replicas > self.max_replicas:
            raise ValueError("serverless.minReplicas must not exceed serverless.maxReplicas")
        return self


class Deployment(Strict):
    environment: DnsLabel
    enabled: bool = True
    policies: list[DnsLabel] = Field(default_factory=list)
    flavors: list[str] = Field(default_factory=list)
    origin: Origin | None = None
    runtime: Runtime | None = None
    replicas: Annotated[int, Field(ge=0, le=1000)] | None = None
    serverless: Serverless | None = None

    @model_validator(mode="after")
    def _coherent(self) -> Deployment:
        if self.replicas is not None and self.serverless is not None:
            raise ValueError("a deployment takes either replicas or serverless, not both")
        if self.origin is None and (self.runtime is None or self.runtime.type != "custom"):
            raise ValueError("origin may be omitted only for runtime.type custom")
        return self

    @property
    def desired_replicas(self) -> int:
        if self.serverless is not None:
            return self.serverless.min_replicas
        return 1 if self.replicas is None else self.replicas


class ModelSpec(Strict):
    description: str = ""
    deployments: list[dict[str, Any]] = Field(default_factory=list)


class ModelEnvelope(Strict):
    """A Model whose deployments are still raw: each is validated on its own (errors stay local)."""

    api_version: Literal["modelfleet.dev/v1alpha1"]
    kind: Literal["Model"]
    metadata: Metadata
    spec: ModelSpec


MANIFEST_CLASSES: dict[str, type[Strict]] = {
    "Environment": Environment,
    "Policy": Policy,
    "Model": ModelEnvelope,
}
