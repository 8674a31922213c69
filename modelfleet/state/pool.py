"""The pool inventory: Docker hosts with a location, CPU/GPU flavors and a capacity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from modelfleet.state.manifests import Cpus, DnsLabel, Memory
from modelfleet.state.units import format_cpus, format_memory


@dataclass(frozen=True)
class RelativeToConfig:
    """Marks a field of the daemon config that holds a filesystem path: a relative value is taken
    relative to the config file's directory. reconciler/config.py resolves every marked field, at any
    depth, so a new path field only needs the mark (``ConfigPath``)."""

    # repo.url: a URL (``https://...``) or an scp-like address (``git@host:org/repo``) stays as written.
    may_be_url: bool = False


ConfigPath = Annotated[str, RelativeToConfig()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class HostLocation(_Strict):
    name: str
    country: str
    continent: str

    @field_validator("country", "continent")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    def describe(self) -> str:
        return f"{self.name} ({self.country}, {self.continent})"


class HostFlavor(_Strict):
    name: str
    type: Literal["cpu", "gpu"] = "cpu"


class Capacity(_Strict):
    cpus: Cpus
    memory: Memory

    def describe(self) -> str:
        return f"{format_cpus(self.cpus)} cpus / {format_memory(self.memory)}"


class TlsFiles(_Strict):
    ca: ConfigPath | None = None
    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    verify: bool = True


class Host(_Strict):
    name: DnsLabel
    url: str = "unix:///var/run/docker.sock"
    # Address at which the gateway reaches ports published on this host; derived from url if unset.
    address: str | None = None
    # The address container ports are published on (never 0.0.0.0 by default): the gateway's way
    # in. Default: ``address`` (or the url's host) when it is an IP address, else 127.0.0.1 for a
    # local socket; set it when the url names the host by DNS name.
    publish_address: str | None = None
    tls: TlsFiles | None = None
    location: HostLocation
    flavors: Annotated[list[HostFlavor], Field(min_length=1)]
    capacity: Capacity
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("publish_address")
    @classmethod
    def _ip_literal(cls, value: str | None) -> str | None:
        if value is None:
            return None
        import ipaddress

        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address: publishAddress is the host's address ports "
                             "are published on, e.g. 10.0.0.5") from None

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("unix://", "tcp://", "ssh://", "http://", "https://", "npipe://")):
            raise ValueError(f"{value!r} is not a Docker host URL (use unix://, tcp:// or ssh://)")
        return value

    @property
    def flavor_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.flavors)

    @property
    def publish_ip(self) -> str:
        """The IP address published container ports bind to on this host."""
        if self.publish_address:
            return self.publish_address
        import ipaddress

        try:
            return str(ipaddress.ip_address(self.reach_address))
        except ValueError:
            return "0.0.0.0"  # a DNS name: the documented fallback (set publishAddress)

    @property
    def reach_address(self) -> str:
        """Where published container ports of this host are reachable from the gateway."""
        if self.address:
            return self.address
        if self.url.startswith(("tcp://", "ssh://", "http://", "https://")):
            rest = self.url.split("://", 1)[1].rsplit("@", 1)[-1]
            host = rest.split("/", 1)[0]
            if host.startswith("["):
                return host[1: host.index("]")]
            return host.rsplit(":", 1)[0] if ":" in host else host
        return "127.0.0.1"


class Pool(_Strict):
    hosts: list[Host] = Field(default_factory=list)

    @field_validator("hosts")
    @classmethod
    def _unique(cls, hosts: list[Host]) -> list[Host]:
        seen: set[str] = set()
        for host in hosts:
            if host.name in seen:
                raise ValueError(f"host name {host.name!r} appears twice")
            seen.add(host.name)
        return hosts
