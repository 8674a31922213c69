"""The manifest kinds of the public contract, as strict pydantic models.

Field names in YAML are camelCase (``minReplicas``); Python attributes are snake_case.
Unknown keys are errors everywhere, so a typo never silently does nothing. The descriptions and
``json_schema_extra`` rules only shape the JSON Schema editors use (modelfleet/state/schema.py);
validation is the models' own.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
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
# What units.py parses, as JSON Schema patterns (ECMA regex: no inline flags, so cases are spelled out).
_MEMORY_TEXT = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT][iI]?[bB]?)?\s*$"
_CPUS_TEXT = r"^([0-9]+m|[0-9]*\.?[0-9]+)$"
_DURATION_TEXT = r"^\s*([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+\s*$"
# runtime.batchSize / maxBatchDelay bounds (the torch runtime checks the same: runtimes/contract.py).
MAX_BATCH_SIZE = 1024
MAX_BATCH_DELAY_MS = 10_000


def _dns_label(value: object) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lowercase letters, digits and '-', "
            "start and end with a letter or digit, at most 63 characters"
        )
    return value


DnsLabel = Annotated[str, BeforeValidator(_dns_label),
                     WithJsonSchema({"type": "string", "pattern": _DNS_LABEL.pattern, "maxLength": 63})]
Memory = Annotated[int, BeforeValidator(parse_memory), PlainSerializer(lambda v: v),
                   WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0},
                                             {"type": "string", "pattern": _MEMORY_TEXT}]})]
Cpus = Annotated[float, BeforeValidator(parse_cpus),
                 WithJsonSchema({"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                                           {"type": "string", "pattern": _CPUS_TEXT}]})]
Duration = Annotated[float, BeforeValidator(parse_duration),
                     WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0},
                                               {"type": "string", "pattern": _DURATION_TEXT}]})]


def _batch_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH_SIZE:
        raise ValueError(f"batchSize {value!r}: use a whole number 1-{MAX_BATCH_SIZE} (the requests handed to "
                         f"the handler in one call at most)")
    return value


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
    name: DnsLabel = Field(description="The object's name: lowercase letters, digits and '-', at most 63 "
                                       "characters (a DNS label).")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Free-form annotations.")


# --- Policy -------------------------------------------------------------------------------------


class LocationRule(Strict):
    """One allowed location."""

    type: Literal["country", "continent", "location"] = Field(
        description="What name is compared with: the host's country code, continent code or location name.")
    name: Annotated[str, Field(min_length=1)] = Field(
        description="A country code (FR), a continent code (EU) or a host's location name (paris-1); codes "
                    "are case-insensitive.")

    @field_validator("name")
    @classmethod
    def _normalise(cls, value: str, info: Any) -> str:
        # Country and continent codes are compared case-insensitively (``fr`` == ``FR``).
        kind = info.data.get("type")
        return value.upper() if kind in ("country", "continent") else value


class FlavorRule(Strict):
    """One allowed flavor."""

    type: Literal["cpu", "gpu"] = Field(description="The type of the hosts' flavor that must match.")
    name: Annotated[str, Field(min_length=1)] = Field(description="A flavor name, e.g. intel-sapphire-rapids.")


class MaxTokens(Strict):
    """A token budget the gateways enforce (429 once used up); it does not influence placement."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["input"]}, {"required": ["output"]},
                                                           {"required": ["total"]}]})

    granularity: Literal["minute", "hour", "day", "month"] = Field(
        "minute", description="The budget's period: a UTC calendar minute, hour, day or month.")
    input: Annotated[int, Field(ge=0)] | None = Field(None, description="Input (prompt) tokens per period.")
    output: Annotated[int, Field(ge=0)] | None = Field(None, description="Output (completion) tokens per period.")
    total: Annotated[int, Field(ge=0)] | None = Field(None, description="Input and output tokens per period.")

    @model_validator(mode="after")
    def _limits_something(self) -> MaxTokens:
        if self.input is None and self.output is None and self.total is None:
            raise ValueError("maxTokens limits nothing: set at least one of input, output, total (tokens per "
                             "granularity)")
        return self


_POLICY_FIELDS = {"location": "locations", "flavor": "flavors", "maxToken": "maxTokens"}


