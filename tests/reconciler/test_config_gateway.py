"""``gateway.follow`` and ``gateway.cacheDir``: where a gateway gets its route table."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelfleet.reconciler.config import ConfigError, parse_config
from modelfleet.reconciler.gateway.remote_routes import RemoteRouteFeed
from modelfleet.reconciler.gateway.server import create_gateway


def test_the_default_follows_routes_db_in_state_dir() -> None:
    settings = parse_config("{}").gateway
    assert settings.follow == "stateDir" and settings.cache_dir is None


def test_a_cache_dir_without_following_the_control_plane_is_an_error() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("gateway:\n  cacheDir: /var/cache/modelfleet\n")
    assert "gateway.follow: controlPlane" in str(error.value)


def test_an_unknown_follow_mode_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("gateway:\n  follow: s3\n")
    assert "follow" in str(error.value) and "modelfleet.yaml:2" in str(error.value)


def test_a_gateway_following_the_control_plane_caches_in_cache_dir(tmp_path: Path) -> None:
    config = parse_config(f"stateDir: {tmp_path}/state\ngateway:\n  follow: controlPlane\n"
                          f"  controlPlane: http://10.0.0.1:8081\n  cacheDir: {tmp_path}/cache\n  location: paris-1\n")
    gateway = create_gateway(config)
    assert isinstance(gateway.routes, RemoteRouteFeed)
    assert gateway.routes.url == "http://10.0.0.1:8081/api/v1/routes"
    assert gateway.routes.cache_path == tmp_path / "cache" / "routes.json"
    assert gateway.routes.location == "paris-1"
