"""The daemon's settings (`modelfleet.yaml`), one typed model per concern (docs/architecture.md, "Public contract")."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from modelfleet.reconciler.status import registry as status_registry
from modelfleet.state.errors import ManifestError
from modelfleet.state.loader import Source, pydantic_errors
from modelfleet.state.manifests import Duration
from modelfleet.state.pool import ConfigPath, Pool, RelativeToConfig
from modelfleet.state.yaml_source import YamlSyntaxError, parse_documents

# A local repository path, relative to the config file like any ConfigPath, or a URL / scp-like address.
RepoLocation = Annotated[str, RelativeToConfig(may_be_url=True)]

ALL_INTERFACES = "0.0.0.0"
_WILDCARD_HOSTS = frozenset({ALL_INTERFACES, "::"})


def parse_listen(listen: str, default_host: str | None = None) -> tuple[str, int]:
    """A listen address -> (host, port): ``host:port``, ``[IPv6]:port``, or ``:port`` (``default_host``:
    every interface for the gateway; the API keeps 127.0.0.1 so that ``:port`` never exposes it).

    Raises ValueError naming the accepted forms.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"expected host:port, [IPv6]:port or :port (every interface), e.g. 127.0.0.1:8080; "
                         f"got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"put an IPv6 address in brackets, e.g. [::1]:{port_text}; got {listen!r}")
    return host or default_host or ALL_INTERFACES, int(port_text)


def local_url(listen: str) -> str:
    """``http://host:port`` that reaches a server listening on ``listen`` from this machine."""
    host, port = parse_listen(listen)
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _valid_listen(listen: str) -> str:
    parse_listen(listen)
    return listen


# Kept as written (host:port); parse_listen() splits it.
ListenAddress = Annotated[str, AfterValidator(_valid_listen)]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class RepoSettings(_Settings):
    url: RepoLocation = "."
    branch: str = "main"
    poll_interval: Duration = 30.0
    # How long one git fetch of the tracked branch may take before the remote counts as unreachable for the pass.
    fetch_timeout: Annotated[Duration, Field(gt=0, le=3600)] = 60.0
    watch: bool = True
    webhook_secret_file: ConfigPath | None = None


def _valid_http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, e.g. http://10.0.0.1:8081 (the daemon's api.listen); "
                         f"got {url!r}")
    return url


HttpUrl = Annotated[str, AfterValidator(_valid_http_url)]


class GatewaySettings(_Settings):
    listen: ListenAddress = "127.0.0.1:8080"
    # "child": `modelfleet run` starts and supervises a gateway; "external": it runs on its own.
    mode: Literal["child", "external"] = "child"
    token_file: ConfigPath | None = None
    # Where the gateway sends its demand reports (serverless activation, autoscaling): the daemon's
    # API; default local_url(api.listen), with the token in api.tokenFile.
    control_plane: HttpUrl | None = None
    control_plane_token_file: ConfigPath | None = None
    # The gateway's id in its reports (default <hostname>:<pid>) and its location, if any: it
    # prefers the replicas in that location, then on its continent, then any.
    id: str | None = Field(default=None, min_length=1, max_length=200)
    location: str | None = Field(default=None, min_length=1, max_length=200)
    # Where the route table comes from: routes.db in stateDir (a gateway on the daemon's machine),
    # or the control plane's /api/v1/routes, long-polled and cached in cacheDir (any machine).
    follow: Literal["stateDir", "controlPlane"] = "stateDir"
    # Worker processes sharing gateway.listen (SO_REUSEPORT); default: the number of cores.
    workers: int | None = Field(default=None, ge=1, le=64)
    cache_dir: ConfigPath | None = None

    @model_validator(mode="after")
    def _cache_dir_needs_control_plane(self) -> GatewaySettings:
        if self.cache_dir is not None and self.follow != "controlPlane":
            raise ValueError("gateway.cacheDir is where a gateway following the control plane caches its route "
                             "table: set gateway.follow: controlPlane, or remove gateway.cacheDir")
        return self