class PolicySpec(Strict):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
         "then": {"required": [wanted],
                  "properties": {other: False for other in _POLICY_FIELDS.values() if other != wanted}}}
        for kind, wanted in _POLICY_FIELDS.items()]})

    type: Literal["location", "flavor", "maxToken"] = Field(
        description="location: where deployments may run; flavor: on which CPU/GPU flavors; maxToken: a token "
                    "budget (does not restrict hosts). Takes only the field of its type.")
    locations: list[LocationRule] | None = Field(
        None, description="Allowed locations (type location).", json_schema_extra={"minItems": 1})
    flavors: list[FlavorRule] | None = Field(
        None, description="Allowed flavors (type flavor).", json_schema_extra={"minItems": 1})
    max_tokens: MaxTokens | None = Field(None, description="The token budget (type maxToken).")

    @model_validator(mode="after")
    def _matches_type(self) -> PolicySpec:
        wanted = _POLICY_FIELDS[self.type]
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
    """A placement rule that Environments and deployments name. Policies of the same type combine by
    union, of different types by intersection."""

    api_version: Literal["modelfleet.dev/v1alpha1"]
    kind: Literal["Policy"]
    metadata: Metadata
    spec: PolicySpec


# --- Environment --------------------------------------------------------------------------------


class EnvironmentSpec(Strict):
    description: str = Field("", description="What the environment is for.")
    policies: list[DnsLabel] = Field(default_factory=list,
                                     description="Policies (by name) that every deployment here obeys.")


class Environment(Strict):
    """Where deployments go (production, development...), with the policies they obey."""

    api_version: Literal["modelfleet.dev/v1alpha1"]
    kind: Literal["Environment"]
    metadata: Metadata
    spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)


# --- Model --------------------------------------------------------------------------------------


class HuggingFaceOrigin(Strict):
    """A model on the HuggingFace Hub."""

    model: str = Field(description="The model id, org/name.",
                       json_schema_extra={"pattern": _HF_REPO.pattern})
    revision: str = Field("main", description="Branch, tag or commit; resolved to its 40-character commit when "
                                              "planning.")

    @field_validator("model")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not _HF_REPO.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not a HuggingFace model id (use org/name)")
        return value


class FileOrigin(Strict):
    """A TorchServe model archive (.mar): committed in the repository, or uploaded with `modelfleet upload`."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["path"]}, {"required": ["sha256"]}]})

    path: str | None = Field(None, description="The archive's path from the repository root (no '..').")
    sha256: str | None = Field(None, description="The digest `modelfleet upload` printed (sha256:<64 hex>).",
                               json_schema_extra={"pattern": _SHA256.pattern})

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
    """Where the model comes from: exactly one of huggingface or file."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["huggingface"]}, {"required": ["file"]}]})

    huggingface: HuggingFaceOrigin | None = None
    file: FileOrigin | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Origin:
        if (self.huggingface is None) == (self.file is None):
            raise ValueError("origin needs exactly one of huggingface or file")
        return self


class Resources(Strict):
    """The container's limits; each defaults per runtime type."""

    cpus: Cpus | None = Field(None, description="CPUs: 1, 0.5 or millicores (500m).")
    memory: Memory | None = Field(None, description="Memory: 512Mi, 2Gi, 1G or a number of bytes.")


class ReadinessProbe(Strict):
    """The HTTP GET a new replica must answer before it gets traffic, and a ready one to keep it."""

    path: str = Field("/", description="The path to GET; starts with '/'.", json_schema_extra={"pattern": "^/"})
    port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        None, description="The container port to probe (default: runtime.port).")
    initial_delay: Duration = Field(0.0, description="Wait before the first probe (e.g. 5s).")
    period: Duration = Field(1.0, description="Time between probes.")
    timeout: Duration = Field(2.0, description="Timeout of one probe.")
    failure_threshold: Annotated[int, Field(ge=1)] = Field(3, description="Failed probes in a row after which a "
                                                                          "ready replica leaves the routes (until it "
                                                                          "answers again).")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("readinessProbe.path must start with '/'")
        return value


RuntimeType = Literal["torch", "transformers", "tgi", "tei", "custom"]


