"""The status providers, by name: the one place to add one.

``PROVIDERS`` maps each value ``status.provider`` accepts to the provider's factory, written as
``"module:function"``. The config takes the accepted names from here, and the daemon builds its
writer through ``make_writer``. The module of a provider is imported only when that provider is
used: reading the config (``modelfleet plan --offline`` does) imports no HTTP or Git client, so
this module imports nothing but the standard library.

A factory is called with the ``status:`` settings and the repository (the daemon's clone at
``repo_path``, ``repo.url``), and returns the StatusWriter, or None to publish no statuses. Bad
settings are a ValueError whose message says which key to fix (and never holds a secret).

To add a provider: write its writer and factory in a module of this package, and add its line below.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from modelfleet.reconciler.config import StatusSettings
    from modelfleet.reconciler.status import StatusWriter

PROVIDERS: dict[str, str] = {
    "git-notes": "modelfleet.reconciler.status.git_notes:from_settings",
    "gitea": "modelfleet.reconciler.status.forges:gitea_from_settings",
    "github": "modelfleet.reconciler.status.forges:github_from_settings",
    "gitlab": "modelfleet.reconciler.status.forges:gitlab_from_settings",
    "none": "modelfleet.reconciler.status.registry:no_statuses",
}


class Factory(Protocol):
    def __call__(self, settings: StatusSettings, *, repo_path: str, repo_url: str | None) -> StatusWriter | None: ...


def provider_names() -> tuple[str, ...]:
    """The accepted values of ``status.provider``, in the registry's order."""
    return tuple(PROVIDERS)


def describe_names() -> str:
    """``'git-notes', 'gitea', ... or 'none'``: the names for an error message."""
    quoted = [repr(name) for name in PROVIDERS]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def factory(provider: str) -> Factory:
    """The factory of a registered provider (imports its module). ValueError for an unknown name."""
    spec = PROVIDERS.get(provider)
    if spec is None:
        raise ValueError(f"unknown status provider {provider!r} (status.provider: use one of {describe_names()})")
    module, _, name = spec.partition(":")
    return cast(Factory, getattr(importlib.import_module(module), name))


def make_writer(settings: StatusSettings, *, repo_path: str, repo_url: str | None) -> StatusWriter | None:
    """The writer of ``settings.provider`` for the repository; None when statuses are not published."""
    return factory(settings.provider)(settings, repo_path=repo_path, repo_url=repo_url)


def no_statuses(settings: StatusSettings, *, repo_path: str, repo_url: str | None) -> None:
    """Provider ``none``: statuses are not published anywhere."""
    return None