class ApiSettings(_Settings):
    listen: ListenAddress = "127.0.0.1:8081"
    token_file: ConfigPath | None = None
    # The API's address as others reach it (the links in commit statuses); default local_url(listen).
    public_url: HttpUrl | None = None


def _registered_provider(value: Any) -> Any:
    """``status.provider`` must name a provider of status/registry.py (which imports no client)."""
    if isinstance(value, str) and value in status_registry.PROVIDERS:
        return value
    raise PydanticCustomError("literal_error", "Input should be {expected}",
                              {"expected": status_registry.describe_names()})


class StatusSettings(_Settings):
    # One of the names in modelfleet/reconciler/status/registry.py.
    provider: Annotated[str, BeforeValidator(_registered_provider)] = "git-notes"
    url: str | None = None
    token_file: ConfigPath | None = None
    # Push the notes ref back to the remote (git-notes provider).
    push: bool = True


class HuggingFaceSettings(_Settings):
    token_file: ConfigPath | None = None
    endpoint: str | None = None


class Integrations(_Settings):
    huggingface: HuggingFaceSettings = Field(default_factory=HuggingFaceSettings)


class RolloutSettings(_Settings):
    """Blue-green timing, defaults and semantics after Nomad's update stanza.

    healthyDeadline: a new replica must be ready within it. progressDeadline: a deployment's rollout
    must make progress (a replica ready) within it of its start or of the last progress, shipping
    and container creation included; 0 disables it. autoRevert: a version that failed is removed
    (true) or left in place, not routed, for inspection (false); either way the previous version
    keeps serving and the failed one is not retried until its spec changes.
    """

    min_healthy_time: Duration = 0.0
    healthy_deadline: Duration = 300.0
    progress_deadline: Duration = 600.0
    auto_revert: bool = True
    parallelism: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="after")
    def _deadlines(self) -> RolloutSettings:
        if self.progress_deadline and self.progress_deadline < self.healthy_deadline:
            raise ValueError(f"rollout.progressDeadline ({self.progress_deadline:g}s) must not be shorter than "
                             f"rollout.healthyDeadline ({self.healthy_deadline:g}s); set it longer, or 0 to disable it")
        return self


def _valid_branch_glob(pattern: str) -> str:
    """A branch glob becomes a fetch refspec: git allows one ``*`` and none of ``?[]\\`` or ``..``."""
    if (not pattern or pattern.count("*") > 1 or any(c in pattern for c in "?[]\\ ~^:") or ".." in pattern
            or pattern.startswith(("/", "-", "refs/")) or pattern.endswith("/")):
        raise ValueError(f"expected a branch name with at most one '*', e.g. review/* or feature/*; got {pattern!r}")
    return pattern


BranchGlob = Annotated[str, AfterValidator(_valid_branch_glob)]


class ReviewSettings(_Settings):
    """Plans of review branches and pull requests: each new head of a branch matching ``branches``
    and, with a forge ``status.provider`` and ``pullRequests``, of each open pull/merge request
    against ``repo.branch`` is planned (never applied) after a pass, and gets a ``modelfleet/plan``
    commit status; a pull request also gets one plan comment (``comment``), edited in place.
    No branches and no forge: off."""

    branches: list[BranchGlob] = Field(default_factory=list, max_length=20)
    max_plans: int = Field(default=5, ge=1, le=100)  # heads planned per round, newest first
    timeout: Duration = 10.0  # per plan
    pull_requests: bool = True  # plan the forge's open pull requests (forge status providers only)
    comment: bool = True  # one plan comment per pull request, edited on each push
    # Pull requests from forks too (anyone's manifests: their origins are resolved with the daemon's tokens).
    forks: bool = False