class Runtime(Strict):
    """The inference server that runs the deployment. Everything is optional: the type is suggested from
    the origin when omitted (`plan --explain` says why), image, port, probe and resources default per type."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"type": {"const": "custom"}}, "required": ["type"]},
         "then": {"required": ["image"], "properties": {"image": {"type": "string", "minLength": 1}}}}]})

    # None: suggested from the origin, exactly as if the runtime block were omitted (runtimes.resolve_runtime).
    type: RuntimeType | None = Field(None, description="torch | transformers | tgi | tei | custom; suggested from "
                                                       "the origin when omitted.")
    image: str | None = Field(None, description="The container image: required for custom, replaces the "
                                                "default image of the other types.")
    args: list[str] | None = Field(None, description="Replaces the image's command.")
    env: dict[str, str] = Field(default_factory=dict,
                                description="Environment variables, on top of those the daemon sets.",
                                json_schema_extra={"propertyNames": {"pattern": _ENV_NAME.pattern}})
    port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        None, description="The port the server listens on (default 8080; 80 for tei and tgi).")
    resources: Resources = Field(default_factory=Resources, description="CPU and memory limits.")
    readiness_probe: ReadinessProbe | None = Field(
        None, description="When a new replica is ready (default: the runtime's health endpoint).")
    # TorchServe's dynamic batching (torch runtime only); None: the archive's model-config, else 1 / 100 ms.
    batch_size: Annotated[int, BeforeValidator(lambda v: _batch_size(v)), WithJsonSchema(
        {"type": "integer", "minimum": 1, "maximum": MAX_BATCH_SIZE})] | None = Field(
        None, description="torch runtime: requests handed to the handler in one call at most (TorchServe's "
                          "batchSize, 1-1024; default: the archive's model-config, else 1).")
    max_batch_delay: Duration | None = Field(
        None, description="torch runtime: how long the first request of a batch waits for the batch to fill "
                          "(TorchServe's maxBatchDelay; whole milliseconds, 0-10s; default: the archive's "
                          "model-config, else 100ms).")

    @field_validator("max_batch_delay")
    @classmethod
    def _batch_delay(cls, value: float | None) -> float | None:
        if value is None:
            return None
        millis = value * 1000
        if millis > MAX_BATCH_DELAY_MS + 1e-6:
            raise ValueError(f"maxBatchDelay {value:g}s is more than 10s; use 0-10s (e.g. 5ms)")
        if abs(millis - round(millis)) > 1e-6:
            raise ValueError(f"maxBatchDelay {millis:g}ms is not a whole number of milliseconds (TorchServe's "
                             f"unit); use e.g. {max(0, round(millis))}ms")
        return value

    @property
    def max_batch_delay_ms(self) -> int | None:
        return None if self.max_batch_delay is None else round(self.max_batch_delay * 1000)

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
            raise ValueError("runtime.type custom needs runtime.image (the image to run)")
        if self.type not in (None, "torch") and (self.batch_size is not None or self.max_batch_delay is not None):
            raise ValueError(f"runtime.batchSize and runtime.maxBatchDelay are settings of the torch runtime, not of "
                             f"runtime.type {self.type}: remove them (or use runtime.type torch)")
        return self


class Serverless(Strict):
    """Replicas follow demand (Knative KPA's shape) instead of a fixed count; with minReplicas 0 a standby is
    kept (stopped, or paused with ``standby: paused``). The defaults are chosen so the count does not flap."""

    min_replicas: Annotated[int, Field(ge=0, le=1000)] = Field(0, description="Replicas kept when idle (0: scale "
                                                                              "to zero).")
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = Field(1, description="Replicas at most, under load.")
    metric: Literal["concurrency", "rps"] = Field("concurrency", description="What target is measured in: "
                                                                           "requests in flight or per second.")
    target: Annotated[float, Field(gt=0)] = Field(10, description="The metric's value per replica to scale at: "
                                                                  "replicas = ceil(metric / target).")
    scale_down_delay: Duration = Field(300.0, description="A lower non-zero replica count is applied only after "
                                                          "the wanted count has stayed below the running one for "
                                                          "this long.")
    scale_to_zero_grace: Duration = Field(30.0, description="With minReplicas 0, the last replica stops after this "
                                                            "long without traffic (no request arrived, none in "
                                                            "flight, none queued); at least 1s.")
    stable_window: Duration = Field(60.0, description="The metric is averaged over this window to scale by; "
                                                      "longer than panicWindow, at most 1h.")
    panic_window: Duration = Field(6.0, description="The short window that detects bursts; at least 1s, shorter "
                                                    "than stableWindow.")
    panic_threshold: float = Field(2.0, description="Panic (scale up at once, never down) when the panic window "
                                                    "wants this many times the running replicas (2.0 = 200%); "
                                                    "more than 1.", json_schema_extra={"exclusiveMinimum": 1})
    queue: Annotated[int, Field(ge=1, le=100000)] = Field(100, description="Requests a gateway holds for this "
                                                                           "deployment while it activates.")
    activation_timeout: Duration = Field(60.0, description="How long a held request waits for a ready replica "
                                                           "before the gateway answers 503; more than 0.")
    standby: Literal["stopped", "paused"] = Field(
        "stopped", description="What an idle replica is kept as (minReplicas 0): stopped (created, image and model "
                               "on the host, no process: the first request waits for the runtime to start) or "
                               "paused (started, loaded and then frozen with docker pause: the first request waits "
                               "only for docker unpause; it keeps its memory, no CPU).")

    @model_validator(mode="after")
    def _bounds(self) -> Serverless:
        problems = []
        if self.min_replicas > self.max_replicas:
            problems.append(f"serverless.minReplicas must not exceed serverless.maxReplicas (got "
                            f"{self.min_replicas} > {self.max_replicas}): lower minReplicas or raise maxReplicas")
        if self.panic_window < 1:
            problems.append(f"serverless.panicWindow must be at least 1s (got {self.panic_window:g}s)")
        if self.stable_window > 3600:
            problems.append(f"serverless.stableWindow must be at most 1h (got {self.stable_window:g}s)")
        if self.panic_window >= self.stable_window:
            problems.append(f"serverless.panicWindow ({self.panic_window:g}s) must be shorter than "
                            f"serverless.stableWindow ({self.stable_window:g}s): e.g. panicWindow 6s, "
                            "stableWindow 60s")
        if self.panic_threshold <= 1:
            problems.append(f"serverless.panicThreshold must be more than 1 (got {self.panic_threshold:g}; "
                            "2.0 panics at 200% of what runs)")
        if self.scale_to_zero_grace < 1:
            problems.append(f"serverless.scaleToZeroGrace must be at least 1s (got {self.scale_to_zero_grace:g}s)")
        if self.activation_timeout <= 0:
            problems.append("serverless.activationTimeout must be more than 0 (e.g. 60s)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OverflowHealthCheck(Strict):
    """The active health check of an overflow endpoint: a GET every period, from each gateway."""

    path: str = Field("/", description="The path to GET; starts with '/'. Any answer below 500 is healthy.",
                      json_schema_extra={"pattern": "^/"})
    period: Duration = Field(5.0, description="Time between checks; more than 0.")
    timeout: Duration = Field(2.0, description="Timeout of one check; more than 0.")
    failure_threshold: Annotated[int, Field(ge=1)] = Field(2, description="Failed checks in a row after which "
                                                                          "the endpoint gets no traffic (until a "
                                                                          "check succeeds again).")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("overflow.healthCheck.path must start with '/' (e.g. /ping)")
        return value

    @model_validator(mode="after")
    def _positive(self) -> OverflowHealthCheck:
        problems = [f"overflow.healthCheck.{name} must be more than 0 (e.g. {example})"
                    for name, value, example in (("period", self.period, "5s"), ("timeout", self.timeout, "2s"))
                    if value <= 0]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OutlierDetection(Strict):
    """Passive health of an overflow endpoint (Envoy's outlier detection): failures of real requests."""

    consecutive_failures: Annotated[int, Field(ge=1)] = Field(
        5, description="Requests in a row that failed to connect or got a 5xx, after which the endpoint is "
                       "ejected (gets no traffic) for ejectionTime.")
    ejection_time: Duration = Field(30.0, description="How long an ejected endpoint gets no traffic; more than 0.")

    @model_validator(mode="after")
    def _positive(self) -> OutlierDetection:
        if self.ejection_time <= 0:
            raise ValueError("overflow.outlierDetection.ejectionTime must be more than 0 (e.g. 30s)")
        return self


class Overflow(Strict):
    """A model already running on your own infrastructure: gateways send traffic there first, and to the
    deployment's own (serverless) replicas beyond maxConcurrency, for a steady percentage, and while it is
    unhealthy."""

    endpoint: str = Field(description="The on-prem model's base URL (http:// or https://); the request's "
                                      "sub-path and query are appended.",
                          json_schema_extra={"pattern": "^https?://[^/?#]+"})
    token_file: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="A file on the gateway's machine holding a bearer token sent to the endpoint "
                          "(Authorization: Bearer); re-read when it changes, never published nor logged.")
    health_check: OverflowHealthCheck = Field(default_factory=OverflowHealthCheck,
                                              description="The active health check of the endpoint.")
    outlier_detection: OutlierDetection = Field(default_factory=OutlierDetection,
                                                description="Ejection of the endpoint after failed requests.")
    max_concurrency: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Requests in flight at the endpoint (per gateway) beyond which more go to the "
                          "replicas; default: no limit.")
    percentage: Annotated[float, Field(ge=0, le=100)] = Field(
        0.0, description="The share of requests (0-100) sent to the replicas even while the endpoint is "
                         "healthy and below maxConcurrency.")

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"overflow.endpoint must be an http:// or https:// URL with a host, got {value!r} "
                             "(e.g. http://10.0.0.5:8080)")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError(f"overflow.endpoint {value!r} has an invalid port") from None
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"overflow.endpoint {value!r} must not have a query, fragment or credentials: "
                             "put a bearer token in overflow.tokenFile")
        return value.rstrip("/")


