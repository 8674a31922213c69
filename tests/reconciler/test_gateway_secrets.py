"""The daemon's gateway key: made once (0600), one secret per deployment, the same for every reader."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from modelfleet.reconciler.secrets import GATEWAY_KEY_FILE, GatewaySecrets


def test_the_key_is_made_once_private_and_read_by_the_gateway(tmp_path: Path) -> None:
    assert GatewaySecrets(tmp_path, create=False).for_deployment("m", "production") is None  # no key yet
    daemon = GatewaySecrets(tmp_path)
    key_file = tmp_path / GATEWAY_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    gateway = GatewaySecrets(tmp_path, create=False)
    secret = daemon.for_deployment("m", "production")
    assert secret is not None and len(secret) == 64
    assert gateway.for_deployment("m", "production") == secret
    assert daemon.for_deployment("m", "development") != secret
    assert GatewaySecrets(tmp_path).for_deployment("m", "production") == secret  # not made again
    assert secret not in repr(daemon)


def test_a_damaged_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / GATEWAY_KEY_FILE).write_text("not hex\n")
    with pytest.raises(ValueError, match="not a gateway key"):
        GatewaySecrets(tmp_path)
