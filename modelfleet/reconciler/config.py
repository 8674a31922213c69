"""The daemon's settings (`modelfleet.yaml`), one typed model per concern (DESIGN.md §2)."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from modelfleet.state.errors import ManifestError
from modelfleet.state.loader import Source, pydantic_errors
from modelfleet.state.manifests import Duration
from modelfleet.state.pool import Pool
from modelfleet.state.yaml_source import YamlSyntaxError, parse_documents


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class RepoSettings(_Settings):
    url: str = "."
    branch: str = "main"
    poll_interval: Duration = 30.0
    watch: bool = True
    webhook_secret_file: str | None = None


class GatewaySettings(_Settings):
    listen: str = "127.0.0.1:8080"
    # "child": `modelfleet run` starts and supervises a gateway; "external": it runs on its own.
    mode: Literal["child", "external"] = "child"
    token_file: str | None = None


class ApiSettings(_Settings):
    listen: str = "127.0.0.1:8081"
    token_file: str | None = None


class StatusSettings(_Settings):
    provider: Literal["git-notes", "gitea", "github", "gitlab", "none"] = "git-notes"
    url: str | None = None
    token_file: str | None = None
    # Push the notes ref back to the remote (git-notes provider).
    push: bool = True


class HuggingFaceSettings(_Settings):
    token_file: str | None = None
    endpoint: str | None = None


class Integrations(_Settings):
    huggingface: HuggingFaceSettings = Field(default_factory=HuggingFaceSettings)


class RolloutSettings(_Settings):
    """Blue-green timing, defaults after Nomad's update stanza."""

    min_healthy_time: Duration = 0.0
    healthy_deadline: Duration = 300.0
    progress_deadline: Duration = 600.0
    auto_revert: bool = True
    parallelism: int = Field(default=8, ge=1, le=256)


class DockerSettings(_Settings):
    timeout: Duration = 30.0
    # How long a host may fail pings before it is reported down and its replicas move.
    down_after: Duration = 10.0


class Config(_Settings):
    repo: RepoSettings = Field(default_factory=RepoSettings)
    state_dir: str = "/var/lib/modelfleet"
    pool: Pool = Field(default_factory=Pool)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    status: StatusSettings = Field(default_factory=StatusSettings)
    integrations: Integrations = Field(default_factory=Integrations)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    docker: DockerSettings = Field(default_factory=DockerSettings)


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


def _resolve_paths(config: Config, base: FsPath) -> Config:
    def rel(path: str | None) -> str | None:
        if path is None or "://" in path or path.startswith(("/", "~")):
            return path
        return str((base / path).resolve())

    repo_url = config.repo.url
    if "://" not in repo_url and ":" not in repo_url.split("/")[0]:
        repo_url = rel(repo_url) or repo_url
    return config.model_copy(update={
        "state_dir": rel(config.state_dir),
        "repo": config.repo.model_copy(update={
            "url": repo_url, "webhook_secret_file": rel(config.repo.webhook_secret_file)}),
        "api": config.api.model_copy(update={"token_file": rel(config.api.token_file)}),
        "gateway": config.gateway.model_copy(update={"token_file": rel(config.gateway.token_file)}),
        "status": config.status.model_copy(update={"token_file": rel(config.status.token_file)}),
    })


def load_config(path: str | FsPath) -> Config:
    file = FsPath(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ManifestError(str(file), 0, "", f"cannot read config: {exc.strerror}")]) from None
    return parse_config(text, str(file), file.parent.resolve())