class SafetySettings(_Settings):
    """Deletion safety (state/safety.py): a commit that would remove more than maxDeletionPercent of
    the deployments that run, or all of them, keeps them running until confirmed (a commit trailer
    ``Modelfleet-Confirm: deletions`` or ``modelfleet confirm <sha>``). 100 turns the check off entirely."""

    max_deletion_percent: float = Field(default=50.0, ge=0, le=100)


class DockerSettings(_Settings):
    timeout: Duration = 30.0
    # How long a host may fail pings before it is reported down and its replicas move.
    down_after: Duration = 10.0


class LoggingSettings(_Settings):
    """How `modelfleet run` and `modelfleet gateway` log (reconciler/logs.py): ``text`` for a
    terminal, ``json`` for one JSON object per line (time, level, logger, message and, when known,
    pass_id, revision, model, environment, host). ``-v`` means ``level: debug``."""

    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning"] = "info"


class Config(_Settings):
    repo: RepoSettings = Field(default_factory=RepoSettings)
    state_dir: ConfigPath = "/var/lib/modelfleet"
    pool: Pool = Field(default_factory=Pool)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    status: StatusSettings = Field(default_factory=StatusSettings)
    integrations: Integrations = Field(default_factory=Integrations)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    docker: DockerSettings = Field(default_factory=DockerSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)


class ConfigError(Exception):
    def __init__(self, errors: list[ManifestError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


def parse_config(text: str, file: str = "modelfleet.yaml", base_dir: FsPath | None = None) -> Config:
    """Parse and validate; relative paths in the file are relative to the file's directory."""
    try:
        docs = list(parse_documents(text))
    except YamlSyntaxError as exc:
        raise ConfigError([ManifestError(file, exc.line, "", exc.message, "fix the YAML syntax")]) from None
    if len(docs) > 1:
        raise ConfigError([ManifestError(file, docs[1].start_line, "", "expected one YAML document")])
    data = docs[0].data if docs else {}
    source = Source(file, docs[0]) if docs else None
    if not isinstance(data, dict):
        raise ConfigError([ManifestError(file, 1, "", "the config must be a YAML mapping")])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        assert source is not None
        raise ConfigError(pydantic_errors(exc, Config, source)) from None
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


_M = TypeVar("_M", bound=BaseModel)


def path_marker(field: FieldInfo) -> RelativeToConfig | None:
    """The RelativeToConfig mark of a field, also inside ``Optional``/unions (``ConfigPath | None``)."""
    marks = [m for m in field.metadata if isinstance(m, RelativeToConfig)]
    pending: list[Any] = [field.annotation]
    while pending:
        annotation = pending.pop()
        if get_origin(annotation) is Annotated:
            marks += [m for m in annotation.__metadata__ if isinstance(m, RelativeToConfig)]
        pending.extend(get_args(annotation))
    return marks[0] if marks else None


def _relative_to(base: FsPath, path: str, mark: RelativeToConfig) -> str:
    if "://" in path or path.startswith(("/", "~")):
        return path
    if mark.may_be_url and ":" in path.split("/")[0]:  # user@host:repo.git
        return path
    return str((base / path).resolve())


def _resolve_paths(model: _M, base: FsPath) -> _M:
    """Every field marked RelativeToConfig (ConfigPath), however deep: nested settings, lists of hosts."""

    def resolve(value: Any, mark: RelativeToConfig | None) -> Any:
        if mark is not None and isinstance(value, str):
            return _relative_to(base, value, mark)
        if isinstance(value, BaseModel):
            return _resolve_paths(value, base)
        if isinstance(value, list | tuple):
            return type(value)(resolve(item, mark) for item in value)
        if isinstance(value, dict):
            return {key: resolve(item, mark) for key, item in value.items()}
        return value

    update = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        resolved = resolve(value, path_marker(field))
        if resolved != value:
            update[name] = resolved
    return model.model_copy(update=update) if update else model


def load_config(path: str | FsPath) -> Config:
    file = FsPath(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ManifestError(str(file), 0, "", f"cannot read config: {exc.strerror}")]) from None
    return parse_config(text, str(file), file.parent.resolve())
