"""The environment the daemon gives a model container: the one place its variables are named.

The daemon builds a container's environment only through ``RuntimeEnvironment.to_env()`` /
``merged_with(runtime.env)``; the runtime servers read it only through
``RuntimeEnvironment.from_env(os.environ)``. Standard library only: this module is copied into the
runtime images with the rest of ``modelfleet.runtimes``.

Canonical variables (the daemon sets them; a manifest's ``runtime.env`` goes on top):

    MODELFLEET_MODEL_DIR      where the model is mounted, read-only (/model)       every origin
    MODELFLEET_ARTIFACT       the artifact's id: sha256:<hex> | hf:<org/name>@<commit>  every origin
    MODELFLEET_MODEL_ARCHIVE  the archive, /model/<modelName>.mar                   file origins
    MODELFLEET_MODEL_NAME     the archive's modelName (TorchServe's /predictions/<name>)  file origins
    MODELFLEET_MODEL_ID       the HuggingFace repository id (org/name)              HuggingFace origins
    MODELFLEET_HF_COMMIT      the 40-character commit the revision resolved to      HuggingFace origins
    HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1  never reach the Hub                   HuggingFace origins
    MODELFLEET_MODEL          the manifest's Model name                             always
    MODELFLEET_ENVIRONMENT    the deployment's environment                          always
    PORT                      the port to listen on (runtime.port)                  torch, transformers
    MODELFLEET_GATEWAY_SECRET the deployment's secret: requests without it in the   torch, transformers
                              X-Modelfleet-Gateway-Secret header are refused (401)
    MODELFLEET_OPEN_PATH      the readiness probe's path, answered without it        torch, transformers
    MODELFLEET_BATCH_SIZE     requests per handler call at most (runtime.batchSize)  torch, when set
    MODELFLEET_MAX_BATCH_DELAY  milliseconds a batch waits to fill (runtime.maxBatchDelay)  torch, when set

Older names the servers documented before, and a manifest's ``runtime.env`` may still set, are
read as fallbacks (``LEGACY_NAMES``): ``MODEL_DIR``, ``MODEL_FILE``, ``MODEL_NAME``, ``MODEL_ID``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

ENV_MODEL_DIR = "MODELFLEET_MODEL_DIR"
ENV_ARTIFACT = "MODELFLEET_ARTIFACT"
ENV_MODEL_ARCHIVE = "MODELFLEET_MODEL_ARCHIVE"
ENV_MODEL_NAME = "MODELFLEET_MODEL_NAME"
ENV_MODEL_ID = "MODELFLEET_MODEL_ID"
ENV_HF_COMMIT = "MODELFLEET_HF_COMMIT"
ENV_DEPLOYMENT_MODEL = "MODELFLEET_MODEL"
ENV_DEPLOYMENT_ENVIRONMENT = "MODELFLEET_ENVIRONMENT"
ENV_PORT = "PORT"
ENV_GATEWAY_SECRET = "MODELFLEET_GATEWAY_SECRET"
ENV_OPEN_PATH = "MODELFLEET_OPEN_PATH"
ENV_BATCH_SIZE = "MODELFLEET_BATCH_SIZE"
ENV_MAX_BATCH_DELAY = "MODELFLEET_MAX_BATCH_DELAY"  # milliseconds, as TorchServe's maxBatchDelay
# The bounds the manifest checks too (runtime.batchSize, runtime.maxBatchDelay).
MAX_BATCH_SIZE = 1024
MAX_BATCH_DELAY_MS = 10_000
# The header the gateway adds to every request it forwards (and drops from what clients send).
GATEWAY_SECRET_HEADER = "x-modelfleet-gateway-secret"
ENV_HF_HUB_OFFLINE = "HF_HUB_OFFLINE"
ENV_TRANSFORMERS_OFFLINE = "TRANSFORMERS_OFFLINE"

DEFAULT_MODEL_DIR = "/model"
DEFAULT_PORT = 8080

# canonical -> the name the servers read before the contract existed. A user may have set the old
# name in runtime.env: merged_with() copies it onto the canonical one, from_env() falls back to it.
LEGACY_NAMES: dict[str, str] = {
    ENV_MODEL_DIR: "MODEL_DIR",
    ENV_MODEL_ARCHIVE: "MODEL_FILE",
    ENV_MODEL_NAME: "MODEL_NAME",
    ENV_MODEL_ID: "MODEL_ID",
}

# field -> variable, for the fields that are one string variable each.
_STRING_VARIABLES: dict[str, str] = {
    "model_dir": ENV_MODEL_DIR,
    "artifact": ENV_ARTIFACT,
    "model_archive": ENV_MODEL_ARCHIVE,
    "model_name": ENV_MODEL_NAME,
    "model_id": ENV_MODEL_ID,
    "hf_commit": ENV_HF_COMMIT,
    "deployment_model": ENV_DEPLOYMENT_MODEL,
    "deployment_environment": ENV_DEPLOYMENT_ENVIRONMENT,
    "gateway_secret": ENV_GATEWAY_SECRET,
    "open_path": ENV_OPEN_PATH,
}
VARIABLES: frozenset[str] = frozenset(
    [*_STRING_VARIABLES.values(), ENV_PORT, ENV_HF_HUB_OFFLINE, ENV_TRANSFORMERS_OFFLINE, ENV_BATCH_SIZE,
     ENV_MAX_BATCH_DELAY])
_TRUE = ("1", "true", "yes", "on")


class ContractError(ValueError):
    """A variable of the contract has a value the runtime cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class RuntimeEnvironment:
    """What a model container is told about its model and deployment. ``None``: not set."""

    model_dir: str | None = None
    artifact: str | None = None
    model_archive: str | None = None
    model_name: str | None = None
    model_id: str | None = None
    hf_commit: str | None = None
    deployment_model: str | None = None
    deployment_environment: str | None = None
    port: int | None = None
    offline: bool = False  # HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1
    gateway_secret: str | None = field(default=None, repr=False)  # never in reprs or logs
    open_path: str | None = None
    batch_size: int | None = None  # TorchServe's batchSize: requests per handler call at most
    max_batch_delay: int | None = None  # TorchServe's maxBatchDelay, in milliseconds

    def __post_init__(self) -> None:
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ContractError(f"{ENV_PORT}={self.port}: not a port number; use 1-65535 (runtime.port)")
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ContractError(f"{ENV_BATCH_SIZE}={self.batch_size}: use 1-{MAX_BATCH_SIZE} (runtime.batchSize)")
        if self.max_batch_delay is not None and not 0 <= self.max_batch_delay <= MAX_BATCH_DELAY_MS:
            raise ContractError(f"{ENV_MAX_BATCH_DELAY}={self.max_batch_delay}: use 0-{MAX_BATCH_DELAY_MS} "
                                f"milliseconds (runtime.maxBatchDelay, at most 10s)")
        for name, variable in _STRING_VARIABLES.items():
            value = getattr(self, name)
            if value is not None and ("\0" in value or not value.strip()):
                raise ContractError(f"{variable}={value!r}: empty or with a NUL byte; set a value or leave it unset")

    # --- the daemon's side ------------------------------------------------------------------------

    def for_deployment(self, model: str, environment: str, *, port: int | None, gateway_secret: str | None = None,
                       open_path: str | None = None, batch_size: int | None = None,
                       max_batch_delay: int | None = None) -> RuntimeEnvironment:
        """This environment for one deployment's replicas (``port``: None when the server is told its
        port otherwise, e.g. TEI/TGI's ``--port``; ``gateway_secret``: only for servers that check it;
        the batch settings: only for the torch runtime, None when the manifest leaves them out)."""
        return replace(self, deployment_model=model, deployment_environment=environment, port=port,
                       gateway_secret=gateway_secret, open_path=open_path if gateway_secret else None,
                       batch_size=batch_size, max_batch_delay=max_batch_delay)

    def to_env(self) -> dict[str, str]:
        """The canonical variables of the fields that are set (nothing for ``None``)."""
        env = {variable: value for name, variable in _STRING_VARIABLES.items()
               if (value := getattr(self, name)) is not None}
        if self.port is not None:
            env[ENV_PORT] = str(self.port)
        if self.offline:
            env[ENV_HF_HUB_OFFLINE] = env[ENV_TRANSFORMERS_OFFLINE] = "1"
        if self.batch_size is not None:
            env[ENV_BATCH_SIZE] = str(self.batch_size)
        if self.max_batch_delay is not None:
            env[ENV_MAX_BATCH_DELAY] = str(self.max_batch_delay)
        return env

    def merged_with(self, manifest_env: Mapping[str, str]) -> dict[str, str]:
        """``to_env()`` with the manifest's ``runtime.env`` on top.

        A legacy name the manifest sets (``MODEL_ID: x``) also sets its canonical variable, unless
        the manifest sets that too: the servers read the canonical name first, and the user's
        value must win over the daemon's, as it did before the names changed.
        """
        env = self.to_env()
        env.update(manifest_env)
        for canonical, legacy in LEGACY_NAMES.items():
            if legacy in manifest_env and canonical not in manifest_env:
                env[canonical] = manifest_env[legacy]
        return env

    # --- the runtime's side -----------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, strict: bool = False) -> RuntimeEnvironment:
        """Read the contract from an environment (``os.environ`` in a container).

        Canonical names first, then ``LEGACY_NAMES``; empty values count as unset. ``strict``
        (for the daemon, which reads back what it wrote): any variable that is not canonical is
        a ContractError instead of being ignored.
        """
        if strict:
            unknown = sorted(set(environ) - VARIABLES)
            if unknown:
                raise ContractError(f"not variables of the runtime contract: {', '.join(unknown)} "
                                    f"(modelfleet/runtimes/contract.py names them all)")
        values: dict[str, Any] = {}
        for name, variable in _STRING_VARIABLES.items():
            value = _get(environ, variable)
            legacy = LEGACY_NAMES.get(variable)
            if value is None and legacy is not None and not strict:
                value = _get(environ, legacy)
            values[name] = value
        raw_port = _get(environ, ENV_PORT)
        if raw_port is not None:
            if not raw_port.isdigit():
                raise ContractError(f"{ENV_PORT}={raw_port!r}: not a port number; set it to 1-65535 "
                                    f"(the daemon sets it from runtime.port)")
            values["port"] = int(raw_port)
        for field_name, variable, hint in (("batch_size", ENV_BATCH_SIZE, f"1-{MAX_BATCH_SIZE}"),
                                           ("max_batch_delay", ENV_MAX_BATCH_DELAY,
                                            f"0-{MAX_BATCH_DELAY_MS} milliseconds")):
            raw = _get(environ, variable)
            if raw is not None:
                if not raw.isdigit():
                    raise ContractError(f"{variable}={raw!r}: not a whole number; use {hint} "
                                        f"(the daemon sets it from runtime.{_camel(field_name)})")
                values[field_name] = int(raw)
        values["offline"] = (_get(environ, ENV_HF_HUB_OFFLINE) or "").lower() in _TRUE
        return cls(**values)

    @property
    def model_path(self) -> str:
        """Where the model is: ``model_dir``, else the default mount point."""
        return self.model_dir or DEFAULT_MODEL_DIR

    @property
    def listen_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_PORT

    def provenance(self) -> dict[str, str | None]:
        """Which model and deployment this is, as the servers report it (``"modelfleet"`` in their
        info/describe answers): lets anyone check that a replica runs what the daemon meant."""
        return {"model": self.deployment_model, "environment": self.deployment_environment,
                "artifact": self.artifact, "model_id": self.model_id, "model_name": self.model_name,
                "hf_commit": self.hf_commit}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None