class Deployment(Strict):
    """Where and how the model runs in one environment."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"not": {"required": ["replicas", "serverless"]}},
        {"if": {"required": ["overflow"]}, "then": {"required": ["serverless"]}},
        {"if": {"not": {"required": ["origin"]}},
         "then": {"required": ["runtime"], "properties": {"runtime": {
             "type": "object", "required": ["type"], "properties": {"type": {"const": "custom"}}}}}},
    ]})

    environment: DnsLabel = Field(description="The Environment (by name); one deployment per environment.")
    enabled: bool = Field(True, description="false: no containers, no resources; the endpoint answers 404.")
    policies: list[DnsLabel] = Field(default_factory=list,
                                     description="More Policies (by name): they narrow the environment's, never "
                                                 "widen them.")
    flavors: list[str] = Field(default_factory=list,
                               description="Requested flavors; the policies must allow them.")
    origin: Origin | None = Field(None, description="Where the model comes from; may be omitted only for "
                                                    "runtime.type custom.")
    runtime: Runtime | None = Field(None, description="The inference server; suggested from the origin when "
                                                      "omitted.")
    replicas: Annotated[int, Field(ge=0, le=1000)] | None = Field(
        None, description="A fixed number of replicas (default 1); not with serverless.")
    serverless: Serverless | None = Field(None, description="Scale with demand; not with replicas.")
    overflow: Overflow | None = Field(None, description="Send traffic to a model on your own infrastructure "
                                                        "first, and to the replicas beyond it; needs serverless.")

    @model_validator(mode="after")
    def _coherent(self) -> Deployment:
        if self.replicas is not None and self.serverless is not None:
            raise ValueError("a deployment takes either replicas or serverless, not both")
        if self.overflow is not None and self.serverless is None:
            raise ValueError("overflow needs serverless (the replicas that take what the endpoint does not, "
                             "started on demand): add serverless: {minReplicas: 0, maxReplicas: 1}")
        if self.origin is None and (self.runtime is None or self.runtime.type != "custom"):
            # Nothing to suggest a runtime from: a deployment without origin must say what it runs.
            raise ValueError("origin may be omitted only for runtime.type custom: set runtime.type custom "
                             "(with runtime.image), or give an origin to suggest the runtime from")
        runtime = self.runtime
        if (runtime is not None and runtime.type is None and self.origin is not None and self.origin.file is None
                and (runtime.batch_size is not None or runtime.max_batch_delay is not None)):
            raise ValueError("runtime.batchSize and runtime.maxBatchDelay are settings of the torch runtime, which "
                             "serves model archives (origin.file); this origin gets another runtime: remove them")
        return self

    @property
    def desired_replicas(self) -> int:
        if self.serverless is not None:
            return self.serverless.min_replicas
        return 1 if self.replicas is None else self.replicas


class RawModelSpec(Strict):
    description: str = ""
    deployments: list[dict[str, Any]] = Field(default_factory=list)


class ModelEnvelope(Strict):
    """A Model whose deployments are still raw: each is validated on its own (errors stay local)."""

    api_version: Literal["modelfleet.dev/v1alpha1"]
    kind: Literal["Model"]
    metadata: Metadata
    spec: RawModelSpec


class ModelSpec(Strict):
    description: str = Field("", description="What the model is.")
    deployments: list[Deployment] = Field(default_factory=list,
                                          description="Where the model runs: at most one per environment.")


# ModelEnvelope with its deployments validated in one go: what the JSON Schema describes (the loader
# validates each deployment on its own instead, so one broken deployment does not hide the others).
class Model(Strict):
    """A model and where it runs: one deployment per environment."""

    api_version: Literal["modelfleet.dev/v1alpha1"]
    kind: Literal["Model"]
    metadata: Metadata
    spec: ModelSpec


MANIFEST_CLASSES: dict[str, type[Strict]] = {
    "Environment": Environment,
    "Policy": Policy,
    "Model": ModelEnvelope,
}
